"""The DIP optimisation loop shared by every DIP method.

A run is a sequence of stages; each stage has its own network input and target and a
number of steps. The same network and (unless reset) the same optimiser run through
all stages. Tensors are (1, C, H, W) on the run's device, images in [0, 1].

Nothing on a non-evaluation step waits for the device: the loss check, the output
average and the no-reference statistic stay on the device; PSNR/SSIM and the early-stop
decision happen only at evaluation points.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch

from dipddpm.early_stop import NoStop
from dipddpm.errors import DivergedError
from dipddpm.metrics import psnr_torch, ssim
from dipddpm.progress import progress_bar


@dataclass
class Stage:
    """One stage: ``steps`` updates from ``net_input`` (1, Cin, H, W) towards ``target`` (1, C, H, W)."""

    index: int
    steps: int
    net_input: torch.Tensor
    target: torch.Tensor
    info: dict = field(default_factory=dict)


@dataclass
class DipSettings:
    lr: float = 0.01
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    reg_noise_std: float = 0.0
    ema: float = 0.0
    eval_every: int = 50
    reset_optimizer_per_stage: bool = False
    restore_best: bool = False
    psnr_metric: str = "float"
    evaluate_ssim: bool = True
    progress: bool = False
    description: str = "dip"


@dataclass
class StageSummary:
    index: int
    steps_run: int
    stop_step: int
    stopped_early: bool
    psnr_best: float | None
    ssim_best: float | None
    best_step: int | None
    info: dict


@dataclass
class DipResult:
    """Outputs (1, C, H, W) clipped to [0, 1]; ``best`` needs a clean image; ``stopped`` is
    what the stopping rule returns (its choice, or the final output)."""

    final: torch.Tensor
    best: torch.Tensor | None
    stopped: torch.Tensor
    best_step: int | None
    curve: list[dict]
    stages: list[StageSummary]
    loss_final: float
    steps_run: int
    seconds: float


def _psnr(reference: torch.Tensor, estimate: torch.Tensor, metric: str) -> float:
    if metric == "uint8":
        quantise = lambda x: torch.round(x.clamp(0, 1) * 255.0)  # noqa: E731
        return float(psnr_torch(quantise(reference), quantise(estimate), data_range=255.0))
    return float(psnr_torch(reference, estimate, data_range=1.0))


def _ssim(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    to_hwc = lambda x: x[0].detach().float().cpu().numpy().transpose(1, 2, 0)  # noqa: E731
    return ssim(to_hwc(reference), to_hwc(estimate), data_range=1.0)


def _make_optimizer(net, settings: DipSettings):
    return torch.optim.Adam(
        net.parameters(), lr=settings.lr, betas=tuple(settings.betas), weight_decay=settings.weight_decay
    )


def fit_dip(
    net: torch.nn.Module,
    stages: list[Stage],
    settings: DipSettings,
    early_stop=None,
    clean: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> DipResult:
    """Optimise ``net`` through ``stages``; evaluate against ``clean`` when given.

    Evaluation points: step 0 and every ``eval_every``-th step of a stage, every
    ``early_stop.every``-th step when the rule has one, and each stage's last step.
    The evaluated output is the output of that step's forward pass (averaged when
    ``ema`` > 0), clipped to [0, 1]. Raises DivergedError on a NaN/inf loss.
    """
    early_stop = early_stop or NoStop()
    if early_stop.uses_clean_image and clean is None:
        raise ValueError("early stopping on PSNR needs the clean image")
    device = stages[0].target.device
    net.train()
    optimizer = _make_optimizer(net, settings)
    first_bad_step = torch.tensor(-1, dtype=torch.int64, device=device)
    average = None
    curve: list[dict] = []
    summaries: list[StageSummary] = []
    best_psnr, best_output, best_step = -math.inf, None, None
    best_state = None
    global_step = 0
    loss = torch.zeros((), device=device)
    shown = None
    stop_every = getattr(early_stop, "every", None)
    started = time.perf_counter()
    bar = progress_bar(sum(s.steps for s in stages), settings.description, settings.progress)
    try:
        for stage in stages:
            if stage.index > 0 and settings.reset_optimizer_per_stage:
                optimizer = _make_optimizer(net, settings)
            early_stop.start_stage(stage.index)
            stage_best = (-math.inf, None, None)
            stopped_early, stop_step = False, stage.steps - 1
            for step in range(stage.steps):
                net_input = stage.net_input
                if settings.reg_noise_std > 0:
                    jitter = torch.randn(net_input.shape, generator=generator, device=device)
                    net_input = net_input + settings.reg_noise_std * jitter
                output = net(net_input)
                loss = torch.mean((output - stage.target) ** 2)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    bad = ~torch.isfinite(loss)
                    first_bad_step = torch.where(
                        bad & (first_bad_step < 0), torch.full_like(first_bad_step, global_step), first_bad_step
                    )
                    shown = output.detach()
                    if settings.ema > 0:
                        average = shown.clone() if average is None else average.mul_(settings.ema).add_(shown, alpha=1 - settings.ema)
                        shown = average
                    shown = shown.clamp(0.0, 1.0)
                    early_stop.observe(step, shown)
                last = step == stage.steps - 1
                if not (last or step % settings.eval_every == 0 or (stop_every and step % stop_every == 0)):
                    global_step += 1
                    bar.update(1)
                    continue
                loss_value = float(loss.detach())
                bad_at = int(first_bad_step)
                if bad_at >= 0:
                    raise DivergedError(bad_at, loss_value)
                row = {"step": global_step, "stage": stage.index, "stage_step": step, "loss": loss_value,
                       "psnr": None, "ssim": None, "psnr_noisy": _psnr(stage.target.clamp(0, 1), shown, "float"),
                       "nr_stat": early_stop.last_variance()}
                if clean is not None:
                    row["psnr"] = _psnr(clean, shown, settings.psnr_metric)
                    if settings.evaluate_ssim:
                        row["ssim"] = _ssim(clean, shown)
                    if row["psnr"] > best_psnr:
                        best_psnr, best_output, best_step = row["psnr"], shown.clone(), global_step
                    if row["psnr"] > stage_best[0]:
                        stage_best = (row["psnr"], row["ssim"], global_step)
                stop = early_stop.check(step, row["psnr"])
                if settings.restore_best and getattr(early_stop, "improved", False):
                    best_state = copy.deepcopy(net.state_dict())
                curve.append(row)
                global_step += 1
                bar.update(1)
                if stop and not last:
                    stopped_early, stop_step = True, step
                    bar.update(stage.steps - step - 1)
                    break
            summaries.append(StageSummary(
                index=stage.index, steps_run=stop_step + 1, stop_step=stop_step, stopped_early=stopped_early,
                psnr_best=None if stage_best[1] is None and stage_best[0] == -math.inf else stage_best[0],
                ssim_best=stage_best[1], best_step=stage_best[2], info=dict(stage.info),
            ))
            if settings.restore_best and best_state is not None:
                net.load_state_dict(best_state)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    final = shown.clone()
    chosen = early_stop.chosen_output()
    if chosen is not None:
        stopped = chosen.clone()
    elif settings.restore_best and best_output is not None:
        stopped = best_output
    else:
        stopped = final
    return DipResult(
        final=final, best=best_output, stopped=stopped, best_step=best_step, curve=curve, stages=summaries,
        loss_final=float(loss.detach()), steps_run=global_step, seconds=seconds,
    )
