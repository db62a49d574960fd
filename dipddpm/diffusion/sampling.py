"""Reverse-process samplers for eps-prediction models: ancestral DDPM and DDIM, one chain loop.

As in diffusers' schedulers, a :class:`Sampler` first sets the timesteps it visits
(``set_timesteps``: ``calls`` of them, evenly spaced from ``t_start`` down to 0), then
``step`` turns the model's eps at one of them into the next sample. A chain that skips
timesteps runs on the respaced schedule (``NoiseSchedule.respaced``), so the ancestral
sampler works at any number of network calls, like DDIM. :func:`sample` builds the sampler
a method's config asks for and runs the chain.

Timesteps are 0-indexed as in ``dipddpm.diffusion.schedule``. Schedule coefficients are
Python floats (float64) applied to the sample in its dtype. The chain switches the model to
eval mode and restores its mode after; equation numbers are Ho et al. 2020 (DDPM) and
Song et al. 2021 (DDIM).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from dipddpm.errors import require, require_choice
from dipddpm.runtime import model_device, synchronize

SAMPLERS = ("ancestral", "ddim")
VARIANCES = ("beta", "posterior")
SAMPLE_KEYS = ("sampler", "eta", "variance", "noise_until", "clip_x0")


@dataclass
class SampleResult:
    """samples: (B, C, H, W) tensor; seconds: wall time (cuda-synchronised);
    model_calls: number of network evaluations."""

    samples: torch.Tensor
    seconds: float
    model_calls: int


def chain_timesteps(t_start: int, calls: int) -> list[int]:
    """``calls`` timesteps evenly spaced from t_start down to 0, descending: the rounded
    values of linspace(0, t_start, calls) without repeats ([t_start] for one call)."""
    if calls == 1:
        return [int(t_start)]
    return sorted({int(v) for v in np.round(np.linspace(0, t_start, int(calls)))}, reverse=True)


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


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


class _EvalMode:
    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


class Sampler:
    """One reverse chain of ``kind`` ancestral | ddim over a NoiseSchedule.

    variance (ancestral): sigma_t^2 = beta_t ("beta") or the posterior variance. eta (ddim):
    0 is deterministic, 1 has the ancestral chain's posterior variance. noise_until: noise is
    added only at steps with t > noise_until (0: every step but the last, the standard rule).
    clip_x0: clip the predicted x0 (True = [-1, 1], or a (low, high) pair) before the update.
    """

    def __init__(self, schedule, kind: str = "ancestral", *, variance: str = "beta", eta: float = 0.0,
                 noise_until: int = 0, clip_x0=False):
        require_choice("sampler", kind, SAMPLERS)
        require_choice("variance", variance, VARIANCES)
        require(isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta >= 0, "eta", eta, "a number >= 0")
        require(_is_int(noise_until) and noise_until >= 0, "noise_until", noise_until, "an integer >= 0")
        self.schedule, self.kind, self.variance = schedule, kind, variance
        self.eta, self.noise_until, self.clip = float(eta), int(noise_until), _clip_range(clip_x0)
        self.set_timesteps()

    def set_timesteps(self, calls: int | None = None, t_start: int | None = None) -> list[int]:
        """Visit ``calls`` timesteps (default t_start + 1: all of them) from ``t_start``
        (default T - 1) down to 0; returns them, descending."""
        top = self.schedule.num_timesteps - 1
        t_start = top if t_start is None else t_start
        require(_is_int(t_start) and 0 <= t_start <= top, "t_start", t_start, f"null or an integer in 0..{top}")
        calls = int(t_start) + 1 if calls is None else calls
        require(_is_int(calls) and 1 <= calls <= t_start + 1, "calls", calls, f"an integer in 1..{t_start + 1}")
        self.timesteps = chain_timesteps(int(t_start), int(calls))
        if self.kind == "ancestral":  # the chain's own schedule: index i is the i-th visited timestep from 0
            self.chain = self.schedule.respaced(sorted(self.timesteps))
            self._index = {t: i for i, t in enumerate(sorted(self.timesteps))}
        else:  # DDIM jumps between timesteps of the schedule itself
            self.chain, self._index = self.schedule, {t: t for t in self.timesteps}
        return self.timesteps

    def adds_noise(self, position: int) -> bool:
        """Whether the step at ``position`` (0 = first visited timestep) draws a z."""
        t = self.timesteps[position]
        if t <= self.noise_until:
            return False
        if self.kind == "ancestral":
            return True
        return self._ddim_sigma(position) > 0

    def _abar_next(self, position: int) -> float:
        """abar at the next visited timestep (1.0 after the last)."""
        nxt = position + 1
        return self.schedule.host("alphas_cumprod")[self.timesteps[nxt]] if nxt < len(self.timesteps) else 1.0

    def _ddim_sigma(self, position: int) -> float:
        # DDIM eq. 16: sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)
        a_t, a_s = self.schedule.host("alphas_cumprod")[self.timesteps[position]], self._abar_next(position)
        return self.eta * ((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s)) ** 0.5

    def step(self, eps: torch.Tensor, position: int, x: torch.Tensor, z: torch.Tensor | None,
             want_x0: bool = True):
        """(x at the next visited timestep, predicted x0 before clipping) from the model's
        ``eps`` at the step ``position`` of the chain and ``z`` (None when no noise is added).
        The plain ancestral step does not need x0: with want_x0 False it is not computed (None)."""
        i = self._index[self.timesteps[position]]
        raw_x0 = x0 = None
        if want_x0 or self.clip is not None or self.kind == "ddim":
            raw_x0 = self.chain.predict_x0(x, i, eps)
            x0 = raw_x0 if self.clip is None else raw_x0.clamp(*self.clip)
        if self.kind == "ancestral":
            beta, alpha = self.chain.host("betas")[i], self.chain.host("alphas")[i]
            abar = self.chain.host("alphas_cumprod")[i]
            if self.clip is None:
                # eq. 11: mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
                mean = (x - beta / (1.0 - abar) ** 0.5 * eps) / alpha**0.5
            else:
                # eq. 7: the posterior mean given the clipped x0
                coef_x0, coef_xt = self.chain.posterior_mean_coefficients(i)
                mean = coef_x0 * x0 + coef_xt * x
            if z is None:
                return mean, raw_x0
            sigma2 = beta if self.variance == "beta" else self.chain.host("posterior_variance")[i]
            return mean + sigma2**0.5 * z, raw_x0
        a_t, a_s = self.chain.host("alphas_cumprod")[i], self._abar_next(position)
        if self.clip is not None:
            eps = (x - a_t**0.5 * x0) / (1.0 - a_t) ** 0.5
        sigma = self._ddim_sigma(position)
        # DDIM eq. 12: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z
        x = a_s**0.5 * x0 + max(1.0 - a_s - sigma**2, 0.0) ** 0.5 * eps
        return (x if z is None else x + sigma * z), raw_x0

    @torch.no_grad()
    def run(self, model: nn.Module, shape_or_x, *, generator: torch.Generator | None = None, device=None,
            noise_fn: Callable[[tuple], torch.Tensor] | None = None,
            callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> SampleResult:
        """The chain over the set timesteps, one model call each.

        shape_or_x: a shape (B, C, H, W) to start from noise (noise_fn(shape) if given, else
        N(0, I) from ``generator``), or the starting tensor itself. Every z is noise_fn(shape)
        or N(0, I) from ``generator``. The model gets the timesteps as a (B,) LongTensor.
        callback(t, x_t, x0) sees every visited t with the predicted x0 before clipping.
        """
        device = torch.device(device) if device is not None else model_device(model)
        with _EvalMode(model):
            synchronize(device)
            start = time.perf_counter()
            if isinstance(shape_or_x, torch.Tensor):
                x = shape_or_x.to(device=device, dtype=torch.float32).clone()
            elif noise_fn is not None:
                x = noise_fn(tuple(int(s) for s in shape_or_x)).to(device=device, dtype=torch.float32)
            else:
                x = _gaussian(tuple(int(s) for s in shape_or_x), generator, device)
            batch = x.shape[0]
            for position, t in enumerate(self.timesteps):
                eps = model(x, torch.full((batch,), t, dtype=torch.long, device=device))
                z = None
                if self.adds_noise(position):
                    z = noise_fn(tuple(x.shape)).to(device) if noise_fn is not None else _gaussian(x.shape, generator, device)
                x_next, x0 = self.step(eps, position, x, z, want_x0=callback is not None)
                if callback is not None:
                    callback(t, x, x0)
                x = x_next
            synchronize(device)
            seconds = time.perf_counter() - start
        return SampleResult(samples=x, seconds=seconds, model_calls=len(self.timesteps))


def sample(model: nn.Module, schedule, shape_or_x, *, sampler: str = "ancestral", calls: int | None = None,
           t_start: int | None = None, variance: str = "beta", eta: float = 0.0, noise_until: int = 0,
           clip_x0=False, generator: torch.Generator | None = None, device=None,
           noise_fn: Callable[[tuple], torch.Tensor] | None = None,
           callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> SampleResult:
    """Run the ``sampler`` chain with ``calls`` network calls from ``t_start`` (defaults: every
    timestep from T - 1); the other arguments as in :class:`Sampler` and :meth:`Sampler.run`."""
    chain = Sampler(schedule, sampler, variance=variance, eta=eta, noise_until=noise_until, clip_x0=clip_x0)
    chain.set_timesteps(calls, t_start)
    return chain.run(model, shape_or_x, generator=generator, device=device, noise_fn=noise_fn, callback=callback)


def sample_options(cfg_sample) -> dict:
    """The keyword arguments of :func:`sample` set by a method's ``sample`` config (sampler,
    eta, variance, noise_until, clip_x0; absent keys keep the defaults)."""
    return {key: cfg_sample[key] for key in SAMPLE_KEYS if key in cfg_sample}


def validate_sample_config(cfg_sample, prefix: str = "method.sample") -> None:
    """ConfigError naming ``prefix.<key>`` for a bad sampler, eta, variance or noise_until."""
    options = sample_options(cfg_sample)
    require_choice(f"{prefix}.sampler", options.get("sampler", "ancestral"), SAMPLERS)
    require_choice(f"{prefix}.variance", options.get("variance", "beta"), VARIANCES)
    eta = options.get("eta", 0.0)
    require(isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta >= 0, f"{prefix}.eta", eta,
            "a number >= 0 (0: deterministic DDIM)")
    until = options.get("noise_until", 0)
    require(_is_int(until) and until >= 0, f"{prefix}.noise_until", until,
            "an integer >= 0 (noise only for t > noise_until; 0 is standard DDPM)")
    clip = options.get("clip_x0", False)
    require(isinstance(clip, bool), f"{prefix}.clip_x0", clip, "true or false (clip the predicted x0 to [-1, 1])")
