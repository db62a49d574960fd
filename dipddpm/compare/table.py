"""The comparison table: mean ± std over seeds per row key × pivot column key, the report's
numbers beside ours. One builder per row kind: regular rows, the mean row (mean ± std over the
regular rows), classical baseline rows; then optional deltas against a chosen baseline.
Kept as one module (about 540 lines): the layout, the three row builders and the deltas share
one cell model (row key x column key x value) that would otherwise cross module boundaries."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dipddpm.compare.gather import baseline_mask, field_text, field_values, metric_columns, value_sort_key
from dipddpm.compare.keys import FLAG_VALUES, NO_VALUE, Labels
from dipddpm.compare.render import markdown_table

BASELINE_LABEL = "{kind}: {name}"   # kind: classical for method=classical, zero-shot for the learned ones
MEAN_ROW_LABEL = "mean"
PREFERRED_VALUES = ["psnr_final", "ssim_final", "wall_seconds"]
DEFAULT_FORMAT = ".4g"
MISSING_CELL = "missing"
ALL_COLLAPSED_CELL = "all collapsed"   # a cell whose every finished run collapsed: no learned mean
UNPAIRED = "unpaired"
LEARNED, COLLAPSED = "ok", "collapsed"   # statuses of runs that finished with metrics
ALL_RUNS = " (all runs)"                 # header suffix of a value over learned and collapsed runs
USES_CLEAN_HEADER = "uses clean image"
COLLAPSED_NOTE = ("collapsed k of n: of the n runs that finished, k ended with an output constant over the image; "
                  "cells are the mean ± std of the runs that learned, `(all runs)` cells include the collapsed ones.")


@dataclass
class ComparisonTable:
    """A built table: `display` (formatted strings, as in table.md) and `numeric` (table.csv, one
    line per row key × pivot key; `cell_rows`, `cell_columns`, `cell_kinds` label those lines)."""

    title: str
    row_fields: list[str]
    column_fields: list[str]
    values: list[str]
    display: pd.DataFrame
    numeric: pd.DataFrame
    markdown: str
    cell_rows: list[str] = field(default_factory=list)
    cell_columns: list[str] = field(default_factory=list)
    cell_kinds: list[str] = field(default_factory=list)
    row_kinds: list[str] = field(default_factory=list)
    notes: str = ""


# ---------------------------------------------------------------- cells


def _summary(sample: np.ndarray) -> tuple[float, float, int]:
    """Mean, std (ddof=1; NaN below two values) and count of the finite values."""
    sample = sample[np.isfinite(sample)]
    mean = float(sample.mean()) if sample.size else math.nan
    std = float(sample.std(ddof=1)) if sample.size > 1 else math.nan
    return mean, std, int(sample.size)


def _format_ours(mean: float, std: float, count: int, fmt: str) -> str:
    if count == 0 or not math.isfinite(mean):
        return MISSING_CELL
    if count == 1 or not math.isfinite(std):
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def _as_number(value):
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    return None


def _flag_text(share: float, count: int) -> str:
    """The mean of a 0/1 flag over a cell's runs -> no | yes | mixed."""
    if count == 0 or not math.isfinite(share):
        return MISSING_CELL
    return "no" if share == 0 else ("yes" if share == 1 else "mixed")


def _clean_image_text(flags) -> str:
    """A row's uses_clean_image flags ("true"/"false", "" when not recorded) -> yes | no | mixed."""
    present = [flag == "true" for flag in flags if flag]
    return _flag_text(float(np.mean(present)), len(present)) if present else ""


def _format_report(value) -> str:
    if value is None:
        return ""
    number = _as_number(value)
    return str(value) if number is None else format(number, ".6g")


def _report_value(report: list, key: dict[str, str], value_name: str):
    """The first report entry giving value_name whose named fields all have the cell's values."""
    for entry in report:
        if value_name in entry and all(field_text(entry[f]) == v for f, v in key.items() if f in entry):
            return entry[value_name]
    return None


