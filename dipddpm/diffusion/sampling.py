"""Reverse-process samplers for eps-prediction models: ancestral DDPM and DDIM.

Timesteps are 0-indexed as in ``dipddpm.schedulers``: the chain starts at some
``t_start <= T - 1`` and the model is called once per visited timestep. Schedule
coefficients are float64 on the host; they are applied to the sample in its dtype.
Both samplers switch the model to eval mode for the run and restore its mode after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from dipddpm.errors import require, require_choice

VARIANCES = ("beta", "posterior")


@dataclass
class SampleResult:
    """samples: (B, C, H, W) tensor; seconds: wall time (cuda-synchronised);
    model_calls: number of network evaluations. Unpacks as (samples, seconds)."""

    samples: torch.Tensor
    seconds: float
    model_calls: int

    def __iter__(self):
        return iter((self.samples, self.seconds))


def predict_x0(schedule, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); t an int or a (B,) LongTensor."""
    abar = schedule.alphas_cumprod
    if isinstance(t, torch.Tensor) and t.numel() > 1:
        a = abar.to(x_t.device)[t.to(x_t.device).long()].to(x_t.dtype).reshape(-1, *([1] * (x_t.dim() - 1)))
        return (x_t - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    a = float(abar[int(t)])
    return (x_t - (1.0 - a) ** 0.5 * eps) / a**0.5


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resolve_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _gaussian(shape, generator, device) -> torch.Tensor:
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _clip_range(clip_x0):
    if clip_x0 is True:
        return (-1.0, 1.0)
    if clip_x0 is False or clip_x0 is None:
        return None
    low, high = clip_x0
    return (float(low), float(high))


def _start(shape_or_x, device, generator, noise_fn):
    if isinstance(shape_or_x, torch.Tensor):
        return shape_or_x.to(device=device, dtype=torch.float32).clone()
    shape = tuple(int(s) for s in shape_or_x)
    if noise_fn is not None:
        return noise_fn(shape).to(device=device, dtype=torch.float32)
    return _gaussian(shape, generator, device)


class _EvalMode:
    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _check_t_start(schedule, t_start) -> int:
    top = schedule.num_timesteps - 1
    t_start = top if t_start is None else t_start
    require(isinstance(t_start, (int, np.integer)) and 0 <= t_start <= top, "t_start", t_start,
            f"null or an integer in 0..{top}")
    return int(t_start)


@torch.no_grad()
def ancestral_sample(
    model: nn.Module,
    schedule,
    shape_or_x,
    *,
    t_start: int | None = None,
    variance: str = "beta",
    generator: torch.Generator | None = None,
    device=None,
    noise_fn: Callable[[tuple], torch.Tensor] | None = None,
    clip_x0=False,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> SampleResult:
    """DDPM ancestral sampling from t_start (default T-1) down to 0: t_start + 1 model calls.

    shape_or_x: a shape (B, C, H, W) to start from noise (noise_fn(shape) if given, else
    N(0, I)), or the starting tensor x_{t_start} itself. Each step computes
    eps = model(x_t, t) and mean = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t),
    then adds sigma_t z for t > 0 with sigma_t^2 = beta_t ("beta") or the posterior
    variance ("posterior"); z = noise_fn(shape) if given, else N(0, I). With clip_x0
    (True = [-1, 1], or a (low, high) pair) the predicted x0 is clipped and the mean is
    the posterior mean given that x0. callback(t, x_t, x0_pred) is called at every step.
    Returns SampleResult(samples x_0, seconds, model_calls).
    """
    require_choice("variance", variance, VARIANCES)
    t_start = _check_t_start(schedule, t_start)
    device = _resolve_device(model, device)
    clip = _clip_range(clip_x0)
    betas = schedule.betas.cpu().tolist()
    alphas = schedule.alphas.cpu().tolist()
    abar = schedule.alphas_cumprod.cpu().tolist()
    abar_prev = schedule.alphas_cumprod_prev.cpu().tolist()
    sigmas2 = betas if variance == "beta" else schedule.posterior_variance.cpu().tolist()
    calls = 0
    with _EvalMode(model):
        _synchronize(device)
        start = time.perf_counter()
        x = _start(shape_or_x, device, generator, noise_fn)
        batch = x.shape[0]
        for t in range(t_start, -1, -1):
            t_batch = torch.full((batch,), t, dtype=torch.long, device=device)
            eps = model(x, t_batch)
            calls += 1
            x0_pred = None
            if clip is not None or callback is not None:
                x0_pred = (x - (1.0 - abar[t]) ** 0.5 * eps) / abar[t] ** 0.5
                if clip is not None:
                    x0_pred = x0_pred.clamp(*clip)
            if callback is not None:
                callback(t, x, x0_pred)
            if clip is None:
                mean = (x - betas[t] / (1.0 - abar[t]) ** 0.5 * eps) / alphas[t] ** 0.5
            else:
                coef_x0 = betas[t] * abar_prev[t] ** 0.5 / (1.0 - abar[t])
                coef_xt = (1.0 - abar_prev[t]) * alphas[t] ** 0.5 / (1.0 - abar[t])
                mean = coef_x0 * x0_pred + coef_xt * x
            if t > 0:
                z = noise_fn(tuple(x.shape)).to(device) if noise_fn is not None else _gaussian(x.shape, generator, device)
                x = mean + sigmas2[t] ** 0.5 * z
            else:
                x = mean
        _synchronize(device)
        seconds = time.perf_counter() - start
    return SampleResult(samples=x, seconds=seconds, model_calls=calls)


def ddim_timesteps(t_start: int, num_steps: int) -> list[int]:
    """num_steps distinct timesteps evenly spaced from t_start down to 0 (just [t_start] for one step)."""
    if num_steps == 1:
        return [t_start]
    return [int(v) for v in np.round(np.linspace(t_start, 0, num_steps))]


@torch.no_grad()
def ddim_sample(
    model: nn.Module,
    schedule,
    shape_or_x,
    *,
    num_steps: int,
    eta: float = 0.0,
    t_start: int | None = None,
    generator: torch.Generator | None = None,
    device=None,
    clip_x0=False,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> SampleResult:
    """DDIM sampling over ``ddim_timesteps(t_start, num_steps)``: num_steps model calls.

    For consecutive visited steps t > s (s = -1 after the last, with abar_{-1} = 1):
    x0 = predict_x0(x_t, eps), sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s),
    x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z. eta = 0 is deterministic.
    shape_or_x, clip_x0 and callback as in :func:`ancestral_sample`.
    """
    t_start = _check_t_start(schedule, t_start)
    require(isinstance(num_steps, (int, np.integer)) and 1 <= num_steps <= t_start + 1, "num_steps", num_steps,
            f"an integer in 1..{t_start + 1}")
    require(isinstance(eta, (int, float)) and eta >= 0, "eta", eta, "a number >= 0")
    device = _resolve_device(model, device)
    clip = _clip_range(clip_x0)
    abar = schedule.alphas_cumprod.cpu().tolist()
    steps = ddim_timesteps(t_start, int(num_steps))
    calls = 0
    with _EvalMode(model):
        _synchronize(device)
        start = time.perf_counter()
        x = _start(shape_or_x, device, generator, None)
        batch = x.shape[0]
        for i, t in enumerate(steps):
            a_t = abar[t]
            a_s = abar[steps[i + 1]] if i + 1 < len(steps) else 1.0
            eps = model(x, torch.full((batch,), t, dtype=torch.long, device=device))
            calls += 1
            x0_pred = (x - (1.0 - a_t) ** 0.5 * eps) / a_t**0.5
            if clip is not None:
                x0_pred = x0_pred.clamp(*clip)
                eps = (x - a_t**0.5 * x0_pred) / (1.0 - a_t) ** 0.5
            if callback is not None:
                callback(t, x, x0_pred)
            sigma = eta * ((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)) ** 0.5
            x = a_s**0.5 * x0_pred + max(1.0 - a_s - sigma**2, 0.0) ** 0.5 * eps
            if sigma > 0:
                x = x + sigma * _gaussian(x.shape, generator, device)
        _synchronize(device)
        seconds = time.perf_counter() - start
    return SampleResult(samples=x, seconds=seconds, model_calls=calls)
