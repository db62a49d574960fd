"""Curriculum plans: which image each DIP stage sees (noise plan) and for how many
steps (epoch plan), combined into a list of StagePlan.

Noise plans (noise_plan.name): single, levels (R1 sigma stages), ddpm (R2 x_t stages).
Epoch plans (epoch_plan.name): constant, list, softmax_beta (R2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dipddpm.errors import ConfigError, require, require_choice
from dipddpm.schedulers import NoiseSchedule

NOISE_PLAN_NAMES = ("single", "levels", "ddpm")
EPOCH_PLAN_NAMES = ("constant", "list", "softmax_beta")
NOISE_KINDS = ("gaussian", "shifted")


@dataclass(frozen=True)
class StagePlan:
    """One stage: its 0-based index, its step count, and the noise level of its image
    (sigma for levels plans, DDPM timestep t for ddpm plans / single with t)."""

    index: int
    steps: int
    sigma: float | None = None
    t: int | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def time_steps(count: int, start_t: int, end_t: int) -> list[int]:
    """`count` timesteps evenly spaced from start_t to end_t, truncated to int (R2)."""
    return [int(v) for v in np.linspace(start_t, end_t, count)]


def softmax_beta_steps(betas_at_stages: Sequence[float], total: int, c: float) -> list[int]:
    """R2's iteration generator: w = softmax(-c * beta), n_i = int(total * w_i) and the
    last stage takes total - sum(others). Returns one step count per stage."""
    logits = -float(c) * np.asarray(betas_at_stages, dtype=np.float64)
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    counts = [int(total * w) for w in weights[:-1]]
    return counts + [int(total) - sum(counts)]


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _timestep_range(schedule: NoiseSchedule | None) -> tuple[int | None, str]:
    if schedule is None:
        return None, "an integer >= 0"
    last = schedule.num_timesteps - 1
    return last, f"an integer in 0..{last} (scheduler.num_timesteps={schedule.num_timesteps})"


def _check_timestep(key: str, value, schedule: NoiseSchedule | None) -> None:
    last, allowed = _timestep_range(schedule)
    ok = _is_int(value) and value >= 0 and (last is None or value <= last)
    require(ok, key, value, allowed)


def _noise_levels(cfg: Mapping, schedule: NoiseSchedule | None) -> list[dict]:
    """Validate a noise plan; one dict {sigma, t} per stage, in training order."""
    name = cfg.get("name")
    require_choice("noise_plan.name", name, NOISE_PLAN_NAMES)
    if name in ("single", "ddpm"):
        require_choice("noise_plan.noise", cfg.get("noise", "gaussian"), NOISE_KINDS)
        clip = cfg.get("clip", False)
        require(isinstance(clip, bool), "noise_plan.clip", clip, "true or false")
    if name == "single":
        t = cfg.get("t")
        if t is not None:
            require(schedule is not None, "noise_plan.t", t,
                    "null, or a timestep together with a scheduler")
            _check_timestep("noise_plan.t", t, schedule)
            t = int(t)
        return [{"sigma": None, "t": t}]
    if name == "levels":
        sigmas = cfg.get("sigmas")
        allowed = "a non-empty list of noise levels, each in [0, 1]"
        require(isinstance(sigmas, Sequence) and not isinstance(sigmas, str) and len(sigmas) > 0,
                "noise_plan.sigmas", sigmas, allowed)
        sigmas = list(sigmas)
        require(all(_is_number(s) and 0 <= s <= 1 for s in sigmas),
                "noise_plan.sigmas", sigmas, allowed)
        clip = cfg.get("clip", True)
        require(isinstance(clip, bool), "noise_plan.clip", clip, "true or false")
        return [{"sigma": float(s), "t": None} for s in sigmas]
    require(schedule is not None, "noise_plan.name", name, "ddpm plans need a scheduler")
    count, start_t, end_t = cfg.get("count"), cfg.get("start_t"), cfg.get("end_t")
    require(_is_int(count) and count >= 1, "noise_plan.count", count, "an integer >= 1")
    _check_timestep("noise_plan.start_t", start_t, schedule)
    _check_timestep("noise_plan.end_t", end_t, schedule)
    require(end_t <= start_t, "noise_plan.end_t", end_t,
            f"at most start_t ({start_t}): stages run noisiest first")
    return [{"sigma": None, "t": t} for t in time_steps(count, start_t, end_t)]


def _scaled(steps: int, step_scale: float, min_steps: int) -> int:
    return max(int(min_steps), int(round(steps * step_scale)))


def _stage_steps(
    cfg: Mapping,
    noise_cfg: Mapping,
    levels: list[dict],
    schedule: NoiseSchedule | None,
    step_scale: float,
    min_steps: int,
    softmax_c: float | None,
) -> list[int]:
    """Validate an epoch plan; the scaled step count of each stage."""
    name = cfg.get("name")
    require_choice("epoch_plan.name", name, EPOCH_PLAN_NAMES)
    stages = len(levels)
    if name == "constant":
        steps = cfg.get("steps")
        require(_is_int(steps) and steps >= 1, "epoch_plan.steps", steps, "an integer >= 1")
        return [_scaled(int(steps), step_scale, min_steps)] * stages
    if name == "list":
        steps = cfg.get("steps")
        allowed = (f"a list of {stages} step counts, one per stage of "
                   f"noise_plan={noise_cfg.get('name')}")
        is_list = isinstance(steps, Sequence) and not isinstance(steps, str)
        require(is_list and len(steps) == stages, "epoch_plan.steps", steps, allowed)
        steps = list(steps)
        require(all(_is_int(n) and n >= 1 for n in steps), "epoch_plan.steps", steps,
                allowed + ", each an integer >= 1")
        return [_scaled(int(n), step_scale, min_steps) for n in steps]
    require(noise_cfg.get("name") == "ddpm", "epoch_plan.name", name,
            f"softmax_beta needs noise_plan=ddpm (got noise_plan={noise_cfg.get('name')})")
    total = cfg.get("total", 2000)
    require(_is_int(total) and total >= 1, "epoch_plan.total", total, "an integer >= 1")
    c = cfg.get("c")
    if c is None:
        c = softmax_c
    require(_is_number(c), "epoch_plan.c", cfg.get("c"),
            "a number, or null with the scheduler's softmax_c passed as softmax_c")
    betas = [float(schedule.betas[level["t"]]) for level in levels]
    scaled_total = max(int(round(total * step_scale)), 0)
    return [max(int(min_steps), n) for n in softmax_beta_steps(betas, scaled_total, float(c))]


def build_plan(
    noise_plan_cfg: Mapping,
    epoch_plan_cfg: Mapping,
    schedule: NoiseSchedule | None = None,
    step_scale: float = 1.0,
    min_steps: int = 1,
    softmax_c: float | None = None,
) -> list[StagePlan]:
    """Stages in training order from a noise plan and an epoch plan.

    constant/list: each stage gets max(min_steps, round(steps * step_scale)).
    softmax_beta: total is scaled and rounded first, then split by
    softmax(-c * betas[t_i]); each stage gets at least min_steps (so the sum can
    exceed the scaled total when min_steps binds). `softmax_c` is used when
    epoch_plan.c is null (the caller passes scheduler.softmax_c).
    Raises ConfigError for unusable values.
    """
    require(_is_number(step_scale) and step_scale > 0, "profile.step_scale", step_scale,
            "a number > 0")
    require(_is_int(min_steps) and min_steps >= 1, "profile.min_steps", min_steps,
            "an integer >= 1")
    levels = _noise_levels(noise_plan_cfg, schedule)
    steps = _stage_steps(epoch_plan_cfg, noise_plan_cfg, levels, schedule,
                         float(step_scale), int(min_steps), softmax_c)
    return [
        StagePlan(index=i, steps=n, sigma=level["sigma"], t=level["t"])
        for i, (level, n) in enumerate(zip(levels, steps))
    ]


def _draw_noise(like: torch.Tensor, kind: str, generator: torch.Generator | None) -> torch.Tensor:
    """Noise of like's shape, float32 on like's device: N(0,1) or 0.5 + 0.5 N(0,1)."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float32, device=device)
    noise = noise.to(like.device)
    return 0.5 + 0.5 * noise if kind == "shifted" else noise