def _ordered_keys(observed: list[tuple], report: list, fields: list[str]) -> list[tuple]:
    """Keys in order of first appearance in the report, then the rest sorted."""
    ordered: list[tuple] = []
    for entry in report:
        if all(name in entry for name in fields):
            key = tuple(field_text(entry[name]) for name in fields)
            if key not in ordered:
                ordered.append(key)
    rest = sorted(set(observed) - set(ordered), key=lambda key: [value_sort_key(part) for part in key])
    return ordered + rest


def _is_data_field(name: str) -> bool:
    """Fields of the data group: a baseline row keeps these and drops every other field."""
    return name == "data" or name.startswith("data.")


def _key_matches(run_key: tuple, key: tuple) -> bool:
    """A run's key against a table key; None in the run's key (a baseline's pivot field) matches any value."""
    return all(part is None or part == value for part, value in zip(run_key, key))


def default_values(frame: pd.DataFrame) -> list[str]:
    metrics = metric_columns(frame)
    return [name for name in PREFERRED_VALUES if name in metrics] or metrics


def auto_row_fields(frame: pd.DataFrame, exclude=()) -> list[str]:
    """Override keys (not seed) taking more than one value; else experiment/method if they vary."""
    keys = [c[len("override."):] for c in frame.columns if c.startswith("override.")]
    varying = [k for k in keys if k != "seed" and k not in exclude and field_values(frame, k).nunique() > 1]
    if varying:
        return varying
    return [k for k in ("experiment", "method") if k not in exclude and field_values(frame, k).nunique() > 1]


def _default_title(frame: pd.DataFrame) -> str:
    experiments = sorted({field_text(v) for v in frame["experiment"]} - {""}) if len(frame) else []
    return ", ".join(experiments) if experiments else "Comparison"


def select_runs(frame: pd.DataFrame, where: dict) -> pd.DataFrame:
    """Runs whose field equals the value (as text, or as its shortened label) for every where item;
    a value with commas, as in a sweep (``method=dip,dip_best``), keeps the runs equal to any part."""
    keep = np.ones(len(frame), dtype=bool)
    for name, wanted in where.items():
        values = field_values(frame, name)
        labels = Labels({}, {name: values})
        wanted = field_text(wanted)
        accepted = {wanted, *(part.strip() for part in wanted.split(","))}
        keep &= values.map(lambda v: bool(accepted & {v, labels.value(name, v)})).to_numpy(dtype=bool)
        if not keep.any():
            raise ValueError(f"--where {name}={wanted}: no run matches; values: "
                             + ", ".join(sorted(set(values) - {""}, key=value_sort_key)))
    return frame[keep].reset_index(drop=True)


# ---------------------------------------------------------------- layout


@dataclass
class _Row:
    """One table row: its display cells and one numeric line (plus the runs in it) per pivot key."""

    kind: str
    key: tuple
    display: dict
    numeric: list = field(default_factory=list)
    members: list = field(default_factory=list)


