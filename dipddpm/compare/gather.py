"""Gathering: result.json files (and started jobs' .hydra records) -> one frame row per run.

Column scheme of the gathered frame (and of results.csv):
  job_dir status error seed method experiment config_hash   run identity
  uses_clean_image     result.json's flag (true: the clean image steered the run), when recorded
  override.<key>       the job's sweep overrides (strings)
  choice.<group>       config group choices
  cfg.<dotted.key>     flattened config (table/report/hydra subtrees left out)
  <metric>             metrics; list metrics become <metric>.1, <metric>.2, ...
  baseline, item.<key> a classical baseline's algorithm; a result item's text values (one row per item)
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dipddpm.io import read_json
from dipddpm.sweep import nested_config

BASE_COLUMNS = ["job_dir", "status", "error", "seed", "method", "experiment", "config_hash"]
OPTIONAL_BASE_COLUMNS = ["baseline", "uses_clean_image", "note"]   # present only when some run has them (note: text in place of numbers)
FIELD_PREFIXES = ["override.", "choice.", "cfg.", "item."]
TOP_LEVEL_FIELDS = ["method", "experiment", "seed", "status", "config_hash", "baseline", "uses_clean_image"]
ITEMS_METRIC = "items"                   # a list of per-item dicts in metrics: one frame row per item
AVERAGED_METRIC = "replicas_averaged"    # set when method.replica_output=mean: items are replicas of one image
SPEC_SUBTREES = ("table", "report", "hydra")


# ---------------------------------------------------------------- discovery


def _natural_key(text: str):
    """Sort key that orders embedded integers numerically ("2" before "10")."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def value_sort_key(text: str):
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
    if isinstance(result.get("uses_clean_image"), bool):
        row["uses_clean_image"] = result["uses_clean_image"]
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
    if AVERAGED_METRIC in metrics:  # replicas averaged into one returned image: the job is one run
        items = None
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


def gather_records(paths) -> list[RunRecord]:
    records = [
        _record_from_result(job_dir) if has_result else _record_from_hydra(job_dir)
        for job_dir, has_result in find_jobs(paths)
    ]
    return [expanded for record in records for expanded in _expand_items(record)]


def frame_from_records(records: list[RunRecord]) -> pd.DataFrame:
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
    return frame_from_records(gather_records(paths))


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """Columns of a gathered frame that hold metrics."""
    return [
        column
        for column in frame.columns
        if not _is_identity_column(column)
    ]


# ---------------------------------------------------------------- field values


def baseline_mask(frame: pd.DataFrame) -> np.ndarray:
    """True for runs that are baselines beside a sweep (result.json has `baseline`); such a run
    carries the config of the job whose observation it denoised."""
    if "baseline" not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    return frame["baseline"].map(lambda value: field_text(value) != "").to_numpy(dtype=bool)


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
