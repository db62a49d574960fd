"""Keys and labels: a user's key -> a field or metric of the gathered frame, readable value labels."""

from __future__ import annotations

import difflib
from pathlib import PurePosixPath

import pandas as pd

from dipddpm.compare.gather import FIELD_PREFIXES, TOP_LEVEL_FIELDS, field_text, metric_columns

NO_VALUE = "—"
COMBINED_SEPARATOR = "/"


class UnknownKeyError(ValueError):
    """A key that no run has; the message names the nearest keys that exist."""


def field_names(frame: pd.DataFrame) -> list[str]:
    """Fields a table can be keyed by: overrides, choices, config keys and result items (without
    their prefixes), and the top-level keys (method, experiment, seed, ...)."""
    names = [column.split(".", 1)[1] for column in frame.columns
             if any(column.startswith(prefix) for prefix in FIELD_PREFIXES)]
    names += [name for name in TOP_LEVEL_FIELDS if name in frame.columns]
    return list(dict.fromkeys(names))


def _strip_prefix(key: str) -> str:
    prefix = next((p for p in FIELD_PREFIXES if key.startswith(p)), "")
    return key[len(prefix):]


def _unknown(option: str, key: str, candidates: list[str]) -> UnknownKeyError:
    nearest = difflib.get_close_matches(key, candidates, n=4, cutoff=0.5)
    nearest = nearest or difflib.get_close_matches(_strip_prefix(key), candidates, n=4, cutoff=0.0)
    return UnknownKeyError(f"{option} {key}: no run has this key; nearest: {', '.join(nearest) or 'none'}")


def resolve_field(frame: pd.DataFrame, key: str, option: str) -> str:
    """A field name for `key` given with or without its prefix (`cfg.data.path` or `data.path`)."""
    names = field_names(frame)
    name = _strip_prefix(key) if key not in names else key
    if name not in names:
        raise _unknown(option, key, names)
    return name


# a run's flag that a table may show as a value column (no / yes / mixed per cell)
FLAG_VALUES = ("uses_clean_image",)


def resolve_metric(frame: pd.DataFrame, key: str, option: str) -> str:
    metrics = metric_columns(frame) + [flag for flag in FLAG_VALUES if flag in frame.columns]
    if key not in metrics:
        raise _unknown(option, key, metrics)
    return key


def _looks_like_path(text: str) -> bool:
    """A file path: absolute or ./-relative, or a relative path with a file suffix (not an
    experiment name such as `staged/levels_1000`)."""
    text = text.replace("\\", "/")
    return "/" in text and (text.startswith(("/", "./", "../", "~")) or bool(PurePosixPath(text).suffix))


def short_names(values) -> dict[str, str]:
    """Path values -> the fewest trailing parts (file stem first) that still tell them apart.

    ["/a/set5/bird.png", "/a/set5/head.png"] -> {..: "bird", ..: "head"};
    ["/x/a/img.png", "/y/b/img.png"] -> {..: "a/img", ..: "b/img"}. Other values are left out.
    """
    paths = sorted({text for text in values if _looks_like_path(text)})
    parts = {text: PurePosixPath(text.replace("\\", "/")) for text in paths}
    parts = {text: path.parent.parts + (path.stem,) for text, path in parts.items()}
    for depth in range(1, max((len(p) for p in parts.values()), default=0) + 1):
        shown = {text: "/".join(p[-depth:]) for text, p in parts.items()}
        if len(set(shown.values())) == len(shown):
            return shown
    return {text: text for text in paths}


class Labels:
    """Display names: the table spec's `labels` map first, then shortened paths, then the value."""

    def __init__(self, spec_labels: dict | None, frame_values: dict[str, pd.Series]):
        self.spec = spec_labels or {}
        self.short = {name: short_names(values) for name, values in frame_values.items()}

    def value(self, name: str, value: str) -> str:
        mapping = self.spec.get(name)
        if isinstance(mapping, dict):
            for key, shown in mapping.items():
                if field_text(key) == value:
                    return str(shown)
        shown = self.short.get(name, {}).get(value, value)
        return shown if shown else NO_VALUE

    def header(self, name: str) -> str:
        shown = self.spec.get(name)
        return str(shown) if isinstance(shown, str) else name

    def combined(self, names: list[str], key: tuple) -> str:
        """Several fields' values as one label, empty ones left out: `dip`, `classical/bm3d`."""
        parts = [self.value(name, value) for name, value in zip(names, key) if value]
        return COMBINED_SEPARATOR.join(parts) or NO_VALUE