class _Layout:
    """What every row builder reads: fields, per-run keys, value arrays, labels, headers."""

    def __init__(self, frame: pd.DataFrame, spec: dict):
        self.frame = frame
        self.column_fields = [str(f) for f in spec.get("columns") or []]
        self.baseline = baseline_mask(frame)
        regular = frame[~self.baseline] if (~self.baseline).any() else frame
        rows = spec.get("rows")
        self.row_fields = [str(f) for f in rows] if rows else auto_row_fields(regular, self.column_fields)
        self.label_field = None
        if self.baseline.any():
            self.label_field = next((f for f in self.row_fields if not _is_data_field(f)), None)
            if self.label_field is None:
                self.row_fields, self.label_field = ["method"] + self.row_fields, "method"
        self.values = [str(v) for v in spec.get("values") or default_values(frame)]
        self.formats = spec.get("format") or {}
        self.report = [entry for entry in spec.get("report") or [] if isinstance(entry, dict)]
        self.combined_headers = spec.get("pivot_headers") == "combined"
        keyed = {name: field_values(frame, name) for name in dict.fromkeys(self.row_fields + self.column_fields)}
        self.labels = Labels(spec.get("labels"), keyed)
        self.row_keys = list(zip(*(keyed[f] for f in self.row_fields))) if self.row_fields else [()] * len(frame)
        self.col_keys = list(zip(*(keyed[f] for f in self.column_fields))) if self.column_fields else [()] * len(frame)
        self._place_baselines(keyed)
        self.is_ok = frame["status"].map(lambda status: status == LEARNED).to_numpy(dtype=bool)
        self.is_collapsed = frame["status"].map(lambda status: status == COLLAPSED).to_numpy(dtype=bool)
        self.is_finished = self.is_ok | self.is_collapsed
        # collapse was checked when a run has the `collapsed` metric or status; all-runs cells when one collapsed
        self.checks_collapse = bool(self.is_collapsed.any()) or (
            "collapsed" in frame.columns and bool(pd.to_numeric(frame["collapsed"], errors="coerce").notna().any()))
        self.any_collapsed = bool(self.is_collapsed.any())
        self.clean_flags = (frame["uses_clean_image"].map(field_text).to_numpy(dtype=object)
                            if "uses_clean_image" in frame.columns and "uses_clean_image" not in self.values else None)
        self.pair_keys = _pair_keys(frame)
        self.run_notes = frame["note"].to_numpy(dtype=object) if "note" in frame.columns else None
        self.numbers = {
            name: pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
            if name in frame.columns else np.full(len(frame), np.nan)
            for name in self.values
        }
        self.reported: set[tuple[tuple, str]] = set()

    def _place_baselines(self, keyed: dict) -> None:
        """Baseline runs get the row `classical: <algorithm>` (plus the image side when it varies)
        and match every pivot column except by their data fields."""
        frame, positions = self.frame, np.flatnonzero(self.baseline)
        sizes = frame["image_size"].map(field_text) if "image_size" in frame.columns else pd.Series("", index=frame.index)
        sizes_vary = len({sizes.iloc[p] for p in positions} - {""}) > 1
        for position in positions:
            kind = "classical" if field_text(frame["method"].iloc[position]) == "classical" else "zero-shot"
            label = BASELINE_LABEL.format(kind=kind, name=field_text(frame["baseline"].iloc[position]))
            if sizes_vary and sizes.iloc[position]:
                label += f" ({sizes.iloc[position]} px)"
            self.row_keys[position] = tuple(
                label if f == self.label_field else keyed[f].iloc[position] if _is_data_field(f) else ""
                for f in self.row_fields)
            self.col_keys[position] = tuple(
                keyed[f].iloc[position] if _is_data_field(f) else None for f in self.column_fields)

    def cell_note(self, ok: np.ndarray) -> str | None:
        """The notes that a cell's ok runs carry instead of numbers (e.g. a package that is not
        installed), shown in place of "missing"; None when they carry none."""
        if self.run_notes is None:
            return None
        notes = sorted({note for note in self.run_notes[ok] if isinstance(note, str) and note})
        return "; ".join(notes) or None

    def row_orders(self, spec: dict) -> list[tuple[tuple, str]]:
        """(row key, kind) in table order: regular rows, the mean row, baseline rows."""
        regular = [k for k, b in zip(self.row_keys, self.baseline) if not b]
        rows_order = _ordered_keys(regular, self.report, self.row_fields)
        baseline_rows = sorted({k for k, b in zip(self.row_keys, self.baseline) if b} - set(rows_order),
                               key=lambda key: [value_sort_key(part) for part in key])
        observed_cols = [k for k, b in zip(self.col_keys, self.baseline) if not b]
        observed_cols = observed_cols or [tuple("" if part is None else part for part in k) for k in self.col_keys]
        self.cols_order = _ordered_keys(observed_cols, self.report, self.column_fields)
        plan = [(key, "regular") for key in rows_order]
        if spec.get("mean_row") and self.row_fields and rows_order:
            plan.append(((MEAN_ROW_LABEL,) + ("",) * (len(self.row_fields) - 1), "mean"))
        return plan + [(key, "baseline") for key in baseline_rows]

    def members(self, row_key: tuple, col_key: tuple) -> np.ndarray:
        return np.array([rk == row_key and _key_matches(ck, col_key) for rk, ck in zip(self.row_keys, self.col_keys)],
                        dtype=bool)

    def row_label(self, row_key: tuple) -> str:
        return ", ".join(self.labels.value(f, v) for f, v in zip(self.row_fields, row_key))

    def column_label(self, col_key: tuple) -> str:
        return self.labels.combined(self.column_fields, col_key) if self.column_fields else ""

    def header(self, col_key: tuple, name: str) -> str:
        """`psnr_final [method.steps=100]`; with combined headers the column's label (`classical/nlm`),
        followed by the value's name when the table shows several values."""
        shown = self.labels.header(name)
        if not self.column_fields:
            return shown
        if self.combined_headers:
            label = self.column_label(col_key)
            return label if len(self.values) == 1 else f"{label} {shown}"
        pairs = ", ".join(f"{f}={self.labels.value(f, v)}" for f, v in zip(self.column_fields, col_key))
        return f"{shown} [{pairs}]"

    def new_row(self, kind: str, row_key: tuple) -> _Row:
        display = {self.labels.header(f): self.labels.value(f, v) for f, v in zip(self.row_fields, row_key)}
        if self.clean_flags is not None:
            display[USES_CLEAN_HEADER] = ""
        return _Row(kind, row_key, display)

    def put_all_runs(self, row: _Row, numeric: dict, col_key: tuple, name: str, summary) -> None:
        """One value over every finished run of the cell (learned and collapsed) beside the learned-only cell."""
        mean, std, count = summary
        numeric[f"{name}_all_mean"], numeric[f"{name}_all_std"] = mean, std
        row.display[self.header(col_key, name) + ALL_RUNS] = _format_ours(mean, std, count,
                                                                           str(self.formats.get(name, DEFAULT_FORMAT)))

    def put_counts(self, row: _Row, numeric: dict, members: np.ndarray) -> None:
        """n (learned), collapsed (when checked) and failed (diverged, failed, missing) of a cell."""
        numeric["n"] = int((members & self.is_ok).sum())
        if self.checks_collapse:
            numeric["collapsed"] = int((members & self.is_collapsed).sum())
        numeric["failed"] = int((members & ~self.is_finished).sum())
        if self.clean_flags is not None:
            numeric["uses_clean_image"] = _clean_image_text(self.clean_flags[members]) or None

    def put_row_counts(self, row: _Row, members: np.ndarray) -> None:
        """The row's n, `collapsed k of n` (n: runs that finished) and failed, over all its cells."""
        learned, collapsed = int((members & self.is_ok).sum()), int((members & self.is_collapsed).sum())
        row.display["n"] = learned
        if self.checks_collapse:
            row.display["collapsed"] = f"{collapsed} of {learned + collapsed}"
        row.display["failed"] = int((members & ~self.is_finished).sum())
        if self.clean_flags is not None:
            row.display[USES_CLEAN_HEADER] = _clean_image_text(self.clean_flags[members])

    def put(self, row: _Row, numeric: dict, col_key: tuple, name: str, summary, report_value=None,
            empty: str | None = None) -> None:
        """One value of one cell into the row's numeric line and display."""
        mean, std, count = summary
        numeric[f"{name}_mean"] = mean
        numeric[f"{name}_std"] = std
        numeric[f"{name}_report"] = report_value if _as_number(report_value) is None else float(report_value)
        header = self.header(col_key, name)
        fmt = str(self.formats.get(name, DEFAULT_FORMAT))
        if empty is not None and count == 0:
            row.display[header] = empty
        elif name in FLAG_VALUES:  # a flag as a value column: the share of runs that have it
            row.display[header] = _flag_text(mean, count)
        else:
            row.display[header] = _format_ours(mean, std, count, fmt)
        row.display[header + " (report)"] = _format_report(report_value)
        if report_value is not None:
            self.reported.add((col_key, name))


