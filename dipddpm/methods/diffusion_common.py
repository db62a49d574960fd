"""Helpers shared by the diffusion methods (ddpm_single, ddpm_dipnoise, ddpm_dataset).

- validation of the eps-net (``eps_net`` group) against the data side;
- the noise schedule from ``cfg.scheduler`` and the part of it that a cache key needs;
- training iterations from epochs over a data set (the profile has already scaled the
  epochs: dipddpm.profile.apply_profile);
- cached training of an eps-net and of a DIP (the ``backbone`` group), keyed by everything
  that fixes their weights;
- sampling helpers: wall-clock timing, PNG sample grids, digit-quality columns.

Images are (N, C, H, W) tensors; "unit" images are in [0, 1], "symmetric" in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dipddpm.diffusion import checkpoint_key, load_or_train_with_info, train_eps
from dipddpm.diffusion.checkpoints import plain
from dipddpm.diffusion.schedule import build_schedule
from dipddpm.dip import DipSettings, Stage, fit_dip
from dipddpm.errors import require, require_choice
from dipddpm.io import save_image_atomic
from dipddpm.metrics import psnr
from dipddpm.models import build_backbone, check_size
from dipddpm.runtime import synchronize

log = logging.getLogger("dipddpm")

EPS_NETS = ("unet_res", "unet_ln", "unet_wide")
CACHE_VERSION = 1
CODE_KINDS = ("uniform", "gaussian")


# ---------------------------------------------------------------- validation


def validate_eps_net(cfg, side: int) -> None:
    """The ``eps_net`` group must be a time-conditioned eps-net that takes images of ``side``."""
    eps_net = cfg.get("eps_net")
    require(eps_net is not None, "eps_net", None, "one of " + ", ".join(EPS_NETS) + " (e.g. eps_net=unet_res)")
    require_choice("eps_net.name", eps_net.get("name"), EPS_NETS)
    check_size(eps_net, side, key="eps_net")
    if eps_net.name == "unet_ln":
        size = eps_net.get("image_size")
        require(size == side, "eps_net.image_size", size, f"the data side, {side} (unet_ln is built for one side)")


def require_int(key: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum], else ConfigError naming ``key``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    ok = ok and (maximum is None or value <= maximum)
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in {minimum}..{maximum}"
    require(ok, key, value, allowed)
    return int(value)


def require_positive(key: str, value) -> float:
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, key, value, "a number > 0")
    return float(value)


def validate_dip_settings(dip, prefix: str) -> None:
    """Check a method's DIP sub-config (steps, lr, code, jitter, EMA); keys are named ``prefix.<key>``."""
    require_int(f"{prefix}.steps", dip.steps)
    require_positive(f"{prefix}.lr", dip.lr)
    require_choice(f"{prefix}.code_kind", dip.code_kind, CODE_KINDS)
    require_positive(f"{prefix}.code_scale", dip.code_scale)
    require(isinstance(dip.reg_noise_std, (int, float)) and dip.reg_noise_std >= 0, f"{prefix}.reg_noise_std",
            dip.reg_noise_std, "a number >= 0")
    require(isinstance(dip.ema, (int, float)) and 0 <= dip.ema < 1, f"{prefix}.ema", dip.ema, "a number in [0, 1)")
    require_int(f"{prefix}.seed", dip.seed, minimum=0)


def validate_num_samples(profile) -> int:
    """profile.num_samples, at least 2 (the Frechet distance needs two samples)."""
    return require_int("profile.num_samples", profile.get("num_samples"), minimum=2)


# ---------------------------------------------------------------- schedule


def schedule_from(cfg):
    """The NoiseSchedule of ``cfg.scheduler`` (ConfigError for bad values)."""
    return build_schedule(cfg.scheduler)


def schedule_key(cfg_scheduler) -> dict:
    """The scheduler keys that fix the betas (``softmax_c`` only concerns R2's epoch plans)."""
    return {k: v for k, v in plain(cfg_scheduler).items() if k != "softmax_c"}


# ---------------------------------------------------------------- training length


