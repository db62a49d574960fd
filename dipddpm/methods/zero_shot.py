"""What the zero-shot denoisers (ZS-N2N, Noise2Fast) share: the observation and the
metrics and images of the returned estimate.

They see the same observation as ``method=dip`` and ``method=classical`` (the data group at
the side a DIP run with the configured backbone would use) and never the clean image,
which only scores the returned estimate.
"""

from __future__ import annotations

import numpy as np

from dipddpm.data.images import Observation, load_observation, validate_image_config
from dipddpm.errors import require, require_choice
from dipddpm.io import save_image_atomic
from dipddpm.methods.dip import effective_size
from dipddpm.metrics import psnr, psnr_uint8, ssim


def validate_observation(cfg) -> None:
    """The data group (data=image, checked by the caller through DATA_KINDS) and PSNR kind."""
    require_choice("method.psnr_metric", cfg.method.psnr_metric, ("float", "uint8"))
    validate_image_config(cfg.data)
    effective_size(cfg)


def require_positive_int(cfg, key: str) -> None:
    """ConfigError unless method.<key> is an integer >= 1."""
    value = cfg.method.get(key)
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"method.{key}", value,
            "an integer >= 1")


def observation(cfg) -> Observation:
    """The data group's clean image and noisy observation, as every denoiser of the project sees it."""
    return load_observation(cfg.data, size=effective_size(cfg))


def finish(cfg, obs: Observation, final: np.ndarray, seconds: float, run_dir) -> dict:
    """Write clean/noisy/final PNGs into run_dir; the metrics every denoiser reports for ``final``
    (HxWxC in [0, 1]): PSNR/SSIM against the clean image, PSNR of the input, wall seconds."""
    score = psnr_uint8 if cfg.method.psnr_metric == "uint8" else psnr
    save_image_atomic(run_dir / "clean.png", obs.clean)
    save_image_atomic(run_dir / "noisy.png", obs.noisy)
    save_image_atomic(run_dir / "final.png", final)
    return {
        "psnr_final": score(obs.clean, final), "ssim_final": ssim(obs.clean, final),
        "psnr_noisy_input": score(obs.clean, obs.noisy), "psnr_final_vs_noisy": psnr(obs.noisy, final),
        "wall_seconds": seconds, "image": obs.name, "image_size": int(obs.clean.shape[0]),
    }
