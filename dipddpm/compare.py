"""dipddpm-compare: sweep results (result.json, curve.csv) -> results.csv, table.csv/md, plots.

Column scheme of the gathered frame (one row per run):
  job_dir status error seed method experiment config_hash   run identity
  override.<key>       the job's sweep overrides (strings)
  choice.<group>       config group choices
  cfg.<dotted.key>     flattened config (table/report/hydra subtrees left out)
  <metric>             metrics; list metrics become <metric>.1, <metric>.2, ...
  baseline, item.<key> a classical baseline's algorithm; a result item's text values (one row per item)
See docs/COMPARE.md for the table spec, docs/BASELINES.md for items, mean_row and baseline rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dipddpm.io import read_json, save_figure_atomic, write_csv_atomic, write_text_atomic
from dipddpm.sweep import nested_config

BASE_COLUMNS = ["job_dir", "status", "error", "seed", "method", "experiment", "config_hash"]
OPTIONAL_BASE_COLUMNS = ["baseline"]     # present only when some run is a classical baseline
FIELD_PREFIXES = ["override.", "choice.", "cfg.", "item."]
TOP_LEVEL_FIELDS = ["method", "experiment", "seed", "status", "config_hash", "baseline"]
ITEMS_METRIC = "items"                   # a list of per-item dicts in metrics: one frame row per item
BASELINE_LABEL = "classical: {}"
MEAN_ROW_LABEL = "mean"
PREFERRED_VALUES = ["psnr_final", "ssim_final", "wall_seconds"]
SPEC_SUBTREES = ("table", "report", "hydra")
DEFAULT_FORMAT = ".4g"
MISSING_CELL = "missing"
NO_VALUE = "—"


# ---------------------------------------------------------------- discovery


def _natural_key(text: str):
    """Sort key that orders embedded integers numerically ("2" before "10")."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def _value_sort_key(text: str):
    """Numbers first in numeric order, then other text in natural order."""
    try:
        number = float(text)
    except ValueError:
        return (1, 0.0, _natural_key(text))
    if math.isnan(number):
        return (1, 0.0, _natural_key(text))
    return (0, number, [])


def _is_job_dir(path: Path) -> bool:
    return (path / "result.json").is_file()


def _has_hydra_record(path: Path) -> bool:
    return (path / ".hydra" / "overrides.yaml").is_file() or (path / ".hydra" / "config.yaml").is_file()


def _find_jobs_in(directory: Path) -> list[tuple[Path, bool]]:
    """(job_dir, has_result) pairs below directory; a .hydra-only leaf is a missing job."""
    if _is_job_dir(directory):
        return [(directory, True)]
    found: list[tuple[Path, bool]] = []
    try:
        children = [
            entry
            for entry in os.scandir(directory)
            if entry.is_dir(follow_symlinks=False) and not entry.name.startswith(".")
        ]
    except OSError:
        children = []
    for entry in sorted(children, key=lambda e: _natural_key(e.name)):
        found.extend(_find_jobs_in(Path(entry.path)))
    if not found and _has_hydra_record(directory):
        return [(directory, False)]
    return found


def find_jobs(paths) -> list[tuple[Path, bool]]:
    """Job directories under paths (dirs or result.json files), in order, without duplicates."""
    jobs: list[tuple[Path, bool]] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            candidates = [(path.parent, True)] if path.name == "result.json" else []
        elif path.is_dir():
            candidates = _find_jobs_in(path)
        else:
            candidates = []
        for job_dir, has_result in candidates:
            key = job_dir.resolve()
            if key not in seen:
                seen.add(key)
                jobs.append((job_dir, has_result))
    return jobs


# ---------------------------------------------------------------- gathering


def _flatten(tree, prefix: str = "") -> dict:
    """Nested dicts -> {dotted.key: value}; lists stay as values."""
    flat: dict = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                flat.update(_flatten(value, name + "."))
            else:
                flat[name] = value
    return flat