def epoch_iterations(epochs: float, count: int, batch_size: int, minimum: int = 1) -> int:
    """Optimiser steps for ``epochs`` passes (a fraction after a profile) over ``count`` images in
    batches of ``batch_size`` (the last one partial): max(minimum, 1, round(epochs * ceil(count / batch)))."""
    return max(int(minimum), 1, int(round(epochs * math.ceil(count / batch_size))))


# ---------------------------------------------------------------- seeds and value ranges


def seeded_generator(device, seed: int, offset: int = 0) -> torch.Generator:
    """A torch generator on ``device`` seeded by seed * 1000003 + offset (as RunContext.generator)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) * 1000003 + offset)
    return generator


def to_unit(images: torch.Tensor, value_range: str) -> torch.Tensor:
    """Images in the data's value range (unit | symmetric) -> [0, 1] scale (not clipped)."""
    return images if value_range == "unit" else (images + 1.0) / 2.0


# ---------------------------------------------------------------- cached training


@dataclass
class Trained:
    """A network from the cache or trained now; ``info`` is what the trainer recorded."""

    model: torch.nn.Module
    trained_now: bool
    info: dict
    key: str


def train_eps_cached(ctx, identity: dict, build_model, data: torch.Tensor, schedule, *,
                     iterations: int, batch_size: int, lr: float, seed: int, t_max: int | None = None,
                     **train_options) -> Trained:
    """Train ``build_model()`` with train_eps on ``data`` (N, C, H, W), or load it from ctx.cache_dir.

    The cache key is ``identity`` (what the data is, and anything else the caller knows:
    it must describe callables such as forward_noise/loss_target) plus the eps-net config
    (cfg.eps_net), the schedule and every plain training argument, so another job with the
    same training config reuses the weights. info: loss_final (mean of the last 50 losses),
    train_seconds, iterations.
    """
    plain_options = {k: v for k, v in train_options.items() if not callable(v) and not isinstance(v, torch.Tensor)}
    # The eps-net's config is stored under "backbone", its group's name when these caches were
    # first written, so weights trained before the eps_net group stay valid.
    key = {"kind": "eps_net", "version": CACHE_VERSION, "backbone": plain(ctx.cfg.eps_net),
           "schedule": schedule_key(ctx.cfg.scheduler), "data_shape": list(data.shape),
           "train": {"iterations": iterations, "batch_size": batch_size, "lr": lr, "seed": seed, "t_max": t_max,
                     **plain_options},
           **identity}

    def train(model):
        result = train_eps(model, schedule, data, iterations=iterations, batch_size=batch_size, lr=lr, seed=seed,
                           t_max=t_max, device=ctx.device, progress=ctx.progress, key_prefix="method.train.",
                           **train_options)
        trained = result.ema_model if result.ema_model is not None else result.model
        tail = result.losses[-50:]
        return trained, {"loss_final": float(np.mean(tail)), "train_seconds": result.seconds,
                         "iterations": iterations}

    return _cached(ctx, key, build_model, train, "eps-net")


def fit_dip_cached(ctx, identity: dict, build_net, code: torch.Tensor, target: torch.Tensor, dip,
                   clean: torch.Tensor | None = None, steps: int | None = None) -> Trained:
    """Fit a DIP from ``code`` (1, Cin, H, W) to ``target`` (1, C, H, W) through fit_dip, or load it.

    ``dip`` is the method's DIP sub-config (steps, lr, reg_noise_std, ema, seed) after the
    profile; ``steps`` (None: dip.steps) is the step count. ``identity``
    must say what the target is; the code is fixed by dip.seed, its kind and scale (part
    of the key through ``dip``). info: psnr_final (the last output vs ``clean``, when
    given), loss_final, dip_seconds, steps.
    """
    steps = int(dip.steps) if steps is None else int(steps)
    # Only the last output is used, so the loop evaluates at its first and last step only.
    settings = DipSettings(lr=float(dip.lr), reg_noise_std=float(dip.reg_noise_std), ema=float(dip.ema),
                           eval_every=max(1, steps), progress=ctx.progress, description="dip",
                           evaluate_ssim=False)
    key_settings = {k: v for k, v in dataclasses.asdict(settings).items()
                    if k not in ("progress", "description", "eval_every", "evaluate_ssim")}
    key = {"kind": "dip", "version": CACHE_VERSION, "dip": plain(dip), "steps": steps,
           "settings": key_settings, **identity}

    def train(net):
        generator = seeded_generator(ctx.device, int(dip.seed), offset=2)
        result = fit_dip(net, [Stage(index=0, steps=steps, net_input=code, target=target)], settings,
                         clean=clean, generator=generator)
        info = {"loss_final": result.loss_final, "dip_seconds": result.seconds, "steps": result.steps_run}
        if clean is not None:
            info["psnr_final"] = float(psnr(clean.cpu().numpy(), result.final.cpu().numpy()))
        return net, info

    return _cached(ctx, key, build_net, train, "dip")


