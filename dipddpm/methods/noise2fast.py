"""Noise2Fast (Lequyer et al., 2022): checkerboard down-sampling of the noisy image into
input/target pairs, a plain 8-layer convolutional net with a sigmoid output trained with
binary cross-entropy, stopped by the loss on held-out noisy pixels.

The checkerboard split of y (H x W, cropped to even sides) squeezes out every other pixel:

    rows squeezed (H/2 x W):    even[i, j] = y[2i + j % 2, j]      odd[i, j] = y[2i + 1 - j % 2, j]
    columns squeezed (H x W/2): even[i, j] = y[i, 2j + i % 2]      odd[i, j] = y[i, 2j + 1 - i % 2]

("even" holds the pixels with row + column even). Training pairs: rows even -> odd, rows
odd -> even, columns even -> odd; the held-out pair, never trained on, is columns odd ->
even: its loss is the stopping signal. The net is trained on a random training pair per step until
the held-out loss has not improved for ``patience`` steps; the estimate is the mean of the
full-image predictions of the last ``average_last`` steps. Images are min-max normalised
to [0, 1] for the cross-entropy and mapped back. No clean image and no sigma.
"""

from __future__ import annotations

import time
from collections import deque

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from dipddpm.data.images import to_image, to_tensor
from dipddpm.errors import require
from dipddpm.methods.zero_shot import finish, observation, require_positive_int, validate_observation
from dipddpm.progress import progress_bar

DATA_KINDS = ("image",)  # data groups this method accepts (checked by methods.require_data_kind)
BAR_CHUNK = 25  # progress-bar updates per this many steps


def checkerboard_split(image: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, C, H, W) -> {rows_even, rows_odd: (N, C, H//2, W'), cols_even, cols_odd: (N, C, H', W//2)}
    with H', W' the sides cropped to even; formulas in the module docstring."""
    height, width = image.shape[-2] // 2 * 2, image.shape[-1] // 2 * 2
    y = image[..., :height, :width]
    top, bottom = y[..., 0::2, :], y[..., 1::2, :]           # rows 2i and 2i + 1
    left, right = y[..., :, 0::2], y[..., :, 1::2]           # columns 2j and 2j + 1
    even_column = (torch.arange(width, device=y.device) % 2 == 0)
    even_row = (torch.arange(height, device=y.device) % 2 == 0)[:, None]
    return {
        "rows_even": torch.where(even_column, top, bottom),
        "rows_odd": torch.where(even_column, bottom, top),
        "cols_even": torch.where(even_row, left, right),
        "cols_odd": torch.where(even_row, right, left),
    }


def training_pairs(split: dict[str, torch.Tensor]) -> tuple[list[tuple], tuple]:
    """The three (input, target) training pairs and the held-out pair (columns odd -> even)."""
    pairs = [(split["rows_even"], split["rows_odd"]), (split["rows_odd"], split["rows_even"]),
             (split["cols_even"], split["cols_odd"])]
    return pairs, (split["cols_odd"], split["cols_even"])


class CheckerboardNet(nn.Sequential):
    """``layers`` 3x3 convolutions of ``width`` channels with ReLU, then a 1x1 convolution to C
    channels: (N, C, H, W) -> logits (N, C, H, W); the sigmoid of the logits is the estimate."""

    def __init__(self, channels: int, width: int = 64, layers: int = 8):
        blocks = []
        for index in range(layers):
            blocks += [nn.Conv2d(channels if index == 0 else width, width, 3, padding=1), nn.ReLU()]
        super().__init__(*blocks, nn.Conv2d(width, channels, 1))


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(logits) against target in [0, 1] (the stable logits form)."""
    return F.binary_cross_entropy_with_logits(logits, target)


def validate(cfg) -> None:
    m = cfg.method
    validate_observation(cfg)
    for key in ("width", "layers", "patience", "average_last", "max_steps"):
        require_positive_int(cfg, key)
    require(float(m.lr) > 0, "method.lr", m.lr, "a number > 0")


def clean_image_uses(cfg) -> list[str]:
    """Nothing: the clean image only scores the output."""
    return []


def describe(cfg):
    m = cfg.method
    text = (f"noise2fast: checkerboard pairs, {m.layers} x {m.width}-channel net, sigmoid + BCE, Adam lr {m.lr}; "
            f"stop after {m.patience} steps without a better held-out loss (at most {m.max_steps}); "
            f"mean of the last {m.average_last} predictions")
    return text, {key: m[key] for key in ("width", "layers", "lr", "patience", "average_last", "max_steps")}


def run(ctx) -> dict:
    cfg, device = ctx.cfg, ctx.device
    m = cfg.method
    obs = observation(cfg)
    noisy = to_tensor(obs.noisy).to(device)
    low, high = noisy.min(), noisy.max()
    scale = (high - low).clamp_min(1e-8)
    normalised = (noisy - low) / scale
    pairs, (held_input, held_target) = training_pairs(checkerboard_split(normalised))
    net = CheckerboardNet(noisy.shape[1], int(m.width), int(m.layers)).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=float(m.lr))
    choices = torch.randint(len(pairs), (int(m.max_steps),), generator=torch.Generator().manual_seed(ctx.seed))
    recent = deque(maxlen=int(m.average_last))  # parameter vectors of the last steps
    best, best_step, since = float("inf"), 0, 0
    bar = progress_bar(int(m.max_steps), "noise2fast", ctx.progress)
    began = time.perf_counter()
    steps = 0
    while steps < int(m.max_steps) and since < int(m.patience):
        inputs, target = pairs[int(choices[steps])]
        optimizer.zero_grad(set_to_none=True)
        loss = bce(net(inputs), target)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            held_loss = float(bce(net(held_input), held_target))
            recent.append(parameters_to_vector(net.parameters()).clone())
        since = 0 if held_loss < best else since + 1
        if held_loss < best:
            best, best_step = held_loss, steps
        steps += 1
        if steps % BAR_CHUNK == 0:
            bar.update(BAR_CHUNK)
    with torch.no_grad():
        predictions = []
        for vector in recent:
            vector_to_parameters(vector, net.parameters())
            predictions.append(torch.sigmoid(net(normalised)))
        final = (torch.stack(predictions).mean(0) * scale + low).clamp(0.0, 1.0)
    seconds = time.perf_counter() - began
    bar.close()
    metrics = finish(cfg, obs, to_image(final), seconds, ctx.run_dir)
    metrics.update(loss_final=float(loss.detach()), held_out_loss_best=best, best_step=best_step, steps=steps,
                   stopped_early=since >= int(m.patience), steps_per_second=steps / max(seconds, 1e-9))
    return metrics