def _is_spec_key(dotted: str) -> bool:
    head = dotted.split(".", 1)[0]
    return head in SPEC_SUBTREES


def _cell(value):
    """A value fit for a DataFrame cell and a CSV: lists and dicts become JSON text."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def _error_text(error) -> str | None:
    if error is None:
        return None
    if isinstance(error, dict):
        message = error.get("message") or ""
        kind = error.get("type")
        return f"{kind}: {message}" if kind else message
    return str(error)


def _load_yaml(path: Path):
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        return None


def _parse_override_list(items) -> dict[str, str]:
    """Hydra's overrides.yaml list ("key=value", "+key=value") -> {key: value}."""
    parsed: dict[str, str] = {}
    for item in items or []:
        text = str(item)
        if "=" not in text or text.startswith("~"):
            continue
        key, value = text.split("=", 1)
        parsed[key.lstrip("+")] = value
    return parsed


@dataclass
class RunRecord:
    """One run as read from disk: the row for the frame plus its table spec (if any)."""

    row: dict
    spec: dict | None = None
    items: list | None = None


def _spec_from(table, report) -> dict | None:
    spec = dict(table) if isinstance(table, dict) and table else None
    if isinstance(report, list) and report:
        spec = spec if spec is not None else {}
        spec.setdefault("report", report)
    return spec


def _record_from_result(job_dir: Path) -> RunRecord:
    try:
        result = read_json(job_dir / "result.json")
    except (OSError, ValueError) as exc:
        return RunRecord({"job_dir": str(job_dir), "status": "failed", "error": f"unreadable result.json: {exc}"})
    if not isinstance(result, dict):
        return RunRecord({"job_dir": str(job_dir), "status": "failed", "error": "result.json is not an object"})
    row = {
        "job_dir": str(job_dir),
        "status": result.get("status") or "failed",
        "error": _error_text(result.get("error")),
        "seed": result.get("seed"),
        "method": result.get("method"),
        "experiment": result.get("experiment"),
        "config_hash": result.get("config_hash"),
    }
    if result.get("baseline"):
        row["baseline"] = str(result["baseline"])
    for key, value in (result.get("overrides") or {}).items():
        row[f"override.{key}"] = _cell(value)
    for key, value in (result.get("choices") or {}).items():
        row[f"choice.{key}"] = _cell(value)
    config = result.get("config") or {}
    for key, value in _flatten(config).items():
        if not _is_spec_key(key):
            row[f"cfg.{key}"] = _cell(value)
    metrics = result.get("metrics") or {}
    items = metrics.get(ITEMS_METRIC)
    items = items if isinstance(items, list) and items and all(isinstance(i, dict) for i in items) else None
    _add_metrics(row, {k: v for k, v in metrics.items() if not (items and k == ITEMS_METRIC)})
    table = result.get("table") or config.get("table") or nested_config(config, "table")
    spec = _spec_from(table, result.get("report") or config.get("report"))
    return RunRecord(row, spec, items)


def _add_metrics(row: dict, metrics: dict) -> None:
    """Metrics into a frame row; a list metric becomes <metric>.1, <metric>.2, ..."""
    for name, value in metrics.items():
        if isinstance(value, (list, tuple)):
            for index, item in enumerate(value, start=1):
                row[f"{name}.{index}"] = item
        else:
            row[name] = value


def _is_identity_column(name: str) -> bool:
    return name in BASE_COLUMNS or name in OPTIONAL_BASE_COLUMNS or any(name.startswith(p) for p in FIELD_PREFIXES)


def _expand_items(record: RunRecord) -> list[RunRecord]:
    """A run whose metrics hold `items` -> one record per item: the run's identity, the item's
    text values as item.<key> fields and its other values as metrics (the run's own metrics are dropped)."""
    if not record.items:
        return [record]
    identity = {key: value for key, value in record.row.items() if _is_identity_column(key)}
    expanded = []
    for item in record.items:
        row = dict(identity)
        row.update({f"item.{key}": value for key, value in item.items() if isinstance(value, str)})
        _add_metrics(row, {key: value for key, value in item.items() if not isinstance(value, (str, dict))})
        expanded.append(RunRecord(row, record.spec))
    return expanded


