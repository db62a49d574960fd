"""Early-stopping rules for the DIP loop.

A rule sees each stage of a run. ``PsnrPatience`` is report R1's rule and reads the
PSNR against the clean image; ``WindowedVariance`` (Wang et al.) needs no clean image:
it watches the variance of the last ``window`` outputs and keeps the output at the
variance minimum. ``Discrepancy`` needs no clean image either: it stops once the returned
image is as close to the observation as a factor of the noise variance (Morozov's
discrepancy principle).

The loop calls ``observe(step, raw, returned)`` every step with the network's raw
output and the image the method would return at that step (clipped, EMA-averaged when
EMA is on), and ``check(step, psnr)`` at the evaluation points where
``is_check_step(step)`` holds.
"""

from __future__ import annotations

import math

import torch

from dipddpm.errors import is_number, require, require_choice

RULES = ("none", "psnr_patience", "wmv", "discrepancy")
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
    if cfg.name == "discrepancy":
        require(int(cfg.every) >= 1, "early_stop.every", cfg.every, "an integer >= 1")
        require(is_number(cfg.factor) and cfg.factor > 0, "early_stop.factor", cfg.factor, "a number > 0")
        sigma = cfg.get("sigma")
        require(sigma is None or (is_number(sigma) and sigma > 0), "early_stop.sigma", sigma,
                "null (the observation's data.sigma, estimated when that is 0) or a number > 0")
        require_choice("early_stop.clipped", cfg.get("clipped", False), (True, False))


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


class Discrepancy(NoStop):
    """No-reference rule from the noise level: stop at the first check step where the
    returned image x_hat (clipped, EMA-averaged when EMA is on) satisfies

        mean((x_hat - y)^2) <= factor * v        (discrepancy principle)

    with y the observation (1, C, H, W) and v the variance of its noise: sigma^2, or, when
    ``clipped`` (y = clip(x + n, 0, 1)), the mean over pixels of ``clipped_noise_variance(y,
    sigma)``: the clean x is unknown and y stands in for it (where x is near 0 or 1, clipping
    leaves less than sigma^2; docs/BASELINES.md measures the error). A fit closer to y than
    the noise allows has started to reproduce the noise; factor < 1 lets the fit run a little
    past the noise level, where the measured PSNR peaks (docs/BASELINES.md). The image at the
    stop is kept; a run that never gets there returns its last output.
    """

    def __init__(self, reference: torch.Tensor, sigma: float, factor: float, every: int, clipped: bool = False):
        self.reference, self.every = reference, int(every)
        variance = float(sigma) ** 2
        if clipped:
            variance = float(torch.mean(clipped_noise_variance(reference, float(sigma))))
        self.threshold = float(factor) * variance
        self.start_stage(0)

    def start_stage(self, index: int) -> None:
        self.latest = self.kept = None
        self.latest_mse = None

    def observe(self, step: int, raw: torch.Tensor, returned: torch.Tensor | None = None) -> None:
        self.latest = raw if returned is None else returned

    def is_check_step(self, step: int) -> bool:
        return step % self.every == 0

    def check(self, step: int, psnr: float | None = None) -> bool:
        if self.latest is None:
            return False
        self.latest_mse = float(torch.mean((self.latest.detach().float() - self.reference) ** 2))
        if self.latest_mse > self.threshold:
            return False
        self.kept = self.latest.detach().clone()
        return True

    def chosen_output(self):
        return self.kept

    def last_variance(self) -> float | None:
        """The latest checked mean squared distance to the observation (the curve's nr_stat)."""
        return self.latest_mse


def clipped_noise_variance(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[(clip(x + n, 0, 1) - x)^2] for n ~ N(0, sigma^2), per pixel of x in [0, 1].

    With a = -x, b = 1 - x, alpha = a / sigma, beta = b / sigma, Phi / phi the standard normal
    cdf / pdf (n is cut to [a, b]; integral of z^2 phi(z) is Phi(z) - z phi(z)):
        sigma^2 [Phi(beta) - Phi(alpha) - beta phi(beta) + alpha phi(alpha)]
        + a^2 Phi(alpha) + b^2 (1 - Phi(beta))
    """
    x = x.clamp(0.0, 1.0)
    low, high = -x, 1.0 - x
    alpha, beta = low / sigma, high / sigma

    def pdf(z):
        return torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)

    cdf_alpha, cdf_beta = torch.special.ndtr(alpha), torch.special.ndtr(beta)
    inside = sigma ** 2 * (cdf_beta - cdf_alpha - beta * pdf(beta) + alpha * pdf(alpha))
    return inside + low ** 2 * cdf_alpha + high ** 2 * (1.0 - cdf_beta)


def noise_sigma(cfg, observation: torch.Tensor, data_sigma: float) -> float:
    """The noise level the discrepancy rule uses: early_stop.sigma when set, else the
    observation's ``data_sigma`` when > 0, else estimated from the observation alone
    (skimage's wavelet estimate, averaged over channels)."""
    if cfg.get("sigma") is not None:
        return float(cfg.sigma)
    if data_sigma > 0:
        return float(data_sigma)
    from skimage.restoration import estimate_sigma

    image = observation[0].permute(1, 2, 0).cpu().numpy()
    return float(estimate_sigma(image, channel_axis=-1, average_sigmas=True))


def build_early_stop(cfg, carry_best: bool = True, observation: torch.Tensor | None = None, data_sigma: float = 0.0):
    """Instantiate the rule named by ``cfg.name``. The discrepancy rule needs the
    ``observation`` (1, C, H, W) in [0, 1] and its noise level ``data_sigma`` (0: unknown)."""
    validate_early_stop(cfg)
    if cfg.name == "discrepancy":
        if observation is None:
            raise ValueError("the discrepancy rule needs the observation")
        return Discrepancy(observation.float(), noise_sigma(cfg, observation, data_sigma), cfg.factor, cfg.every,
                           clipped=bool(cfg.get("clipped", False)))
    if cfg.name == "psnr_patience":
        return PsnrPatience(cfg.every, cfg.patience, cfg.min_delta, cfg.reset_on_improve, carry_best)
    if cfg.name == "wmv":
        return WindowedVariance(cfg.window, cfg.patience, str(cfg.get("watch", "raw")))
    return NoStop()