def stage_images(
    plan: Sequence[StagePlan],
    clean: torch.Tensor,
    observed: torch.Tensor,
    noise_plan_cfg: Mapping,
    schedule: NoiseSchedule | None,
    generator: torch.Generator | None,
) -> list[torch.Tensor]:
    """The image of each stage, (1, C, H, W) float32, drawn in stage order from generator.

    clean, observed: (1, C, H, W) in [0, 1]. single: observed (or q_sample(clean, t)
    when the stage has t); levels: clean + sigma N(0,1), clipped to [0, 1] when
    noise_plan.clip (default true); ddpm: q_sample(clean, t, noise) with noise_plan.noise,
    clipped when noise_plan.clip (default false).
    """
    name = noise_plan_cfg.get("name")
    require_choice("noise_plan.name", name, NOISE_PLAN_NAMES)
    if clean.dim() != 4 or observed.shape != clean.shape:
        raise ValueError(f"clean and observed must be (1, C, H, W) of one shape, got "
                         f"{tuple(clean.shape)} and {tuple(observed.shape)}")
    clean = clean.float()
    kind = noise_plan_cfg.get("noise", "gaussian")
    clip = noise_plan_cfg.get("clip", name == "levels")
    images = []
    for stage in plan:
        if name == "levels":
            image = clean + stage.sigma * _draw_noise(clean, "gaussian", generator)
        elif stage.t is None:
            image = observed.float().clone()
        else:
            if schedule is None:
                raise ConfigError("noise_plan.name", name, "stages with t need a scheduler")
            image = schedule.q_sample(clean, stage.t, _draw_noise(clean, kind, generator))
        if clip and not (name == "single" and stage.t is None):
            image = image.clamp(0.0, 1.0)
        images.append(image.float())
    return images


def describe_plan(plan: Sequence[StagePlan]) -> str:
    """A fixed-width table: stage, t, sigma, steps and the running total of steps."""
    lines = [f"{'stage':>5} {'t':>6} {'sigma':>8} {'steps':>7} {'total':>7}"]
    total = 0
    for stage in plan:
        total += stage.steps
        t = "-" if stage.t is None else str(stage.t)
        sigma = "-" if stage.sigma is None else f"{stage.sigma:g}"
        lines.append(f"{stage.index:>5} {t:>6} {sigma:>8} {stage.steps:>7} {total:>7}")
    return "\n".join(lines)
