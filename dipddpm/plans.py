"""Curriculum plans: which image each DIP stage sees (noise plan) and for how many
steps (epoch plan), combined into a list of StagePlan.

Noise plans (noise_plan.name): single, levels (R1 sigma stages), ddpm (R2 x_t stages).
Epoch plans (epoch_plan.name): constant, list, softmax_beta (R2).

Where stage images come from (noise_plan.stage_source): ``clean`` (the reports' code: each
stage is drawn from the clean image) or ``observation`` (only the noisy observation is used,
as a user with one noisy photo would have to): levels stages add noise on top of the
observation, ddpm stages diffuse the observation y = x_{end_t} further.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dipddpm.diffusion.schedule import NoiseSchedule
from dipddpm.errors import ConfigError, require, require_choice

NOISE_PLAN_NAMES = ("single", "levels", "ddpm")
EPOCH_PLAN_NAMES = ("constant", "list", "softmax_beta")
NOISE_KINDS = ("gaussian", "shifted")
STAGE_SOURCES = ("clean", "observation")


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


def _observation_sigmas(cfg: Mapping, observation_sigma: float | None) -> list[float]:
    """Total noise levels of honest levels stages: observation_factors x the observation's sigma."""
    factors = cfg.get("observation_factors")
    allowed = ("a non-empty list of numbers >= 1, multiples of the observation's sigma, noisiest first "
               "(1 = the observation itself)")
    require(isinstance(factors, Sequence) and not isinstance(factors, str) and len(factors) > 0,
            "noise_plan.observation_factors", factors, allowed)
    factors = list(factors)
    require(all(_is_number(f) and f >= 1 for f in factors), "noise_plan.observation_factors", factors, allowed)
    require(_is_number(observation_sigma) and observation_sigma >= 0, "noise_plan.stage_source", "observation",
            "clean, or observation together with the observation's noise level (data.sigma)")
    return [float(f) * float(observation_sigma) for f in factors]


def _noise_levels(cfg: Mapping, schedule: NoiseSchedule | None, observation_sigma: float | None) -> list[dict]:
    """Validate a noise plan; one dict {sigma, t} per stage, in training order."""
    name = cfg.get("name")
    require_choice("noise_plan.name", name, NOISE_PLAN_NAMES)
    source = cfg.get("stage_source", "clean")
    require_choice("noise_plan.stage_source", source, STAGE_SOURCES)
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
        clip = cfg.get("clip", True)
        require(isinstance(clip, bool), "noise_plan.clip", clip, "true or false")
        if source == "observation":
            return [{"sigma": s, "t": None} for s in _observation_sigmas(cfg, observation_sigma)]
        sigmas = cfg.get("sigmas")
        allowed = "a non-empty list of noise levels, each in [0, 1]"
        require(isinstance(sigmas, Sequence) and not isinstance(sigmas, str) and len(sigmas) > 0,
                "noise_plan.sigmas", sigmas, allowed)
        sigmas = list(sigmas)
        require(all(_is_number(s) and 0 <= s <= 1 for s in sigmas),
                "noise_plan.sigmas", sigmas, allowed)
        return [{"sigma": float(s), "t": None} for s in sigmas]
    require(schedule is not None, "noise_plan.name", name, "ddpm plans need a scheduler")
    count, start_t, end_t = cfg.get("count"), cfg.get("start_t"), cfg.get("end_t")
    require(_is_int(count) and count >= 1, "noise_plan.count", count, "an integer >= 1")
    _check_timestep("noise_plan.start_t", start_t, schedule)
    _check_timestep("noise_plan.end_t", end_t, schedule)
    require(end_t <= start_t, "noise_plan.end_t", end_t,
            f"at most start_t ({start_t}): stages run noisiest first")
    return [{"sigma": None, "t": t} for t in time_steps(count, start_t, end_t)]


def _stage_steps(cfg: Mapping, noise_cfg: Mapping, levels: list[dict], schedule: NoiseSchedule | None) -> list[int]:
    """Validate an epoch plan; the step count of each stage (a profile has already scaled it)."""
    name = cfg.get("name")
    require_choice("epoch_plan.name", name, EPOCH_PLAN_NAMES)
    stages = len(levels)
    if name == "constant":
        steps = cfg.get("steps")
        require(_is_int(steps) and steps >= 1, "epoch_plan.steps", steps, "an integer >= 1")
        return [int(steps)] * stages
    if name == "list":
        steps = cfg.get("steps")
        allowed = (f"a list of {stages} step counts, one per stage of "
                   f"noise_plan={noise_cfg.get('name')}")
        is_list = isinstance(steps, Sequence) and not isinstance(steps, str)
        require(is_list and len(steps) == stages, "epoch_plan.steps", steps, allowed)
        steps = list(steps)
        require(all(_is_int(n) and n >= 1 for n in steps), "epoch_plan.steps", steps,
                allowed + ", each an integer >= 1")
        return [int(n) for n in steps]
    require(noise_cfg.get("name") == "ddpm", "epoch_plan.name", name,
            f"softmax_beta needs noise_plan=ddpm (got noise_plan={noise_cfg.get('name')})")
    total = cfg.get("total")
    require(_is_int(total) and total >= 1, "epoch_plan.total", total, "an integer >= 1")
    c = cfg.get("c")
    require(_is_number(c), "epoch_plan.c", c, "a number (report R2: 250 with scheduler=linear, 400 with cosine)")
    min_steps = cfg.get("min_steps", 1)
    require(_is_int(min_steps) and min_steps >= 1, "epoch_plan.min_steps", min_steps, "an integer >= 1")
    betas = [float(schedule.betas[level["t"]]) for level in levels]
    return [max(int(min_steps), n) for n in softmax_beta_steps(betas, int(total), float(c))]


