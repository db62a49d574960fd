import math

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dipddpm.metrics import psnr, psnr_torch_batched, psnr_uint8, ssim


def test_psnr_matches_closed_form_and_skimage():
    reference = np.zeros((8, 8, 3), dtype=np.float32)
    estimate = np.full((8, 8, 3), 0.1, dtype=np.float32)
    expected = 10 * math.log10(1.0 / 0.01)  # mse = 0.01 exactly
    assert psnr(reference, estimate) == np.float64(peak_signal_noise_ratio(reference.astype(np.float64), estimate.astype(np.float64), data_range=1.0))
    assert abs(psnr(reference, estimate) - expected) < 1e-5
    assert psnr(reference, reference) == math.inf


def test_ssim_equals_skimage_colour_and_gray():
    rng = np.random.default_rng(0)
    clean = rng.random((32, 32, 3))
    noisy = np.clip(clean + 0.1 * rng.standard_normal(clean.shape), 0, 1)
    expected = structural_similarity(clean, noisy, data_range=1.0, channel_axis=-1)
    assert abs(ssim(clean, noisy) - expected) < 1e-12
    gray_expected = structural_similarity(clean[..., 0], noisy[..., 0], data_range=1.0)
    assert abs(ssim(clean[..., :1], noisy[..., :1]) - gray_expected) < 1e-12


def test_torch_psnr_equals_numpy_psnr():
    rng = np.random.default_rng(1)
    a, b = rng.random((16, 16, 3)), rng.random((16, 16, 3))
    ta = torch.from_numpy(a.transpose(2, 0, 1))[None]
    tb = torch.from_numpy(b.transpose(2, 0, 1))[None]
    batched = psnr_torch_batched(torch.cat([ta, ta]), torch.cat([tb, ta * 0.5]))
    assert abs(float(batched[0]) - psnr(a, b)) < 1e-9
    assert abs(float(batched[1]) - psnr(a, a * 0.5)) < 1e-9


def test_uint8_psnr_quantises_first():
    a = np.full((4, 4, 1), 0.4)  # 102 grey levels
    b = np.full((4, 4, 1), 0.4 + 1 / 255)  # 103
    mse = 1.0  # one grey level
    assert abs(psnr_uint8(a, b) - 10 * math.log10(255**2 / mse)) < 1e-9
