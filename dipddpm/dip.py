"""The DIP optimisation loop shared by every DIP method.

One file on purpose (about 500 lines): the loop, its settings, its result and the per-step
choices it makes (scoring pass, early-stop observation, best weights, collapse check) are one
mechanism; split, every DIP method would have to assemble the pieces again.

A run is a sequence of stages; each stage has its own network input and target and a
number of steps. The same network and (unless reset) the same optimiser run through
all stages. Tensors are (1, C, H, W) on the run's device, images in [0, 1].

Nothing on a non-evaluation step waits for the device: the loss check, the output
average and the no-reference statistic stay on the device; PSNR/SSIM and the early-stop
decision happen only at evaluation points.

What an evaluation scores (``score_pass``): ``step_output``, the output of the step's own
training forward pass, computed before its optimiser step (averaged when ``ema`` > 0);
or ``eval_forward`` (report R2's code), a fresh no-grad forward pass in eval mode
(BatchNorm on its running averages) after the optimiser step. Either way the image is
clipped to [0, 1]. The best weights (``restore_best``) are those that produced the best
scored image.

What a run returns as ``final`` (``final_from``): ``last_output``, the last scored image;
``fresh_pass``, one more no-grad forward pass with the weights training ended with; or
``stopped``, the image the stopping rule chose (ES-WMV: the returned image, EMA-averaged when
EMA is on, at the variance minimum), which is the last scored image when no rule chose one.

A rule that stops a run ends that run's training for the rest of the stage: its steps, loss,
last output (for the collapse test) and last image are those of its stop step. A later stage
trains it again (the rules restart per stage).

The loop itself (:func:`run_loop`) trains K independent runs at once: row k of every
batched tensor belongs to run k. ``fit_dip`` is the K = 1 case with an ordinary
module; :mod:`dipddpm.replicas` supplies K networks trained as one batched computation.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from dipddpm.early_stop import NoStop
from dipddpm.errors import DivergedError
from dipddpm.metrics import psnr_torch_batched, ssim, uint8_levels
from dipddpm.progress import progress_bar

BAR_CHUNK = 25  # progress-bar updates are batched: at most one per this many steps


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
    """Optimiser, averaging and evaluation settings, plus execution options that leave
    the mathematics unchanged (``fused_adam``, ``channels_last``, ``compile``,
    ``cudnn_benchmark``, ``keep_cpu_memory``) or change only the precision
    (``autocast``: None or "bf16")."""

    lr: float = 0.01
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    reg_noise_std: float = 0.0
    ema: float = 0.0
    eval_every: int = 50
    reset_optimizer_per_stage: bool = False
    restore_best: bool = False
    psnr_metric: str = "float"
    uint8_quantise: str = "round"
    score_pass: str = "step_output"
    final_from: str = "last_output"
    evaluate_ssim: bool = True
    progress: bool = False
    description: str = "dip"
    fused_adam: bool = True
    channels_last: bool = False
    compile: bool = False
    autocast: str | None = None
    cudnn_benchmark: bool = False
    keep_cpu_memory: bool = True


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


SCORE_PASSES = ("step_output", "eval_forward")
FINAL_FROM = ("last_output", "fresh_pass", "stopped")

# A run has collapsed when the network's output is constant over the image and its loss no
# better than a constant's. R1's plain ReLU CNN collapses so: its ReLUs die within about 20
# steps, the interior of its output is then exactly one value per channel (a border a few pixels
# wide differs, where zero padding meets the bias-only activations) and the loss settles at the
# target's variance. The test is on the raw output of the last training step (not the clipped
# image, which an untrained net's negative output would make constant), robust to that border:
# the median absolute deviation from the median (MAD) of every channel below COLLAPSE_MAD (1/40
# of one 8-bit grey level). Dead nets give 0; live ones about 1e-3 even untrained (plain CNN of
# 3-5 layers at initialisation, 16 px). The loss condition (at least half the mean per-channel
# variance of the last target, the least loss any per-channel constant reaches) keeps a
# well-fitted image that is mostly one flat value from counting as collapsed. The border must
# stay under half the image: about depth - 1 pixels per side for the plain CNN.
COLLAPSE_MAD = 1e-4
COLLAPSE_LOSS_FRACTION = 0.5


def is_collapsed(output: torch.Tensor, loss: float, target: torch.Tensor) -> bool:
    """Whether a run whose network output is ``output`` (1, C, H, W, unclipped) at training loss
    ``loss`` against ``target`` (1, C, H, W) has collapsed to a constant image (see COLLAPSE_MAD)."""
    flat = output.detach().float().flatten(2)
    spread = (flat - flat.median(dim=2, keepdim=True).values).abs().median(dim=2).values.max()
    floor = float(target.detach().float().flatten(2).var(dim=2, unbiased=False).mean())
    return bool(spread < COLLAPSE_MAD) and loss >= COLLAPSE_LOSS_FRACTION * floor


@dataclass
class DipResult:
    """Outputs (1, C, H, W) clipped to [0, 1]; ``best`` needs a clean image; ``stopped`` is
    what the stopping rule returns (its choice, else the best-PSNR image under ``restore_best``,
    else the last scored image). ``final`` is set by ``final_from``: the last scored image
    (last_output), one more no-grad forward pass of the last stage's network input with the
    weights training ended with, before any restore (fresh_pass), or ``stopped`` itself
    (stopped). ``eval_seconds`` is the wall time spent at evaluation points (of
    ``evaluations``), included in ``seconds``. ``collapsed``: the net's raw output at its last
    training step is constant over the image (:func:`is_collapsed`)."""

    final: torch.Tensor
    best: torch.Tensor | None
    stopped: torch.Tensor
    best_step: int | None
    curve: list[dict]
    stages: list[StageSummary]
    loss_final: float
    steps_run: int
    seconds: float
    eval_seconds: float = 0.0
    evaluations: int = 0
    collapsed: bool = False


def make_optimizer(params, settings: DipSettings) -> torch.optim.Optimizer:
    """Adam over ``params``; the fused kernel (one call per step) where torch has it."""
    params = list(params)
    options = dict(lr=settings.lr, betas=tuple(settings.betas), weight_decay=settings.weight_decay)
    if settings.fused_adam:
        try:
            return torch.optim.Adam(params, fused=True, **options)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.Adam(params, **options)


def autocast_context(device: torch.device, setting: str | None):
    """bf16 autocast on ``device`` for setting "bf16"; a no-op context for None."""
    if setting is None:
        return contextlib.nullcontext()
    if setting != "bf16":
        raise ValueError(f"autocast must be None or 'bf16', got {setting!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16)


KEPT_BYTES = 1 << 30
_MALLOC_TUNED: list[bool] = []


def keep_freed_cpu_memory() -> bool:
    """Stop glibc from handing freed tensor memory back to the OS (process-wide).

    PyTorch's CPU allocator calls malloc/free for every tensor. glibc serves large
    blocks with mmap and trims the heap top on free, so each DIP step faults its
    activations in afresh (about 30,000 minor page faults per step for the skip net
    at 128x128, about 800 with this setting; docs/PERFORMANCE.md). Raising the mmap
    and trim thresholds to 1 GiB keeps that memory in the heap for reuse. Returns
    whether the setting took (glibc only; a no-op elsewhere).
    """
    if _MALLOC_TUNED:
        return _MALLOC_TUNED[0]
    done = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3
            done = all(libc.mallopt(option, KEPT_BYTES) == 1 for option in (m_mmap_threshold, m_trim_threshold))
        except (OSError, AttributeError):
            done = False
    _MALLOC_TUNED.append(done)
    return done


def prepare_backends(device: torch.device, settings: DipSettings) -> None:
    """Process-wide switches: cuDNN autotuning on CUDA when asked, and on the CPU
    (``keep_cpu_memory``) an allocator that keeps freed memory for the next step."""
    if device.type == "cuda" and settings.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu" and settings.keep_cpu_memory:
        keep_freed_cpu_memory()


def backward_rows(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each row of ``output`` (K, ...) against ``target`` (1 or K, ...);
    backpropagates their sum (each run gets its own gradient) and returns them detached."""
    losses = (output.float() - target).square().flatten(1).mean(1)
    losses.sum().backward()
    return losses.detach()