# ---------------------------------------------------------------- row builders


def _run_row(layout: _Layout, row_key: tuple, kind: str, totals: dict, row_means: dict) -> _Row:
    """A regular or baseline row: mean ± std over the ok runs of each cell."""
    row = layout.new_row(kind, row_key)
    row_members = np.zeros(len(layout.frame), dtype=bool)
    for col_key in layout.cols_order:
        members = layout.members(row_key, col_key)
        ok = members & layout.is_ok
        key = dict(zip(layout.row_fields, row_key)) | dict(zip(layout.column_fields, col_key))
        numeric = dict(key)
        note = layout.cell_note(ok)
        if note is None and not ok.any() and (members & layout.is_collapsed).any():
            note = ALL_COLLAPSED_CELL
        for name in layout.values:
            summary = _summary(layout.numbers[name][ok])
            if kind == "regular":
                layout.put(row, numeric, col_key, name, summary, _report_value(layout.report, key, name), empty=note)
                row_means.setdefault((col_key, name), []).append(summary[0])
            else:
                layout.put(row, numeric, col_key, name, summary, empty=note or (NO_VALUE if ok.any() else None))
            if layout.any_collapsed:
                every = _summary(layout.numbers[name][members & layout.is_finished])
                layout.put_all_runs(row, numeric, col_key, name, every)
                if kind == "regular":
                    row_means.setdefault((col_key, name + ALL_RUNS), []).append(every[0])
        layout.put_counts(row, numeric, members)
        if kind == "regular":
            cell_total = totals.setdefault(col_key, {})
            for count in ("n", "collapsed", "failed"):
                if count in numeric:
                    cell_total[count] = cell_total.get(count, 0) + numeric[count]
        row_members |= members
        row.numeric.append(numeric)
        row.members.append(members)
    layout.put_row_counts(row, row_members)
    return row