def _cached(ctx, key: dict, build_model, train, what: str) -> Trained:
    model, trained_now, info = load_or_train_with_info(ctx.cache_dir, key, build_model, train)
    digest = checkpoint_key(key)
    if trained_now:
        log.info("%s trained and cached as %s", what, digest[:12])
    else:
        log.info("%s loaded from the cache (%s)", what, digest[:12])
    return Trained(model=model, trained_now=trained_now, info=dict(info), key=digest)


def build_seeded(cfg_backbone, in_channels: int, out_channels: int, seed: int, device):
    """A function building the backbone with its initial weights fixed by ``seed``."""
    def build():
        torch.manual_seed(int(seed))
        return build_backbone(cfg_backbone, in_channels, out_channels).to(device)

    return build


# ---------------------------------------------------------------- data


def noisy_digit(index: int, root=None, split: str = "train", sigma: float = 0.15, clip: bool = True,
                noise_seed: int = 0, side: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, noisy): one MNIST digit (1, 1, s, s) in [0, 1] (resized bilinearly to ``side`` if
    given) and clean + sigma * N(0, 1) with numpy's generator seeded by noise_seed (clipped to [0, 1])."""
    from dipddpm.data.images import add_gaussian_noise
    from dipddpm.data.mnist import load_digit

    clean = load_digit(int(index), root, split, "unit")
    if side is not None and side != clean.shape[-1]:
        clean = F.interpolate(clean, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)
    noisy = add_gaussian_noise(clean[0].numpy().transpose(1, 2, 0), float(sigma), bool(clip), int(noise_seed))
    return clean, torch.from_numpy(noisy.transpose(2, 0, 1).copy())[None]


# ---------------------------------------------------------------- sampling outputs


def timed(fn, device):
    """(fn(), wall seconds), synchronising a CUDA device before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def sample_grid(images: torch.Tensor, columns: int = 8, pad: int = 2) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] (clipped here) -> one HxWxC array, ``columns`` per row."""
    images = images.detach().float().cpu().clamp(0, 1)
    count, channels, height, width = images.shape
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    grid = np.ones((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), dtype=np.float32)
    for i in range(count):
        top, left = pad + (i // columns) * (height + pad), pad + (i % columns) * (width + pad)
        grid[top : top + height, left : left + width] = images[i].numpy().transpose(1, 2, 0)
    return grid


def save_sample_grid(path, images: torch.Tensor, columns: int = 8) -> None:
    """Write images (N, C, H, W) in [0, 1] as a PNG grid."""
    save_image_atomic(path, sample_grid(images, columns))


def reference_digits(root, count: int) -> torch.Tensor:
    """The first ``count`` digits of the MNIST train split: (count, 1, 28, 28) in [0, 1]."""
    from dipddpm.data.mnist import load_mnist, to_tensor

    images, _ = load_mnist(root, "train", int(count))
    return to_tensor(images, "unit")


def digit_quality_columns(ctx, samples_unit: torch.Tensor, root=None, reference_count: int = 1000) -> dict:
    """frechet, confidence, psnr_nearest of samples (N, 1, 28, 28) on the [0, 1] scale (clipped
    by digit_quality) against the first ``reference_count`` real digits, with the cached digit
    classifier; plus classifier_accuracy (its held-out accuracy)."""
    from dipddpm.digit_metrics import digit_quality, get_digit_classifier

    classifier = get_digit_classifier(ctx.cache_dir, ctx.device, root=root)
    quality = digit_quality(samples_unit, reference_digits(root, reference_count), classifier)
    quality["classifier_accuracy"] = classifier.heldout_accuracy
    return quality