class SingleRun:
    """One network and its optimiser: the K = 1 trainee of :func:`run_loop`."""

    count = 1

    def __init__(self, net: torch.nn.Module, settings: DipSettings):
        self.net, self.settings = net, settings
        if settings.channels_last:
            net.to(memory_format=torch.channels_last)
        self.call = torch.compile(net) if settings.compile else net
        self.optimizer = make_optimizer(net.parameters(), settings)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.settings.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.call(inputs)

    def train_step(self, inputs: torch.Tensor, target: torch.Tensor, active: list[bool]):
        """Forward and backward: returns (output, per-row losses), both detached."""
        with autocast_context(inputs.device, self.settings.autocast):
            output = self.forward(inputs)
        return output.detach(), backward_rows(output, target)

    @torch.no_grad()
    def forward_no_grad(self, inputs: torch.Tensor, eval_mode: bool) -> torch.Tensor:
        """A forward pass outside training, in eval mode or not; the net ends in train mode."""
        self.net.train(not eval_mode)
        with autocast_context(inputs.device, self.settings.autocast):
            output = self.forward(inputs)
        self.net.train()
        return output.float()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, active: list[bool]) -> None:
        self.optimizer.step()

    def reset_optimizers(self) -> None:
        self.optimizer = make_optimizer(self.net.parameters(), self.settings)

    def weights(self, k: int):
        return copy.deepcopy(self.net.state_dict())

    def load_weights(self, k: int, state) -> None:
        self.net.load_state_dict(state)

    def hold(self, k: int):
        return None

    def release(self, k: int, held) -> None:
        pass

    def finish(self) -> None:
        pass


