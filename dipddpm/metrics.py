"""Image quality metrics.

Arrays are HxW or HxWxC (channels last), floats in [0, data_range]. The NumPy
functions are thin wrappers around scikit-image with an explicit data_range; the
torch functions compute the same PSNR on the device without a host copy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def psnr(reference: np.ndarray, estimate: np.ndarray, data_range: float = 1.0) -> float:
    """PSNR in dB of estimate against reference (scikit-image's definition)."""
    reference = np.asarray(reference, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    mse = float(np.mean((reference - estimate) ** 2))
    if mse == 0.0:
        return math.inf
    return float(peak_signal_noise_ratio(reference, estimate, data_range=data_range))


def ssim(reference: np.ndarray, estimate: np.ndarray, data_range: float = 1.0) -> float:
    """SSIM of estimate against reference; colour images use channel_axis=-1."""
    reference = np.asarray(reference, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    if reference.ndim == 3 and reference.shape[-1] == 1:
        reference, estimate = reference[..., 0], estimate[..., 0]
    channel_axis = -1 if reference.ndim == 3 else None
    smallest = min(reference.shape[0], reference.shape[1])
    win_size = min(7, smallest if smallest % 2 == 1 else smallest - 1)
    return float(
        structural_similarity(
            reference, estimate, data_range=data_range, channel_axis=channel_axis, win_size=win_size
        )
    )


QUANTISERS = ("round", "truncate")


def uint8_levels(x, quantise: str = "round"):
    """[0, 1] image (NumPy array or torch tensor) -> its uint8 levels 0..255, same type, as floats.

    round: round(clip(x, 0, 1) * 255); truncate: floor(clip(x, 0, 1) * 255), what report R2's
    ``np.uint8(x * 255)`` does to a clipped image (the cast drops the fraction).
    """
    if quantise not in QUANTISERS:
        raise ValueError(f"quantise must be one of {QUANTISERS}, got {quantise!r}")
    scaled = x.clip(0, 1) * 255.0
    return scaled.round() if quantise == "round" else scaled - scaled % 1.0


def psnr_uint8(reference: np.ndarray, estimate: np.ndarray, quantise: str = "round") -> float:
    """PSNR after quantising both [0, 1] images to uint8 (``uint8_levels``), data_range 255 (report R2's metric)."""
    to_uint8 = lambda a: uint8_levels(np.asarray(a, dtype=np.float64), quantise).astype(np.uint8)  # noqa: E731
    return float(peak_signal_noise_ratio(to_uint8(reference), to_uint8(estimate), data_range=255))


def psnr_torch_batched(reference: torch.Tensor, estimate: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR per item of a batch: inputs (B, ...) -> (B,) tensor of dB values."""
    diff = (reference.double() - estimate.double()).flatten(1)
    mse = diff.pow(2).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)
