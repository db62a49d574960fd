"""DDPM beta schedules (linear, cosine) and the formulas of one schedule: the forward
process q(x_t | x_0), the x0 predicted from eps, the posterior q(x_{t-1} | x_t, x_0) and
respacing to a subset of timesteps.

Timesteps are 0-indexed: t = 0 is one noising step, t = T - 1 the last one, and
`alphas_cumprod[t]` is abar for that step. Equation numbers refer to Ho et al. 2020 (DDPM).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch

from dipddpm.errors import require, require_choice

SCHEDULE_NAMES = ("linear", "cosine")


class NoiseSchedule:
    """Float64 buffers of length T derived from a beta sequence.

    betas, alphas = 1 - betas, alphas_cumprod (abar_t), alphas_cumprod_prev (abar_{t-1},
    1.0 at t = 0), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod and
    posterior_variance = beta_t (1 - abar_{t-1}) / (1 - abar_t).
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty sequence of values in (0, 1)")
        self.num_timesteps = int(betas.numel())
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat(
            [torch.ones(1, dtype=torch.float64, device=betas.device), self.alphas_cumprod[:-1]]
        )
        self.sqrt_alphas_cumprod = torch.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - self.alphas_cumprod)
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(T={self.num_timesteps}, beta[0]={self.betas[0].item():.3g}, "
            f"beta[-1]={self.betas[-1].item():.3g})"
        )

    def to(self, device) -> "NoiseSchedule":
        """A copy with every buffer on `device` (still float64)."""
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(moved, name, value.to(device))
        return moved

    def host(self, name: str) -> list[float]:
        """The buffer ``name`` as a list of Python floats (computed once): the per-step
        coefficients of the samplers, without a tensor lookup per step."""
        cache = self.__dict__.setdefault("_host", {})
        if name not in cache:
            cache[name] = getattr(self, name).cpu().tolist()
        return cache[name]

    def _coefficient(self, buffer: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
        """buffer[t] in like's dtype/device, shaped to broadcast over like (B, C, H, W)."""
        if isinstance(t, torch.Tensor):
            index = t.to(device=buffer.device, dtype=torch.long).flatten()
        else:
            index = torch.tensor([int(t)], dtype=torch.long, device=buffer.device)
        if bool(((index < 0) | (index >= self.num_timesteps)).any()):
            raise IndexError(f"timestep {t} outside 0..{self.num_timesteps - 1}")
        values = buffer[index].to(device=like.device, dtype=like.dtype)
        if values.numel() == 1:
            return values.reshape((1,) * like.dim())
        return values.reshape((-1,) + (1,) * (like.dim() - 1))

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

        x0, noise: (B, C, H, W); t: an int, or a LongTensor of shape (B,). Returns a
        tensor of x0's shape, dtype and device.
        """
        signal = self._coefficient(self.sqrt_alphas_cumprod, t, x0)
        spread = self._coefficient(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return signal * x0 + spread * noise.to(device=x0.device, dtype=x0.dtype)

    def predict_x0(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """The x0 that q_sample would turn into x_t with this eps (eq. 4 solved for x0):

            x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)

        x_t, eps: (B, C, H, W); t: an int (the coefficient is a Python float, as the
        samplers use it) or a LongTensor of shape (B,). Not clipped.
        """
        if isinstance(t, torch.Tensor) and t.numel() > 1:
            abar = self._coefficient(self.alphas_cumprod, t, x_t)
        else:
            abar = self.host("alphas_cumprod")[int(t)]
        return (x_t - (1.0 - abar) ** 0.5 * eps) / abar**0.5

    def posterior_mean_coefficients(self, t: int) -> tuple[float, float]:
        """(c_x0, c_xt) of the posterior mean of q(x_{t-1} | x_t, x0) (eq. 7):

            mu_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t
        """
        beta, alpha = self.host("betas")[t], self.host("alphas")[t]
        abar, abar_prev = self.host("alphas_cumprod")[t], self.host("alphas_cumprod_prev")[t]
        return beta * abar_prev**0.5 / (1.0 - abar), (1.0 - abar_prev) * alpha**0.5 / (1.0 - abar)

    def respaced(self, timesteps) -> "NoiseSchedule":
        """The schedule of a chain that visits only ``timesteps`` (ascending, from 0): abar is
        kept at those steps and beta_i = 1 - abar[s_i] / abar[s_{i-1}] (Nichol & Dhariwal's
        respacing, abar[s_{-1}] = 1). Index i of the result is timestep timesteps[i]; a chain
        over every timestep 0..n-1 keeps this schedule's own betas."""
        timesteps = [int(s) for s in timesteps]
        if timesteps == list(range(len(timesteps))):
            return self
        abar = self.alphas_cumprod.cpu()[torch.as_tensor(timesteps)]
        previous = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        return NoiseSchedule(1.0 - abar / previous)


def linear_schedule(num_timesteps: int, beta_start: float, beta_end: float) -> NoiseSchedule:
    """betas = linspace(beta_start, beta_end, num_timesteps)."""
    betas = torch.linspace(float(beta_start), float(beta_end), int(num_timesteps), dtype=torch.float64)
    return NoiseSchedule(betas)


def cosine_schedule(
    num_timesteps: int, s: float = 0.008, min_beta: float = 0.0, max_beta: float = 0.999
) -> NoiseSchedule:
    """Nichol & Dhariwal: f(t) = cos(((t/T + s)/(1 + s)) pi/2)^2 over t = 0..T,
    abar = f / f(0), beta = clip(1 - abar[1:]/abar[:-1], min_beta, max_beta).

    alphas_cumprod is then the cumulative product of the clipped 1 - beta.
    """
    steps = int(num_timesteps)
    grid = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((grid + s) / (1.0 + s) * (math.pi / 2)) ** 2
    abar = f / f[0]
    betas = (1.0 - abar[1:] / abar[:-1]).clamp(float(min_beta), float(max_beta))
    return NoiseSchedule(betas)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build_schedule(cfg: Mapping) -> NoiseSchedule:
    """A NoiseSchedule from a `scheduler` config (name: linear | cosine).

    Keys: num_timesteps; linear: beta_start, beta_end; cosine: s, min_beta, max_beta.
    Other keys (e.g. softmax_c) are ignored here.
    """
    name = cfg.get("name")
    require_choice("scheduler.name", name, SCHEDULE_NAMES)
    steps = cfg.get("num_timesteps")
    require(
        isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
        "scheduler.num_timesteps", steps, "an integer >= 1",
    )
    if name == "linear":
        start, end = cfg.get("beta_start"), cfg.get("beta_end")
        require(_number(start) and 0 < start < 1, "scheduler.beta_start", start,
                "a number with 0 < beta_start <= beta_end < 1")
        require(_number(end) and start <= end < 1, "scheduler.beta_end", end,
                f"a number with beta_start ({start}) <= beta_end < 1")
        return linear_schedule(steps, start, end)
    s = cfg.get("s", 0.008)
    low, high = cfg.get("min_beta", 0.0), cfg.get("max_beta", 0.999)
    require(_number(s) and s >= 0, "scheduler.s", s, "a number >= 0")
    require(_number(high) and 0 < high < 1, "scheduler.max_beta", high, "a number in (0, 1)")
    require(_number(low) and 0 <= low <= high, "scheduler.min_beta", low,
            f"a number with 0 <= min_beta <= max_beta ({high})")
    return cosine_schedule(steps, s, low, high)