def _jitter(shape, generators, active: list[bool], device) -> torch.Tensor:
    """N(0, 1) of ``shape`` (K, ...): row k drawn from generators[k] as a (1, ...) tensor;
    zeros (and no draw, so its generator stays put) for a run that is not active."""
    one = (1,) + tuple(shape[1:])
    if len(generators) == 1:
        return torch.randn(one, generator=generators[0], device=device)
    return torch.cat([torch.randn(one, generator=g, device=device) if on else torch.zeros(one, device=device)
                      for g, on in zip(generators, active)])


def _psnr_rows(reference: torch.Tensor, estimate: torch.Tensor, metric: str, quantise: str = "round") -> list[float]:
    """PSNR of each row of ``estimate`` (K, ...) against ``reference`` (1 or K, ...): one host read."""
    reference = reference.expand_as(estimate)
    if metric == "uint8":
        return psnr_torch_batched(uint8_levels(reference, quantise), uint8_levels(estimate, quantise),
                                  data_range=255.0).tolist()
    return psnr_torch_batched(reference, estimate, data_range=1.0).tolist()


def _ssim(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    to_hwc = lambda x: x[0].detach().float().cpu().numpy().transpose(1, 2, 0)  # noqa: E731
    return ssim(to_hwc(reference), to_hwc(estimate), data_range=1.0)


class _RunRecord:
    """What one run of the batch accumulates across stages."""

    def __init__(self):
        self.curve: list[dict] = []
        self.summaries: list[StageSummary] = []
        self.best_psnr, self.best_output, self.best_step = -math.inf, None, None
        self.best_state = None
        self.loss_final = float("nan")
        self.steps_run = 0


def run_loop(runs, stages: list[Stage], settings: DipSettings, early_stops: list, clean=None,
             generators=None) -> list[DipResult]:
    """Train ``runs`` (K trainees) through ``stages``; one DipResult per run.

    Stage tensors are batched: ``net_input`` (K, Cin, H, W), ``target`` (1 or K, C, H, W);
    ``clean`` is (1, C, H, W) or None. ``early_stops`` and ``generators`` have K entries
    (a generator may be None: torch's global one). A run whose rule stops it early is
    held (its optimiser skips steps, ``runs.hold``/``release`` keep its state) until the
    stage ends, so every run follows exactly the path it would follow alone. Raises
    DivergedError on the first NaN/inf loss of any run still training.
    """
    if settings.score_pass not in SCORE_PASSES or settings.final_from not in FINAL_FROM:
        raise ValueError(f"score_pass must be one of {SCORE_PASSES} and final_from one of {FINAL_FROM}")
    if settings.score_pass == "eval_forward" and settings.ema > 0:
        raise ValueError("score_pass='eval_forward' scores one forward pass: it needs ema = 0")
    count = runs.count
    generators = list(generators) if generators is not None else [None] * count
    device = stages[0].target.device
    prepare_backends(device, settings)
    records = [_RunRecord() for _ in range(count)]
    first_bad = torch.full((count,), -1, dtype=torch.int64, device=device)
    training = torch.ones(count, dtype=torch.bool, device=device)
    average = shown = losses = fresh = raw = None
    stop_every = sorted({rule.every for rule in early_stops if getattr(rule, "every", None)})
    eval_seconds, evaluations = 0.0, 0
    started = time.perf_counter()
    bar = progress_bar(sum(s.steps for s in stages), settings.description, settings.progress)
    pending = 0
    try:
        for stage in stages:
            if stage.index > 0 and settings.reset_optimizer_per_stage:
                runs.reset_optimizers()
            for rule in early_stops:
                rule.start_stage(stage.index)
            active = [True] * count
            held: dict[int, tuple] = {}
            stage_best = [(-math.inf, None, None)] * count
            stop_step = [stage.steps - 1] * count
            stopped_early = [False] * count
            target = stage.target
            base = [record.steps_run for record in records]
            looped = 0
            for step in range(stage.steps):
                net_input = stage.net_input
                if settings.reg_noise_std > 0:
                    net_input = torch.add(net_input, _jitter(net_input.shape, generators, active, device),
                                          alpha=settings.reg_noise_std)
                last = step == stage.steps - 1
                evaluating = last or step % settings.eval_every == 0 or any(step % every == 0 for every in stop_every)
                runs.zero_grad()
                output, losses = runs.train_step(net_input, target, active)
                scored_weights = None
                if evaluating and settings.restore_best and settings.score_pass == "step_output":
                    scored_weights = [runs.weights(k) if active[k] else None for k in range(count)]
                runs.step(active)
                with torch.no_grad():
                    bad = ~torch.isfinite(losses) & training & (first_bad < 0)
                    first_bad = torch.where(bad, step, first_bad)
                    raw = output.float()
                    shown = raw
                    if settings.ema > 0:
                        average = raw.clone() if average is None else average.lerp_(raw, 1 - settings.ema)
                        shown = average
                    shown = shown.clamp(0.0, 1.0)
                    for k in range(count):
                        if active[k]:
                            early_stops[k].observe(step, raw[k:k + 1], shown[k:k + 1])
                looped += 1
                pending += 1
                if not evaluating:
                    if pending >= BAR_CHUNK:
                        bar.update(pending)
                        pending = 0
                    continue
                began = time.perf_counter()
                if settings.score_pass == "eval_forward":
                    shown = runs.forward_no_grad(stage.net_input, eval_mode=True).clamp(0.0, 1.0)
                loss_values = losses.tolist()
                bad_at = first_bad.tolist()
                for k in range(count):
                    if bad_at[k] >= 0:
                        raise DivergedError(base[k] + bad_at[k], loss_values[k])
                psnr_noisy = _psnr_rows(target.clamp(0, 1), shown, "float")
                psnr_clean = (_psnr_rows(clean, shown, settings.psnr_metric, settings.uint8_quantise)
                              if clean is not None else None)
                for k in range(count):
                    if not active[k]:
                        continue
                    record = records[k]
                    record.loss_final = loss_values[k]
                    row = {"step": base[k] + step, "stage": stage.index, "stage_step": step, "loss": loss_values[k],
                           "psnr": None, "ssim": None, "psnr_noisy": psnr_noisy[k],
                           "nr_stat": early_stops[k].last_variance()}
                    if clean is not None:
                        row["psnr"] = psnr_clean[k]
                        if settings.evaluate_ssim:
                            row["ssim"] = _ssim(clean, shown[k:k + 1])
                        if row["psnr"] > record.best_psnr:
                            record.best_psnr, record.best_step = row["psnr"], row["step"]
                            record.best_output = shown[k:k + 1].clone()
                            if settings.restore_best:
                                record.best_state = (scored_weights[k] if scored_weights is not None
                                                     else runs.weights(k))
                        if row["psnr"] > stage_best[k][0]:
                            stage_best[k] = (row["psnr"], row["ssim"], row["step"])
                    stop = early_stops[k].is_check_step(step) and early_stops[k].check(step, row["psnr"])
                    record.curve.append(row)
                    if stop and not last:
                        active[k], stopped_early[k], stop_step[k] = False, True, step
                        record.steps_run += step + 1
                        if count > 1:
                            held[k] = (runs.hold(k), shown[k:k + 1].clone(), raw[k:k + 1].clone(),
                                       None if average is None else average[k:k + 1].clone())
                            training[k] = False
                evaluations += 1
                eval_seconds += time.perf_counter() - began
                if not any(active):
                    break
            for k in range(count):
                if active[k]:
                    records[k].steps_run += stage.steps
            for k, (state, shown_k, raw_k, average_k) in held.items():
                runs.release(k, state)
                shown[k:k + 1] = shown_k
                raw[k:k + 1] = raw_k
                if average_k is not None:
                    average[k:k + 1] = average_k
            training.fill_(True)
            if settings.final_from == "fresh_pass" and stage is stages[-1]:
                fresh = runs.forward_no_grad(stage.net_input, eval_mode=settings.score_pass == "eval_forward")
            for k, record in enumerate(records):
                psnr_best, ssim_best, best_step = stage_best[k]
                record.summaries.append(StageSummary(
                    index=stage.index, steps_run=stop_step[k] + 1, stop_step=stop_step[k],
                    stopped_early=stopped_early[k], psnr_best=None if psnr_best == -math.inf else psnr_best,
                    ssim_best=ssim_best, best_step=best_step, info=dict(stage.info),
                ))
                if settings.restore_best and record.best_state is not None:
                    runs.load_weights(k, record.best_state)
            bar.update(pending + stage.steps - looped)
            pending = 0
    finally:
        bar.close()
        runs.finish()
    seconds = time.perf_counter() - started
    results = []
    last_targets = stages[-1].target
    for k, record in enumerate(records):
        final = (fresh if fresh is not None else shown)[k:k + 1].clamp(0.0, 1.0).clone()
        last_target = last_targets[k:k + 1] if last_targets.shape[0] > 1 else last_targets
        chosen = early_stops[k].chosen_output()
        if chosen is not None:
            stopped = chosen.clone()
        elif settings.restore_best and record.best_output is not None:
            stopped = record.best_output
        else:
            stopped = final
        if settings.final_from == "stopped":
            final = stopped
        results.append(DipResult(
            final=final, best=record.best_output, stopped=stopped, best_step=record.best_step,
            curve=record.curve, stages=record.summaries, loss_final=record.loss_final,
            steps_run=record.steps_run, seconds=seconds, eval_seconds=eval_seconds, evaluations=evaluations,
            collapsed=is_collapsed(raw[k:k + 1], record.loss_final, last_target),
        ))
    return results


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
    ``early_stop.every``-th step when the rule has one, and each stage's last step;
    the rule's ``check`` runs at those of its own check steps. The evaluated image is
    set by ``settings.score_pass`` (module docstring). Raises DivergedError on a NaN/inf loss.
    """
    early_stop = early_stop or NoStop()
    if early_stop.uses_clean_image and clean is None:
        raise ValueError("early stopping on PSNR needs the clean image")
    net.train()
    return run_loop(SingleRun(net, settings), stages, settings, [early_stop], clean=clean, generators=[generator])[0]


def make_code(channels: int, size, kind: str, scale: float, generator: torch.Generator, device) -> torch.Tensor:
    """A DIP input code z (1, channels, H, W) for size (H, W) or a side: U(0, 1) (kind
    "uniform") or N(0, 1) ("gaussian") drawn from ``generator`` on its device, times scale."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    draw = torch.rand if kind == "uniform" else torch.randn
    return draw((1, channels) + size, generator=generator, device=generator.device).to(device) * scale
