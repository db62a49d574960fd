"""Epsilon-prediction training loop shared by every DDPM method.

``train_eps`` fits ``model(x_t, t) -> target`` with an MSE loss, where
``x_t = q_sample(x0, t, noise)``. By default ``noise ~ N(0, I)`` and the target is that
noise; the ``forward_noise`` and ``loss_target`` hooks replace them (report R5's ideas:
a DIP output as the forward-process noise, or as the regression target).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from dipddpm.errors import DivergedError, require, require_choice
from dipddpm.progress import progress_bar
from dipddpm.runtime import model_device, synchronize

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainResult:
    """model: the trained network (trained in place); ema_model: its EMA copy or None;
    losses: one float per iteration; seconds: wall time of the loop."""

    model: nn.Module
    ema_model: nn.Module | None
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.lerp_(p.detach(), 1.0 - decay)
    for ema_b, b in zip(ema.buffers(), model.buffers()):
        ema_b.copy_(b)


def _iteration_count(n: int, batch_size: int, iterations, epochs, prefix: str) -> int:
    require((iterations is None) != (epochs is None), f"{prefix}iterations", iterations,
            "exactly one of iterations and epochs must be set")
    if iterations is not None:
        require(isinstance(iterations, int) and iterations >= 1, f"{prefix}iterations", iterations,
                "an integer >= 1")
        return iterations
    require(isinstance(epochs, int) and epochs >= 1, f"{prefix}epochs", epochs, "an integer >= 1")
    return epochs * math.ceil(n / batch_size)


def train_eps(
    model: nn.Module,
    schedule,
    data: torch.Tensor,
    *,
    iterations: int | None = None,
    epochs: int | None = None,
    batch_size: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    lr_schedule: str = "constant",
    grad_clip: float | None = None,
    ema_decay: float | None = None,
    t_max: int | None = None,
    forward_noise: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss_target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    flip: bool = False,
    generator: torch.Generator | None = None,
    seed: int = 0,
    device=None,
    progress: bool = False,
    check_every: int = 50,
    key_prefix: str = "",
) -> TrainResult:
    """Train ``model`` to predict the forward-process noise; returns a TrainResult.

    data: float tensor (N, C, H, W), already scaled as the method wants. One epoch is
    ceil(N / batch_size) iterations over a fresh shuffled order; give exactly one of
    ``iterations`` and ``epochs``. Each iteration draws t ~ U{0..t_max-1} (t_max defaults
    to T), noise = forward_noise(x0) or N(0, I), x_t = schedule.q_sample(x0, t, noise),
    and minimises MSE(model(x_t, t), loss_target(noise, x0) or noise). ``flip`` mirrors
    each sample horizontally with probability 1/2. Random draws come from ``generator``
    (else a new one on the training device seeded with ``seed``). Losses are checked
    every ``check_every`` iterations and at the end; a NaN/inf loss raises
    DivergedError(step, loss) with the 0-based iteration index. ``key_prefix`` is put in
    front of argument names in ConfigError messages (e.g. "method.train.").
    """
    p = key_prefix
    require(data.dim() == 4 and data.shape[0] >= 1, f"{p}data", tuple(data.shape), "a tensor (N, C, H, W), N >= 1")
    require(isinstance(batch_size, int) and batch_size >= 1, f"{p}batch_size", batch_size, "an integer >= 1")
    require(isinstance(lr, (int, float)) and lr > 0, f"{p}lr", lr, "a number > 0")
    require_choice(f"{p}lr_schedule", lr_schedule, LR_SCHEDULES)
    require(grad_clip is None or grad_clip > 0, f"{p}grad_clip", grad_clip, "null or a number > 0")
    require(ema_decay is None or 0.0 <= ema_decay < 1.0, f"{p}ema_decay", ema_decay, "null or a number in [0, 1)")
    num_t = schedule.num_timesteps
    t_max = num_t if t_max is None else t_max
    require(isinstance(t_max, int) and 1 <= t_max <= num_t, f"{p}t_max", t_max, f"null or an integer in 1..{num_t}")
    total = _iteration_count(data.shape[0], batch_size, iterations, epochs, p)

    device = torch.device(device) if device is not None else model_device(model)
    model = model.to(device)
    model.train()
    data = data.to(device=device, dtype=torch.float32)
    schedule = schedule.to(device)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    gen_device = generator.device

    ema_model = None
    if ema_decay is not None:
        ema_model = copy.deepcopy(model)
        ema_model.requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(betas))
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total) if lr_schedule == "cosine" else None
    )

    n = data.shape[0]
    order = torch.empty(0, dtype=torch.long, device=device)
    pending: list[torch.Tensor] = []
    losses: list[float] = []

    def flush(first_step: int) -> None:
        values = torch.stack(pending).tolist()
        pending.clear()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                raise DivergedError(first_step + offset, value)
        losses.extend(values)

    synchronize(device)
    start = time.perf_counter()
    bar = progress_bar(total, "train eps", progress)
    for step in range(total):
        if order.numel() == 0:
            order = torch.randperm(n, generator=generator, device=gen_device).to(device)
        index, order = order[:batch_size], order[batch_size:]
        x0 = data[index]
        b = x0.shape[0]
        if flip:
            mirror = (torch.rand(b, generator=generator, device=gen_device) < 0.5).to(device)
            x0 = torch.where(mirror[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, t_max, (b,), generator=generator, device=gen_device).to(device)
        if forward_noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(device)
        else:
            noise = forward_noise(x0)
        target = noise if loss_target is None else loss_target(noise, x0)
        x_t = schedule.q_sample(x0, t, noise)
        loss = torch.mean((model(x_t, t) - target) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema_model is not None:
            _ema_update(ema_model, model, ema_decay)
        pending.append(loss.detach())
        if len(pending) >= check_every or step == total - 1:
            flush(step + 1 - len(pending))
            bar.update(step + 1 - bar.n)
            if progress:
                bar.set_postfix(loss=f"{losses[-1]:.4g}")
    bar.close()
    synchronize(device)
    seconds = time.perf_counter() - start
    return TrainResult(model=model, ema_model=ema_model, losses=losses, seconds=seconds)
