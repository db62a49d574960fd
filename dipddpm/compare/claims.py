"""A report's claims as data, judged against the runs: confirmed, refuted or inconclusive.

A claim (an entry of a table spec's `claims:` list) compares one metric between two groups of
runs, each chosen by a row selector {field: value}:

    - text: "Staged training (gradual) beats the traditional single stage."
      metric: psnr_final
      higher_is_better: true
      better: {curriculum: r1_gradual, variant: report, optim.lr: 0.005}   # the side the report says wins
      worse: {curriculum: r1_traditional, variant: report, optim.lr: 0.005}
      honest: {better: {...}, worse: {...}}   # optional: the same claim on rows that use no clean image

The verdict (`verdict`): with d = mean(better) - mean(worse), signed so that d > 0 is the report's
direction, and the pooled standard deviation of the two groups

    s_p = sqrt(((n_b - 1) s_b^2 + (n_w - 1) s_w^2) / (n_b + n_w - 2))     (s: std with ddof=1)

the claim is confirmed when d > 2 s_p, refuted when d < -2 s_p, else inconclusive; inconclusive
too when a side has fewer than 2 runs; "no results yet" when a side has none. Every run that
finished with metrics counts (ok and collapsed: a method that collapses is judged with its collapses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dipddpm.compare.gather import baseline_mask, field_text, field_values
from dipddpm.errors import ConfigError

CONFIRMED, REFUTED, INCONCLUSIVE, NO_RESULTS = "confirmed", "refuted", "inconclusive", "no results yet"
MARGIN = 2.0                                # the difference must exceed MARGIN pooled standard deviations
COUNTED_STATUSES = ("ok", "collapsed")
CLAIM_KEYS = ("text", "metric", "higher_is_better", "better", "worse", "honest")


@dataclass
class Side:
    """One side of a claim: its runs' values of the metric (finite only) and how many collapsed."""

    values: np.ndarray
    collapsed: int = 0

    @property
    def n(self) -> int:
        return int(self.values.size)

    @property
    def mean(self) -> float:
        return float(self.values.mean()) if self.n else math.nan

    @property
    def std(self) -> float:
        return float(self.values.std(ddof=1)) if self.n > 1 else math.nan

    def text(self, fmt: str = ".4g") -> str:
        """`mean ± std (n=N)`, `mean (n=1)` or `no runs`; `, k collapsed` when some collapsed."""
        if not self.n:
            return "no runs"
        body = format(self.mean, fmt) + (f" ± {format(self.std, fmt)}" if self.n > 1 else "")
        return f"{body} (n={self.n}{f', {self.collapsed} collapsed' if self.collapsed else ''})"


@dataclass
class Verdict:
    kind: str                # confirmed | refuted | inconclusive | no results yet
    reason: str              # one line
    difference: float        # d, positive in the report's direction
    pooled_std: float        # s_p


def pooled_std(better: Side, worse: Side) -> float:
    """s_p = sqrt(((n_b - 1) s_b^2 + (n_w - 1) s_w^2) / (n_b + n_w - 2)); NaN below 2 runs a side."""
    if better.n < 2 or worse.n < 2:
        return math.nan
    pooled = ((better.n - 1) * better.std ** 2 + (worse.n - 1) * worse.std ** 2) / (better.n + worse.n - 2)
    return math.sqrt(pooled)


def verdict(better: Side, worse: Side, higher_is_better: bool, fmt: str = ".4g") -> Verdict:
    """Confirmed if d > 2 s_p, refuted if d < -2 s_p, else inconclusive (module docstring)."""
    if not better.n or not worse.n:
        missing = " and ".join(name for name, side in (("better", better), ("worse", worse)) if not side.n)
        return Verdict(NO_RESULTS, f"no finished run on the {missing} side", math.nan, math.nan)
    d = (better.mean - worse.mean) * (1.0 if higher_is_better else -1.0)
    s_p = pooled_std(better, worse)
    if not math.isfinite(s_p):
        return Verdict(INCONCLUSIVE, f"d = {format(d, '+' + fmt)} but fewer than 2 runs on a side", d, s_p)
    bound = MARGIN * s_p
    compared = f"d = {format(d, '+' + fmt)}, 2 s_p = {format(bound, fmt)}"
    if d > bound:
        return Verdict(CONFIRMED, f"{compared}: the report's direction, by more than 2 s_p", d, s_p)
    if d < -bound:
        return Verdict(REFUTED, f"{compared}: the opposite direction, by more than 2 s_p", d, s_p)
    return Verdict(INCONCLUSIVE, f"{compared}: |d| within 2 s_p", d, s_p)