def build_plan(
    noise_plan_cfg: Mapping,
    epoch_plan_cfg: Mapping,
    schedule: NoiseSchedule | None = None,
    observation_sigma: float | None = None,
) -> list[StagePlan]:
    """Stages in training order from a noise plan and an epoch plan.

    A levels plan with stage_source observation takes its sigmas (total noise levels) as
    noise_plan.observation_factors times ``observation_sigma`` (data.sigma).

    constant/list: each stage gets its listed steps. softmax_beta: total is split by
    softmax(-c * betas[t_i]) and each stage gets at least epoch_plan.min_steps (so the sum
    can exceed total). Step counts are taken as written: dipddpm.profile.apply_profile
    scales them first. Raises ConfigError for unusable values.
    """
    levels = _noise_levels(noise_plan_cfg, schedule, observation_sigma)
    steps = _stage_steps(epoch_plan_cfg, noise_plan_cfg, levels, schedule)
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


def _from_observation(
    plan: Sequence[StagePlan],
    clean: torch.Tensor,
    observed: torch.Tensor,
    name: str,
    kind: str,
    clip: bool,
    schedule: NoiseSchedule | None,
    observation_sigma: float | None,
    generator: torch.Generator | None,
) -> list[torch.Tensor]:
    """Honest stage images (stage_source observation): nothing but the observation y and fresh noise.

    levels: y is ``observed`` with noise level s_obs = observation_sigma; a stage of total level
    s > s_obs is y + sqrt(s^2 - s_obs^2) N(0,1) (independent noise adds in variance), clipped when
    clip; a stage with s = s_obs is y itself.
    ddpm / single with t: y = x_{t_obs} of the clean image, t_obs the plan's smallest t (R2's
    observation, drawn first, so it is the image the clean-source plan ends on); a stage t > t_obs
    diffuses y further with q(x_t | x_{t_obs}):
        x_t = sqrt(abar_t / abar_obs) y + sqrt(1 - abar_t / abar_obs) eps,
    eps of noise_plan.noise, and the stage t_obs is y itself.
    """
    if name == "levels":
        if observation_sigma is None:
            raise ConfigError("noise_plan.stage_source", "observation",
                              "clean, or observation together with the observation's noise level (data.sigma)")
        images = []
        for stage in plan:
            if stage.sigma == observation_sigma:
                images.append(observed.float().clone())
                continue
            extra = math.sqrt(stage.sigma**2 - observation_sigma**2)
            image = observed.float() + extra * _draw_noise(observed, "gaussian", generator)
            images.append(image.clamp(0.0, 1.0) if clip else image)
        return images
    if name == "single" and plan[0].t is None:
        return [observed.float().clone() for _ in plan]
    if schedule is None:
        raise ConfigError("noise_plan.name", name, "stages with t need a scheduler")
    t_obs = min(stage.t for stage in plan)
    y = schedule.q_sample(clean, t_obs, _draw_noise(clean, kind, generator))
    y = y.clamp(0.0, 1.0) if clip else y
    abar_obs = float(schedule.alphas_cumprod[t_obs])
    images = []
    for stage in plan:
        if stage.t == t_obs:
            images.append(y.float().clone())
            continue
        ratio = float(schedule.alphas_cumprod[stage.t]) / abar_obs
        image = math.sqrt(ratio) * y + math.sqrt(1.0 - ratio) * _draw_noise(y, kind, generator)
        images.append((image.clamp(0.0, 1.0) if clip else image).float())
    return images


def stage_images(
    plan: Sequence[StagePlan],
    clean: torch.Tensor,
    observed: torch.Tensor,
    noise_plan_cfg: Mapping,
    schedule: NoiseSchedule | None,
    generator: torch.Generator | None,
    observation_sigma: float | None = None,
) -> list[torch.Tensor]:
    """The image of each stage, (1, C, H, W) float32, drawn in stage order from generator.

    clean, observed: (1, C, H, W) in [0, 1]. With noise_plan.stage_source clean (default):
    single: observed (or q_sample(clean, t) when the stage has t); levels: clean + sigma
    N(0,1), clipped to [0, 1] when noise_plan.clip (default true); ddpm: q_sample(clean, t,
    noise) with noise_plan.noise, clipped when noise_plan.clip (default false). With
    stage_source observation: see _from_observation (``observation_sigma``: data.sigma).
    """
    name = noise_plan_cfg.get("name")
    require_choice("noise_plan.name", name, NOISE_PLAN_NAMES)
    source = noise_plan_cfg.get("stage_source", "clean")
    require_choice("noise_plan.stage_source", source, STAGE_SOURCES)
    if clean.dim() != 4 or observed.shape != clean.shape:
        raise ValueError(f"clean and observed must be (1, C, H, W) of one shape, got "
                         f"{tuple(clean.shape)} and {tuple(observed.shape)}")
    clean = clean.float()
    kind = noise_plan_cfg.get("noise", "gaussian")
    clip = noise_plan_cfg.get("clip", name == "levels")
    if source == "observation":
        return _from_observation(plan, clean, observed, name, kind, clip, schedule, observation_sigma, generator)
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