def _record_from_hydra(job_dir: Path) -> RunRecord:
    """A job that started (Hydra wrote .hydra/) but left no result.json."""
    hydra_dir = job_dir / ".hydra"
    overrides = _parse_override_list(_load_yaml(hydra_dir / "overrides.yaml"))
    config = _load_yaml(hydra_dir / "config.yaml")
    config = config if isinstance(config, dict) else {}
    hydra = _load_yaml(hydra_dir / "hydra.yaml")
    choices = {}
    if isinstance(hydra, dict):
        choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    method = config.get("method")
    row = {
        "job_dir": str(job_dir),
        "status": "missing",
        "error": "no result.json",
        "seed": overrides.get("seed", config.get("seed")),
        "method": method.get("name") if isinstance(method, dict) else None,
        "experiment": choices.get("experiment") or config.get("experiment_name"),
        "config_hash": None,
    }
    for key, value in overrides.items():
        row[f"override.{key}"] = value
    for key, value in choices.items():
        if not str(key).startswith("hydra/"):
            row[f"choice.{key}"] = _cell(value)
    for key, value in _flatten(config).items():
        if not _is_spec_key(key):
            row[f"cfg.{key}"] = _cell(value)
    return RunRecord(row, _spec_from(config.get("table"), config.get("report")))


def _gather_records(paths) -> list[RunRecord]:
    records = [
        _record_from_result(job_dir) if has_result else _record_from_hydra(job_dir)
        for job_dir, has_result in find_jobs(paths)
    ]
    return [expanded for record in records for expanded in _expand_items(record)]


def _frame_from_records(records: list[RunRecord]) -> pd.DataFrame:
    groups: dict[str, list[str]] = {"prefixed": [], "metrics": []}
    optional = [name for name in OPTIONAL_BASE_COLUMNS if any(name in record.row for record in records)]
    seen = set(BASE_COLUMNS) | set(optional)
    for record in records:
        for key in record.row:
            if key not in seen:
                seen.add(key)
                target = "prefixed" if any(key.startswith(p) for p in FIELD_PREFIXES) else "metrics"
                groups[target].append(key)
    prefixed = sorted(groups["prefixed"], key=lambda k: FIELD_PREFIXES.index(k.split(".", 1)[0] + "."))
    columns = BASE_COLUMNS + optional + prefixed + groups["metrics"]
    frame = pd.DataFrame([record.row for record in records], columns=columns, dtype=object)
    frame["seed"] = _integer_column(frame["seed"])
    for name in groups["metrics"]:
        frame[name] = pd.to_numeric(frame[name], errors="coerce")
    return frame


def _integer_column(column: pd.Series) -> pd.Series:
    """Seeds as nullable integers when every present value is a whole number; else unchanged."""
    numbers = pd.to_numeric(column, errors="coerce")
    present = column.map(lambda v: field_text(v) != "")
    if numbers[present].notna().all() and (numbers[present] % 1 == 0).all():
        return numbers.astype("Int64")
    return column


def gather(paths) -> pd.DataFrame:
    """One row per run found under paths (ok, diverged, failed and missing jobs alike)."""
    return _frame_from_records(_gather_records(paths))


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """Columns of a gathered frame that hold metrics."""
    return [
        column
        for column in frame.columns
        if not _is_identity_column(column)
    ]


# ---------------------------------------------------------------- field values