def _mean_row(layout: _Layout, row_key: tuple, totals: dict, row_means: dict) -> _Row:
    """Mean ± std over the regular rows' means (each already a mean over seeds); n and failed summed."""
    row = layout.new_row("mean", row_key)
    summed = {"n": 0, "collapsed": 0, "failed": 0}
    for col_key in layout.cols_order:
        numeric = dict(zip(layout.row_fields, row_key)) | dict(zip(layout.column_fields, col_key))
        for name in layout.values:
            layout.put(row, numeric, col_key, name, _summary(np.array(row_means.get((col_key, name), []), dtype=float)))
            if layout.any_collapsed:
                layout.put_all_runs(row, numeric, col_key, name,
                                    _summary(np.array(row_means.get((col_key, name + ALL_RUNS), []), dtype=float)))
        counts = totals.get(col_key, {})
        numeric["n"] = counts.get("n", 0)
        if layout.checks_collapse:
            numeric["collapsed"] = counts.get("collapsed", 0)
        numeric["failed"] = counts.get("failed", 0)
        if layout.clean_flags is not None:
            numeric["uses_clean_image"] = None
        for count in summed:
            summed[count] += numeric.get(count, 0)
        row.numeric.append(numeric)
        row.members.append(np.zeros(len(layout.frame), dtype=bool))
    row.display["n"] = summed["n"]
    if layout.checks_collapse:
        row.display["collapsed"] = f"{summed['collapsed']} of {summed['n'] + summed['collapsed']}"
    row.display["failed"] = summed["failed"]
    return row


# ---------------------------------------------------------------- deltas


# the fields that name the observed image besides the seed: runs of two cells pair when these agree
IMAGE_FIELDS = ("cfg.data.path", "cfg.data.folder", "cfg.data.image", "cfg.data.noise_seed")


def _pair_keys(frame: pd.DataFrame) -> np.ndarray:
    """Per run: (seed, image fields...) as text; seed "" when the run has none."""
    fields = ["seed"] + [f for f in IMAGE_FIELDS if f in frame.columns]
    texts = [frame[f].map(field_text) for f in fields]
    keys = np.empty(len(frame), dtype=object)
    keys[:] = list(zip(*texts)) if len(frame) else []
    return keys