def _check_selector(where: str, selector) -> dict:
    if not isinstance(selector, dict) or not selector:
        raise ConfigError(where, selector, "a non-empty mapping {field: value} that chooses a table row")
    return {str(k): v for k, v in selector.items()}


def parse_claims(spec: dict, where: str = "table.claims") -> list[dict]:
    """The spec's claims, checked: each has text, metric, higher_is_better and the better / worse
    selectors (honest: optional, with both selectors). Raises ConfigError naming the entry."""
    claims = spec.get("claims") or []
    if not isinstance(claims, list):
        raise ConfigError(where, claims, "a list of claims")
    parsed = []
    for index, claim in enumerate(claims):
        key = f"{where}[{index}]"
        if not isinstance(claim, dict):
            raise ConfigError(key, claim, "a mapping with " + ", ".join(CLAIM_KEYS))
        unknown = sorted(set(claim) - set(CLAIM_KEYS))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", claim[unknown[0]], "one of the keys " + ", ".join(CLAIM_KEYS))
        for name in ("text", "metric"):
            if not isinstance(claim.get(name), str) or not claim[name].strip():
                raise ConfigError(f"{key}.{name}", claim.get(name), "a non-empty string")
        if not isinstance(claim.get("higher_is_better"), bool):
            raise ConfigError(f"{key}.higher_is_better", claim.get("higher_is_better"), "true or false")
        entry = dict(claim, better=_check_selector(f"{key}.better", claim.get("better")),
                     worse=_check_selector(f"{key}.worse", claim.get("worse")))
        if claim.get("honest") is not None:
            honest = claim["honest"]
            if not isinstance(honest, dict):
                raise ConfigError(f"{key}.honest", honest, "a mapping with better and worse selectors")
            entry["honest"] = {side: _check_selector(f"{key}.honest.{side}", honest.get(side))
                               for side in ("better", "worse")}
        parsed.append(entry)
    return parsed


def side(frame: pd.DataFrame, selector: dict, metric: str) -> Side:
    """The finished runs (ok, collapsed) whose fields all equal the selector's values (as text);
    baseline rows only when the selector names ``baseline``."""
    if frame.empty:
        return Side(np.array([], dtype=float))
    chosen = frame["status"].isin(COUNTED_STATUSES).to_numpy(dtype=bool)
    if "baseline" not in selector:
        chosen = chosen & ~baseline_mask(frame)
    for name, wanted in selector.items():
        try:
            values = field_values(frame, name)
        except ValueError:
            return Side(np.array([], dtype=float))
        chosen = chosen & (values == field_text(wanted)).to_numpy(dtype=bool)
    numbers = (pd.to_numeric(frame[metric], errors="coerce").to_numpy(dtype=float) if metric in frame.columns
               else np.full(len(frame), np.nan))
    values = numbers[chosen]
    collapsed = int((chosen & (frame["status"] == "collapsed").to_numpy(dtype=bool) & np.isfinite(numbers)).sum())
    return Side(values[np.isfinite(values)], collapsed)


@dataclass
class JudgedClaim:
    claim: dict
    better: Side
    worse: Side
    verdict: Verdict
    honest: tuple[Side, Side, Verdict] | None = None


def judge(frame: pd.DataFrame, claim: dict, fmt: str = ".4g") -> JudgedClaim:
    """A parsed claim against the gathered runs: both sides, the verdict, and the honest rows' verdict."""
    metric, higher = claim["metric"], claim["higher_is_better"]
    better, worse = side(frame, claim["better"], metric), side(frame, claim["worse"], metric)
    judged = JudgedClaim(claim, better, worse, verdict(better, worse, higher, fmt))
    if claim.get("honest"):
        honest_better = side(frame, claim["honest"]["better"], metric)
        honest_worse = side(frame, claim["honest"]["worse"], metric)
        judged.honest = (honest_better, honest_worse, verdict(honest_better, honest_worse, higher, fmt))
    return judged


def report_number(report: list, selector: dict, metric: str):
    """The report's number (or text) for the metric on the rows a selector chooses: the first report
    entry giving the metric whose fields all match the selector (fields it does not name match anything)."""
    for entry in report or []:
        if isinstance(entry, dict) and metric in entry and all(
                field_text(entry[name]) == field_text(value) for name, value in selector.items() if name in entry):
            return entry[metric]
    return None
