"""Early-stopping rules for the DIP loop.

A rule sees each stage of a run. ``PsnrPatience`` is report R1's rule and reads the
PSNR against the clean image; ``WindowedVariance`` (Wang et al.) needs no clean image:
it watches the variance of the last ``window`` outputs and keeps the output at the
variance minimum.

The loop calls ``observe(step, raw, returned)`` every step with the network's raw
output and the image the method would return at that step (clipped, EMA-averaged when
EMA is on), and ``check(step, psnr)`` at the evaluation points where
``is_check_step(step)`` holds.
"""

from __future__ import annotations

import torch

from dipddpm.errors import require, require_choice

RULES = ("none", "psnr_patience", "wmv")
WATCHED = ("raw", "averaged")


def validate_early_stop(cfg) -> None:
    require_choice("early_stop.name", cfg.name, RULES)
    if cfg.name == "psnr_patience":
        require(int(cfg.every) >= 1, "early_stop.every", cfg.every, "an integer >= 1")
        require(int(cfg.patience) >= 1, "early_stop.patience", cfg.patience, "an integer >= 1")
    if cfg.name == "wmv":
        require(int(cfg.window) >= 2, "early_stop.window", cfg.window, "an integer >= 2")
        require(int(cfg.patience) >= 1, "early_stop.patience", cfg.patience, "an integer >= 1")
        require_choice("early_stop.watch", cfg.get("watch", "raw"), WATCHED)


class NoStop:
    """Never stops."""

    uses_clean_image = False
    every = None

    def start_stage(self, index: int) -> None:
        pass

    def observe(self, step: int, raw: torch.Tensor, returned: torch.Tensor | None = None) -> None:
        pass

    def is_check_step(self, step: int) -> bool:
        """Whether ``check`` runs at stage step ``step`` (every evaluation point by default)."""
        return True

    def check(self, step: int, psnr: float | None) -> bool:
        return False

    def chosen_output(self):
        return None

    def last_variance(self) -> float | None:
        return None


class PsnrPatience(NoStop):
    """Report R1's rule, applied at every ``every``-th step of a stage (step 0 included)
and only there, so it stops at the same step whatever the loop's ``eval_every``.

    If ``psnr - best >= min_delta`` the best is updated (and the counter reset when
    ``reset_on_improve``); otherwise the counter grows. The stage stops when the
    counter reaches ``patience``. ``carry_best`` keeps ``best`` across stages while
    the counter restarts at every stage.
    """

    uses_clean_image = True

    def __init__(self, every: int, patience: int, min_delta: float, reset_on_improve: bool, carry_best: bool):
        self.every, self.patience, self.min_delta = int(every), int(patience), float(min_delta)
        self.reset_on_improve, self.carry_best = bool(reset_on_improve), bool(carry_best)
        self.best = -float("inf")
        self.count = 0

    def is_check_step(self, step: int) -> bool:
        return step % self.every == 0

    def start_stage(self, index: int) -> None:
        self.count = 0
        if not self.carry_best:
            self.best = -float("inf")

    def check(self, step: int, psnr: float | None) -> bool:
        """Update with the PSNR evaluated at stage step ``step``; True means stop now."""
        if psnr is None:
            return False
        if psnr - self.best >= self.min_delta:
            self.best = psnr
            if self.reset_on_improve:
                self.count = 0
        else:
            self.count += 1
        return self.count >= self.patience


class WindowedVariance(NoStop):
    """No-reference rule: variance of the last ``window`` outputs, kept on the device.

    ``observe`` is called every step with the raw output (1, C, H, W) and the image the
    method returns there (None: the raw output). ``watch`` = raw (ES-WMV as published)
    takes the variance of the raw outputs, ``averaged`` that of the returned images; the
    kept image is always the returned one at the variance minimum. With W = ``window``
    and the last W frames x_1..x_W, the statistic is
    mean over pixels of (1/W) sum_i (x_i - mean_i x_i)^2. Running sums make
    each step O(pixels); the minimum variance, its step and the output there are
    updated with ``torch.where``, so no step needs a host synchronisation. ``check``
    (at evaluation points) reads the step of the minimum once and stops when
    ``patience`` steps have passed without a new minimum.
    """

    def __init__(self, window: int, patience: int, watch: str = "raw"):
        if watch not in WATCHED:
            raise ValueError(f"watch must be one of {WATCHED}, got {watch!r}")
        self.window, self.patience, self.watch = int(window), int(patience), watch
        self.start_stage(0)

    def start_stage(self, index: int) -> None:
        self.buffer = None
        self.filled = 0
        self.best_var = self.best_step = self.best_output = None
        self.latest_var = None

    def observe(self, step: int, raw: torch.Tensor, returned: torch.Tensor | None = None) -> None:
        output = raw if returned is None else returned
        frame = (raw if self.watch == "raw" else output).detach().to(torch.float64)
        if self.buffer is None:
            self.buffer = torch.zeros((self.window,) + tuple(frame.shape), dtype=torch.float64, device=frame.device)
            self.sum = torch.zeros_like(frame)
            self.sum_sq = torch.zeros_like(frame)
            self.best_var = torch.tensor(float("inf"), dtype=torch.float64, device=frame.device)
            self.best_step = torch.tensor(-1, dtype=torch.int64, device=frame.device)
            self.best_output = output.detach().clone()
        slot = self.filled % self.window
        if self.filled >= self.window:
            old = self.buffer[slot]
            self.sum -= old
            self.sum_sq -= old * old
        self.buffer[slot] = frame
        self.sum += frame
        self.sum_sq += frame * frame
        self.filled += 1
        if self.filled < self.window:
            return
        mean = self.sum / self.window
        variance = (self.sum_sq / self.window - mean * mean).clamp_min(0).mean()
        improved = variance < self.best_var
        self.best_var = torch.where(improved, variance, self.best_var)
        self.best_step = torch.where(improved, torch.full_like(self.best_step, step), self.best_step)
        self.best_output = torch.where(improved, output.detach(), self.best_output)
        self.latest_var = variance

    def check(self, step: int, psnr: float | None = None) -> bool:
        if self.best_step is None:
            return False
        best_step = int(self.best_step)
        return best_step >= 0 and step - best_step >= self.patience

    def minimum(self) -> tuple[int, float]:
        """(step, variance) of the minimum so far; (-1, inf) before the window fills."""
        if self.best_step is None:
            return -1, float("inf")
        return int(self.best_step), float(self.best_var)

    def chosen_output(self):
        if self.best_step is None or int(self.best_step) < 0:
            return None
        return self.best_output

    def last_variance(self) -> float | None:
        """The latest window variance (one host read), None before the window fills."""
        return None if self.latest_var is None else float(self.latest_var)


def build_early_stop(cfg, carry_best: bool = True):
    """Instantiate the rule named by ``cfg.name``."""
    validate_early_stop(cfg)
    if cfg.name == "psnr_patience":
        return PsnrPatience(cfg.every, cfg.patience, cfg.min_delta, cfg.reset_on_improve, carry_best)
    if cfg.name == "wmv":
        return WindowedVariance(cfg.window, cfg.patience, str(cfg.get("watch", "raw")))
    return NoStop()