def _by_pair(layout: _Layout, name: str, mask: np.ndarray) -> dict | None:
    """{(seed, image...): value} of the cell's ok runs with a finite value; None when a run has
    no seed or two runs share a key."""
    values = layout.numbers[name]
    mask = mask & layout.is_ok & np.isfinite(values)
    keys = list(layout.pair_keys[mask])
    if any(key[0] == "" for key in keys) or len(set(keys)) != len(keys):
        return None
    return dict(zip(keys, values[mask]))


def _paired_delta(layout: _Layout, name: str, cell: np.ndarray, base: np.ndarray) -> tuple[float, float, bool]:
    """mean(cell) - mean(base); with the same (seed, image) runs on both sides, mean and std (ddof=1)
    of the per-run differences x_s - b_s (paired), else the difference of the means (unpaired, no std)."""
    values = layout.numbers[name]
    x_all, b_all = (values[mask & layout.is_ok & np.isfinite(values)] for mask in (cell, base))
    if not x_all.size or not b_all.size:
        return math.nan, math.nan, False
    x, b = _by_pair(layout, name, cell), _by_pair(layout, name, base)
    if x is not None and b is not None and set(x) == set(b):
        mean, std, _ = _summary(np.array([x[key] - b[key] for key in x]))
        return mean, std, True
    return float(x_all.mean() - b_all.mean()), math.nan, False


def _format_delta(delta: float, std: float, paired: bool, fmt: str) -> str:
    if not math.isfinite(delta):
        return MISSING_CELL
    text = format(delta, "+" + fmt.lstrip("+"))
    if not paired:
        return f"{text} ({UNPAIRED})"
    return f"{text} ± {format(std, fmt.lstrip('+'))}" if math.isfinite(std) else text


def _add_deltas(layout: _Layout, rows: list[_Row], baseline: dict) -> tuple[list[str], str]:
    """Δ cells for every cell against the baseline's cell in the same row (baseline key among the
    column fields) or the same column (among the row fields). Returns the Δ headers and a note."""
    (name, wanted), = baseline.items()
    wanted = field_text(wanted)
    on_columns = name in layout.column_fields
    if not on_columns and name not in layout.row_fields:
        fields = ", ".join(layout.row_fields + layout.column_fields)
        raise ValueError(f"--baseline {name}: not a row or column key of this table ({fields})")
    fields = layout.column_fields if on_columns else layout.row_fields
    index = fields.index(name)
    regular = [row for row in rows if row.kind == "regular"]
    keys = layout.cols_order if on_columns else [row.key for row in regular]
    bases = [key for key in keys if key[index] == wanted]
    if not bases:
        raise ValueError(f"--baseline {name}={wanted}: no {'column' if on_columns else 'row'} has it; values: "
                         + ", ".join(sorted({key[index] for key in keys} - {""}, key=value_sort_key)))

    def base_of(key: tuple):
        same = [b for b in bases if all(p == q for i, (p, q) in enumerate(zip(b, key)) if i != index)]
        return (same or bases)[0] if (same or len(bases) == 1) else None

    by_key = {row.key: row for row in regular}
    headers, shown_headers = {}, []
    for c, col_key in enumerate(layout.cols_order):
        if on_columns and col_key in bases:
            continue
        for value in layout.values:
            headers[(c, value)] = "Δ " + layout.header(col_key, value)
            shown_headers.append(headers[(c, value)])
    row_deltas: dict[tuple[int, str], list[float]] = {}
    for row in rows:
        for (c, value), header in headers.items():
            numeric, fmt = row.numeric[c], str(layout.formats.get(value, DEFAULT_FORMAT))
            base_row = row if on_columns else by_key.get(base_of(row.key))
            base_col = base_of(layout.cols_order[c]) if on_columns else layout.cols_order[c]
            if row.kind == "mean" and on_columns:
                delta, std, _ = _summary(np.array(row_deltas.get((c, value), []), dtype=float))
                paired = True
            elif row.kind != "regular" or base_row is None or base_col is None or (base_row is row and not on_columns):
                numeric.update({f"{value}_delta": math.nan, f"{value}_delta_std": math.nan, f"{value}_paired": None})
                row.display[header] = ""
                continue
            else:
                base = base_row.members[layout.cols_order.index(base_col)]
                delta, std, paired = _paired_delta(layout, value, row.members[c], base)
                row_deltas.setdefault((c, value), []).append(delta)
            numeric.update({f"{value}_delta": delta, f"{value}_delta_std": std, f"{value}_paired": paired})
            row.display[header] = _format_delta(delta, std, paired, fmt)
    note = (f"Δ: difference from {name}={layout.labels.value(name, wanted)} in the same "
            f"{'row' if on_columns else 'column'}; ± is the std over runs paired by seed and image"
            + (", or over rows in the mean row" if on_columns and layout.row_fields else "")
            + f"; ({UNPAIRED}) where the runs do not pair.")
    return shown_headers, note