def field_text(value) -> str:
    """Canonical text of a field value, so 4, 4.0 and "4" compare equal; absent -> ""."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def field_values(frame: pd.DataFrame, name: str) -> pd.Series:
    """A field per run as text: result items, overrides, then choices, then config, then top-level keys."""
    sources = [f"item.{name}", f"override.{name}", f"choice.{name}", f"cfg.{name}"]
    if name in TOP_LEVEL_FIELDS:
        sources.append(name)
    sources = [source for source in sources if source in frame.columns]
    if not sources:
        raise ValueError(f"table field {name!r} is not an override, choice, config key or result key of any run")
    values = []
    for run in frame[sources].itertuples(index=False, name=None):
        texts = (field_text(value) for value in run)
        values.append(next((text for text in texts if text), ""))
    return pd.Series(values, index=frame.index, dtype=object)


def auto_row_fields(frame: pd.DataFrame, exclude=()) -> list[str]:
    """Override keys (not seed) taking more than one value; else experiment/method if they vary."""
    keys = [c[len("override."):] for c in frame.columns if c.startswith("override.")]
    varying = [k for k in keys if k != "seed" and k not in exclude and field_values(frame, k).nunique() > 1]
    if varying:
        return varying
    return [k for k in ("experiment", "method") if k not in exclude and field_values(frame, k).nunique() > 1]


# ---------------------------------------------------------------- the table


@dataclass
class ComparisonTable:
    """A built table: `display` (formatted strings, as in table.md) and `numeric` (table.csv)."""

    title: str
    row_fields: list[str]
    column_fields: list[str]
    values: list[str]
    display: pd.DataFrame
    numeric: pd.DataFrame
    markdown: str
    cell_labels: list[str] = field(default_factory=list)


def _label(labels: dict, name: str, value: str) -> str:
    mapping = labels.get(name)
    if isinstance(mapping, dict):
        for key, shown in mapping.items():
            if field_text(key) == value:
                return str(shown)
    return value if value else NO_VALUE


def _header(labels: dict, name: str) -> str:
    shown = labels.get(name)
    return str(shown) if isinstance(shown, str) else name


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


def _format_report(value) -> str:
    if value is None:
        return ""
    number = _as_number(value)
    if number is None:
        return str(value)
    return format(number, ".6g")


def _entry_matches(entry: dict, key: dict[str, str]) -> bool:
    return all(field_text(entry[name]) == value for name, value in key.items() if name in entry)


def _report_value(report: list, key: dict[str, str], value_name: str):
    for entry in report:
        if isinstance(entry, dict) and value_name in entry and _entry_matches(entry, key):
            return entry[value_name]
    return None


def _ordered_keys(observed: list[tuple], report: list, fields: list[str]) -> list[tuple]:
    """Keys in order of first appearance in the report, then the rest sorted."""
    ordered: list[tuple] = []
    for entry in report:
        if isinstance(entry, dict) and all(name in entry for name in fields):
            key = tuple(field_text(entry[name]) for name in fields)
            if key not in ordered:
                ordered.append(key)
    rest = sorted(set(observed) - set(ordered), key=lambda key: [_value_sort_key(part) for part in key])
    return ordered + rest


def _markdown_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |"]
    lines.append("|" + "|".join("---" for _ in frame.columns) + "|")
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def _default_values(frame: pd.DataFrame) -> list[str]:
    metrics = metric_columns(frame)
    preferred = [name for name in PREFERRED_VALUES if name in metrics]
    return preferred or metrics


def _default_title(frame: pd.DataFrame) -> str:
    experiments = sorted({field_text(v) for v in frame["experiment"]} - {""}) if len(frame) else []
    return ", ".join(experiments) if experiments else "Comparison"


def _pivot_suffix(labels: dict, column_fields: list[str], col_key: tuple) -> str:
    if not column_fields:
        return ""
    return " [" + ", ".join(f"{f}={_label(labels, f, v)}" for f, v in zip(column_fields, col_key)) + "]"


def _summary(sample: np.ndarray) -> tuple[float, float, int]:
    """Mean, std (ddof=1; NaN below two values) and count of the finite values."""
    sample = sample[np.isfinite(sample)]
    mean = float(sample.mean()) if sample.size else math.nan
    std = float(sample.std(ddof=1)) if sample.size > 1 else math.nan
    return mean, std, int(sample.size)


def _is_data_field(name: str) -> bool:
    """Fields of the data group: a baseline row keeps these and drops every other field."""
    return name == "data" or name.startswith("data.")


def _baseline_mask(frame: pd.DataFrame) -> np.ndarray:
    """True for runs that are classical baselines beside a sweep (result.json has `baseline`)."""
    if "baseline" not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    return frame["baseline"].map(lambda value: field_text(value) != "").to_numpy(dtype=bool)


def _key_matches(run_key: tuple, key: tuple) -> bool:
    """A run's key against a table key; None in the run's key (a baseline's pivot field) matches any value."""
    return all(part is None or part == value for part, value in zip(run_key, key))


def build_table(frame: pd.DataFrame, spec: dict | None = None) -> ComparisonTable:
    """Mean ± std of each value per row key (and pivot column key), beside the report's numbers.

    Baseline runs become rows labelled `classical: <algorithm>` (plus the image side when the
    baselines ran at several) after the others, in every pivot column; `mean_row: true` adds a
    row of the means over the other rows (docs/BASELINES.md).
    """
    spec = dict(spec or {})
    column_fields = [str(f) for f in spec.get("columns") or []]
    baseline = _baseline_mask(frame)
    regular = frame[~baseline] if (~baseline).any() else frame
    row_fields = [str(f) for f in spec["rows"]] if spec.get("rows") else auto_row_fields(regular, column_fields)
    label_field = None
    if baseline.any():
        label_field = next((f for f in row_fields if not _is_data_field(f)), None)
        if label_field is None:
            row_fields, label_field = ["method"] + row_fields, "method"
    values = [str(v) for v in spec.get("values") or _default_values(frame)]
    formats = spec.get("format") or {}
    labels = spec.get("labels") or {}
    report = [entry for entry in spec.get("report") or [] if isinstance(entry, dict)]
    title = str(spec.get("title") or _default_title(frame))

    keyed = {name: field_values(frame, name) for name in dict.fromkeys(row_fields + column_fields)}
    row_keys = list(zip(*(keyed[f] for f in row_fields))) if row_fields else [()] * len(frame)
    col_keys = list(zip(*(keyed[f] for f in column_fields))) if column_fields else [()] * len(frame)
    positions = np.flatnonzero(baseline)
    sizes = frame["image_size"].map(field_text) if "image_size" in frame.columns else pd.Series("", index=frame.index)
    sizes_vary = len({sizes.iloc[p] for p in positions} - {""}) > 1
    for position in positions:
        label = BASELINE_LABEL.format(field_text(frame["baseline"].iloc[position]))
        if sizes_vary and sizes.iloc[position]:
            label += f" ({sizes.iloc[position]} px)"
        row_keys[position] = tuple(
            label if f == label_field else keyed[f].iloc[position] if _is_data_field(f) else "" for f in row_fields)
        col_keys[position] = tuple(keyed[f].iloc[position] if _is_data_field(f) else None for f in column_fields)
    rows_order = _ordered_keys([k for k, b in zip(row_keys, baseline) if not b], report, row_fields)
    baseline_rows = sorted({k for k, b in zip(row_keys, baseline) if b} - set(rows_order),
                           key=lambda key: [_value_sort_key(part) for part in key])
    observed_cols = [k for k, b in zip(col_keys, baseline) if not b]
    observed_cols = observed_cols or [tuple("" if part is None else part for part in k) for k in col_keys]
    cols_order = _ordered_keys(observed_cols, report, column_fields)
    is_ok = frame["status"].map(lambda status: status == "ok").to_numpy(dtype=bool)
    numbers = {
        name: pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
        if name in frame.columns else np.full(len(frame), np.nan)
        for name in values
    }
    plan = [(key, "regular") for key in rows_order]
    if spec.get("mean_row") and row_fields and rows_order:
        plan.append(((MEAN_ROW_LABEL,) + ("",) * (len(row_fields) - 1), "mean"))
    plan += [(key, "baseline") for key in baseline_rows]

    numeric_rows, display_rows, cell_labels = [], [], []
    reported: set[tuple[tuple, str]] = set()
    row_means: dict[tuple, list[float]] = {}
    totals: dict[tuple, list[int]] = {}
    for row_key, kind in plan:
        display = {_header(labels, f): _label(labels, f, v) for f, v in zip(row_fields, row_key)}
        display["n"] = display["failed"] = 0
        row_members = np.zeros(len(frame), dtype=bool)
        for col_key in cols_order:
            key = dict(zip(row_fields, row_key)) | dict(zip(column_fields, col_key))
            numeric = dict(key)
            suffix = _pivot_suffix(labels, column_fields, col_key)
            members = np.array([rk == row_key and _key_matches(ck, col_key) for rk, ck in zip(row_keys, col_keys)],
                               dtype=bool)
            ok = members & is_ok
            for name in values:
                if kind == "mean":
                    mean, std, count = _summary(np.array(row_means.get((col_key, name), []), dtype=float))
                else:
                    mean, std, count = _summary(numbers[name][ok])
                report_value = _report_value(report, key, name) if kind == "regular" else None
                numeric[f"{name}_mean"] = mean
                numeric[f"{name}_std"] = std
                numeric[f"{name}_report"] = report_value if _as_number(report_value) is None else float(report_value)
                header = _header(labels, name) + suffix
                shown = _format_ours(mean, std, count, str(formats.get(name, DEFAULT_FORMAT)))
                display[header] = NO_VALUE if kind == "baseline" and count == 0 and ok.any() else shown
                display[header + " (report)"] = _format_report(report_value)
                if report_value is not None:
                    reported.add((col_key, name))
                if kind == "regular":
                    row_means.setdefault((col_key, name), []).append(mean)
            if kind == "mean":
                numeric["n"], numeric["failed"] = totals.get(col_key, [0, 0])
                display["n"] += numeric["n"]
                display["failed"] += numeric["failed"]
            else:
                numeric["n"] = int(ok.sum())
                numeric["failed"] = int((members & ~is_ok).sum())
                row_members |= members
            if kind == "regular":
                cell_total = totals.setdefault(col_key, [0, 0])
                cell_total[0] += numeric["n"]
                cell_total[1] += numeric["failed"]
            numeric_rows.append(numeric)
            fields_and_values = zip(row_fields + column_fields, row_key + col_key)
            cell_labels.append(", ".join(_label(labels, f, v) for f, v in fields_and_values))
        if kind != "mean":
            display["n"] = int((row_members & is_ok).sum())
            display["failed"] = int((row_members & ~is_ok).sum())
        display_rows.append(display)

    numeric_columns = list(dict.fromkeys(row_fields + column_fields))
    numeric_columns += [f"{name}_{part}" for name in values for part in ("mean", "std", "report")] + ["n", "failed"]
    numeric_frame = pd.DataFrame(numeric_rows, columns=numeric_columns)

    display_columns = [_header(labels, f) for f in row_fields]
    for col_key in cols_order:
        suffix = _pivot_suffix(labels, column_fields, col_key)
        for name in values:
            display_columns.append(_header(labels, name) + suffix)
            if (col_key, name) in reported:
                display_columns.append(_header(labels, name) + suffix + " (report)")
    display_columns += ["n", "failed"]
    display_frame = pd.DataFrame(display_rows, columns=display_columns, dtype=object)
    markdown = f"## {title}\n\n{_markdown_table(display_frame)}\n"
    return ComparisonTable(
        title, row_fields, column_fields, values, display_frame, numeric_frame, markdown, cell_labels
    )


# ---------------------------------------------------------------- plots


def _run_labels(frame: pd.DataFrame, table: ComparisonTable, spec: dict) -> list[str]:
    labels = (spec or {}).get("labels") or {}
    fields = list(dict.fromkeys(table.row_fields + table.column_fields))
    columns = {name: field_values(frame, name) for name in fields}
    texts = []
    for index in frame.index:
        key = ", ".join(_label(labels, name, columns[name][index]) for name in fields) or "run"
        texts.append(f"{key}, seed {field_text(frame.loc[index, 'seed']) or '?'}")
    return texts


def _read_curve(job_dir: str) -> pd.DataFrame | None:
    path = Path(job_dir) / "curve.csv"
    if not path.is_file():
        return None
    try:
        curve = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None
    if "step" not in curve.columns or "psnr" not in curve.columns:
        return None
    return curve


def stage_starts(curve: pd.DataFrame) -> list[float]:
    """First step of every stage after the first one."""
    if "stage" not in curve.columns or curve.empty:
        return []
    stages = curve["stage"].to_numpy()
    steps = pd.to_numeric(curve["step"], errors="coerce").to_numpy(dtype=float)
    return [float(steps[i]) for i in range(1, len(stages)) if stages[i] != stages[i - 1]]


def plot_curves(frame: pd.DataFrame, table: ComparisonTable, spec: dict, path) -> Path | None:
    """PSNR against step for every run with a curve.csv; dotted lines where stages start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _run_labels(frame, table, spec)
    figure, axes = plt.subplots(figsize=(8, 5))
    drawn = 0
    for position, index in enumerate(frame.index):
        curve = _read_curve(frame.loc[index, "job_dir"])
        if curve is None:
            continue
        psnr = pd.to_numeric(curve["psnr"], errors="coerce")
        step = pd.to_numeric(curve["step"], errors="coerce")
        evaluated = psnr.notna() & step.notna()
        if not evaluated.any():
            continue
        (line,) = axes.plot(step[evaluated], psnr[evaluated], label=labels[position], linewidth=1.2)
        for start in stage_starts(curve):
            axes.axvline(start, color=line.get_color(), linestyle=":", linewidth=0.8, alpha=0.7)
        drawn += 1
    if drawn == 0:
        plt.close(figure)
        return None
    axes.set_xlabel("step")
    axes.set_ylabel("PSNR (dB)")
    axes.set_title(table.title)
    axes.grid(True, alpha=0.3)
    if drawn <= 30:
        axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure_atomic(path, figure)


def plot_bars(table: ComparisonTable, path) -> Path | None:
    """The first value per table cell: mean with std error bars, report numbers as markers."""
    if not table.values or table.numeric.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = table.values[0]
    means = table.numeric[f"{name}_mean"].to_numpy(dtype=float)
    stds = table.numeric[f"{name}_std"].to_numpy(dtype=float)
    reports = pd.to_numeric(table.numeric[f"{name}_report"], errors="coerce").to_numpy(dtype=float)
    positions = np.arange(len(means))
    finite = np.isfinite(means)
    figure, axes = plt.subplots(figsize=(max(4.0, 0.8 * len(means) + 2.0), 4.5))
    axes.bar(positions[finite], means[finite], yerr=stds[finite], capsize=4, color="tab:blue", label="ours")
    for position in positions[~finite]:
        axes.text(position, 0.0, MISSING_CELL, ha="center", va="bottom", rotation=90, fontsize="small")
    if np.isfinite(reports).any():
        has_report = np.isfinite(reports)
        axes.scatter(
            positions[has_report], reports[has_report], marker="D", color="tab:red", zorder=3, label="report"
        )
        axes.legend(fontsize="small")
    labels = table.cell_labels or [""] * len(means)
    axes.set_xticks(positions)
    crowded = len(means) > 3
    axes.set_xticklabels(
        [label or "all" for label in labels], rotation=30 if crowded else 0, ha="right" if crowded else "center"
    )
    axes.set_ylabel(name)
    axes.set_title(table.title)
    axes.grid(True, axis="y", alpha=0.3)
    return save_figure_atomic(path, figure)


# ---------------------------------------------------------------- entry points


@dataclass
class CompareOutput:
    """What compare_paths wrote and computed."""

    out_dir: Path
    results_csv: Path
    table_csv: Path
    table_md: Path
    curves_png: Path | None
    bars_png: Path | None
    markdown: str
    n_runs: int
    n_ok: int
    n_failed: int
    frame: pd.DataFrame
    table: ComparisonTable


class NoResultsError(ValueError):
    """No result.json and no started job under the given paths."""


def _not_ok_notes(frame: pd.DataFrame, out_dir: Path) -> str:
    not_ok = frame[frame["status"] != "ok"]
    if not_ok.empty:
        return ""
    lines = [f"Runs not ok: {len(not_ok)}", ""]
    for _, run in not_ok.iterrows():
        job = Path(run["job_dir"])
        try:
            shown = job.resolve().relative_to(out_dir.resolve()).as_posix()
        except ValueError:
            shown = str(job)
        message = (field_text(run["error"]) or "").splitlines()
        detail = f": {message[0]}" if message else ""
        lines.append(f"- `{shown}` {run['status']}{detail}")
    return "\n".join(lines) + "\n"


def _default_out_dir(paths) -> Path:
    first = Path(paths[0])
    return first if first.is_dir() else first.parent


def compare_paths(paths, out_dir=None, spec: dict | None = None) -> CompareOutput:
    """Gather runs under paths and write results.csv, table.csv, table.md, curves.png, bars.png.

    The table spec is `spec` if given, else the first one found among the runs.
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    records = _gather_records(paths)
    if not records:
        raise NoResultsError("no result.json or started job found under: " + " ".join(str(p) for p in paths))
    frame = _frame_from_records(records)
    if spec is None:
        spec = next((record.spec for record in records if record.spec), None) or {}
    out_dir = Path(out_dir) if out_dir is not None else _default_out_dir(paths)
    out_dir.mkdir(parents=True, exist_ok=True)

    table = build_table(frame, spec)
    notes = _not_ok_notes(frame, out_dir)
    markdown = table.markdown + ("\n" + notes if notes else "")
    results_csv = write_csv_atomic(out_dir / "results.csv", frame)
    table_csv = write_csv_atomic(out_dir / "table.csv", table.numeric)
    table_md = write_text_atomic(out_dir / "table.md", markdown)
    curves_png = plot_curves(frame, table, spec, out_dir / "curves.png")
    bars_png = plot_bars(table, out_dir / "bars.png")
    n_ok = int((frame["status"] == "ok").sum())
    return CompareOutput(
        out_dir=out_dir,
        results_csv=results_csv,
        table_csv=table_csv,
        table_md=table_md,
        curves_png=curves_png,
        bars_png=bars_png,
        markdown=markdown,
        n_runs=len(frame),
        n_ok=n_ok,
        n_failed=len(frame) - n_ok,
        frame=frame,
        table=table,
    )


def cli(argv=None) -> int:
    """dipddpm-compare PATH... [--out DIR] [--quiet]; 0 on success (failed runs are marked), 2 on no input."""
    parser = argparse.ArgumentParser(
        prog="dipddpm-compare",
        description="Turn sweep results (result.json files) into results.csv, table.csv/md and plots.",
    )
    parser.add_argument("paths", nargs="+", help="sweep directories, job directories or result.json files")
    parser.add_argument("--out", default=None, help="output folder (default: the first path if it is a folder)")
    parser.add_argument("--quiet", action="store_true", help="print only the paths written, not the table")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"dipddpm-compare: no such path: {' '.join(missing)}", file=sys.stderr)
        return 2
    try:
        output = compare_paths(args.paths, out_dir=args.out)
    except ValueError as exc:
        print(f"dipddpm-compare: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(output.markdown)
    for path in (output.results_csv, output.table_csv, output.table_md, output.curves_png, output.bars_png):
        if path is not None:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
