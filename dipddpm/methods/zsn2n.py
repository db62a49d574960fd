"""Zero-Shot Noise2Noise (Mansour & Heckel, CVPR 2023): a tiny network trained on the two
half-resolution images of the noisy observation, each the other's noisy target.

With y (1, C, H, W) and f the network (it predicts the noise), D1/D2 the diagonal 2x2
down-samplers and MSE means over all entries:

    L_res  = 1/2 [ MSE(D1(y) - f(D1(y)), D2(y)) + MSE(D2(y) - f(D2(y)), D1(y)) ]
    L_cons = 1/2 [ MSE(D1(y) - f(D1(y)), D1(y - f(y))) + MSE(D2(y) - f(D2(y)), D2(y - f(y))) ]

Adam on L_res + L_cons; the estimate is y - f(y), clipped to [0, 1]. No clean image, no sigma.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from dipddpm.data.images import to_image, to_tensor
from dipddpm.errors import require
from dipddpm.methods.zero_shot import finish, observation, require_positive_int, validate_observation
from dipddpm.progress import progress_bar

DATA_KINDS = ("image",)  # data groups this method accepts (checked by methods.require_data_kind)
BAR_CHUNK = 25  # progress-bar updates per this many steps


def pair_downsample(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) -> two (N, C, H//2, W//2): the means of each 2x2 block's diagonal pair.

    D1 = (y[2i, 2j] + y[2i+1, 2j+1]) / 2 (filter [[1/2, 0], [0, 1/2]], stride 2),
    D2 = (y[2i, 2j+1] + y[2i+1, 2j]) / 2 (filter [[0, 1/2], [1/2, 0]]); an odd last row or column is dropped.
    """
    height, width = image.shape[-2] // 2 * 2, image.shape[-1] // 2 * 2
    y = image[..., :height, :width]
    first = (y[..., 0::2, 0::2] + y[..., 1::2, 1::2]) / 2
    second = (y[..., 0::2, 1::2] + y[..., 1::2, 0::2]) / 2
    return first, second


class NoisePredictor(nn.Sequential):
    """The paper's network: 3x3 conv (C -> width), LeakyReLU 0.2, 3x3 conv (width -> width),
    LeakyReLU 0.2, 1x1 conv (width -> C). (N, C, H, W) -> predicted noise (N, C, H, W)."""

    def __init__(self, channels: int, width: int = 48):
        super().__init__(
            nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 1),
        )


def zsn2n_loss(net: nn.Module, noisy: torch.Tensor) -> torch.Tensor:
    """L_res + L_cons of the module docstring for ``noisy`` (1, C, H, W); both halves go through
    the network as one batch of two."""
    first, second = pair_downsample(noisy)
    halves = torch.cat([first, second])
    denoised_halves = halves - net(halves)
    swapped = torch.cat([second, first])
    residual = F.mse_loss(denoised_halves, swapped)  # the mean over both halves is 1/2 (sum of the two MSEs)
    down_first, down_second = pair_downsample(noisy - net(noisy))
    consistency = F.mse_loss(denoised_halves, torch.cat([down_first, down_second]))
    return residual + consistency


def lr_at(step: int, cfg_method) -> float:
    """Step decay: lr * gamma ** (step // lr_step) (the paper: 1e-3, halved at step 1500)."""
    return float(cfg_method.lr) * float(cfg_method.lr_gamma) ** (step // int(cfg_method.lr_step))


def validate(cfg) -> None:
    m = cfg.method
    validate_observation(cfg)
    for key in ("steps", "width", "lr_step"):
        require_positive_int(cfg, key)
    require(float(m.lr) > 0, "method.lr", m.lr, "a number > 0")
    require(0 < float(m.lr_gamma) <= 1, "method.lr_gamma", m.lr_gamma, "a number in (0, 1]")


def clean_image_uses(cfg) -> list[str]:
    """Nothing: the clean image only scores the output."""
    return []


def describe(cfg):
    m = cfg.method
    steps = int(m.steps)
    text = (f"zsn2n: 2x2 diagonal down-sampling, net {m.width} channels, {steps} Adam steps, "
            f"lr {m.lr} x {m.lr_gamma} every {m.lr_step} steps")
    return text, {"steps": steps, "width": int(m.width), "lr": float(m.lr), "lr_step": int(m.lr_step),
                  "lr_gamma": float(m.lr_gamma)}


def run(ctx) -> dict:
    cfg, device = ctx.cfg, ctx.device
    m = cfg.method
    obs = observation(cfg)
    noisy = to_tensor(obs.noisy).to(device)
    net = NoisePredictor(noisy.shape[1], int(m.width)).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr_at(0, m))
    steps = int(m.steps)
    bar = progress_bar(steps, "zsn2n", ctx.progress)
    began = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, m)
        optimizer.zero_grad(set_to_none=True)
        loss = zsn2n_loss(net, noisy)
        loss.backward()
        optimizer.step()
        if (step + 1) % BAR_CHUNK == 0:
            bar.update(BAR_CHUNK)
    with torch.no_grad():
        final = (noisy - net(noisy)).clamp(0.0, 1.0)
    loss_final = float(loss.detach())
    seconds = time.perf_counter() - began
    bar.close()
    metrics = finish(cfg, obs, to_image(final), seconds, ctx.run_dir)
    metrics.update(loss_final=loss_final, steps=steps, steps_per_second=steps / max(seconds, 1e-9))
    return metrics