# ---------------------------------------------------------------- the table


def build_table(frame: pd.DataFrame, spec: dict | None = None) -> ComparisonTable:
    """Mean ± std of each value per row key (and pivot column key), beside the report's numbers.

    Spec keys (docs/COMPARE.md): rows, columns, values, format, labels, report, title, mean_row,
    where {field: value} (runs kept), baseline {field: value} (Δ columns), pivot_headers
    ("combined": a pivot column's header is its label, e.g. `classical/nlm`).
    """
    spec = dict(spec or {})
    if spec.get("where"):
        frame = select_runs(frame, spec["where"])
    layout = _Layout(frame, spec)
    totals: dict[tuple, list[int]] = {}
    row_means: dict[tuple, list[float]] = {}
    rows = [_mean_row(layout, key, totals, row_means) if kind == "mean"
            else _run_row(layout, key, kind, totals, row_means) for key, kind in layout.row_orders(spec)]
    delta_headers, notes = _add_deltas(layout, rows, spec["baseline"]) if spec.get("baseline") else ([], "")

    clean_column = [USES_CLEAN_HEADER] if layout.clean_flags is not None else []
    counts = ["n"] + (["collapsed"] if layout.checks_collapse else []) + ["failed"]
    numeric_columns = list(dict.fromkeys(layout.row_fields + layout.column_fields))
    numeric_columns += ["uses_clean_image"] if clean_column else []
    parts = (("mean", "std", "report") + (("all_mean", "all_std") if layout.any_collapsed else ())
             + (("delta", "delta_std", "paired") if delta_headers else ()))
    numeric_columns += [f"{name}_{part}" for name in layout.values for part in parts] + counts
    numeric_frame = pd.DataFrame([line for row in rows for line in row.numeric], columns=numeric_columns)

    display_columns = [layout.labels.header(f) for f in layout.row_fields] + clean_column
    for col_key in layout.cols_order:
        for name in layout.values:
            display_columns.append(layout.header(col_key, name))
            if layout.any_collapsed:
                display_columns.append(layout.header(col_key, name) + ALL_RUNS)
            if (col_key, name) in layout.reported:
                display_columns.append(layout.header(col_key, name) + " (report)")
    display_columns += delta_headers + counts
    display_frame = pd.DataFrame([row.display for row in rows], columns=display_columns, dtype=object)
    if layout.checks_collapse:
        notes = "\n\n".join(note for note in (notes, COLLAPSED_NOTE) if note)
    title = str(spec.get("title") or _default_title(frame))
    markdown = f"## {title}\n\n{markdown_table(display_frame)}\n" + (f"\n{notes}\n" if notes else "")
    return ComparisonTable(
        title, layout.row_fields, layout.column_fields, layout.values, display_frame, numeric_frame, markdown,
        cell_rows=[layout.row_label(row.key) for row in rows for _ in layout.cols_order],
        cell_columns=[layout.column_label(col_key) for _ in rows for col_key in layout.cols_order],
        cell_kinds=[row.kind for row in rows for _ in layout.cols_order],
        row_kinds=[row.kind for row in rows],
        notes=notes,
    )
