"""Plots of a comparison: bars grouped by row and coloured by pivot column (± std over seeds),
PSNR curves with one colour and one legend entry per table cell. Each as PNG plus SVG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dipddpm.compare.gather import field_values
from dipddpm.compare.keys import Labels
from dipddpm.compare.table import ALL_COLLAPSED_CELL, MISSING_CELL, ComparisonTable
from dipddpm.io import save_figure_atomic

MAX_LEGEND_ENTRIES = 30


def axis_label(metric: str) -> str:
    """The metric's name with its unit: `psnr_final (dB)`, `wall_seconds (s)`."""
    unit = "dB" if metric.startswith("psnr") else "s" if metric.endswith("seconds") else ""
    return f"{metric} ({unit})" if unit else metric


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cell_of_runs(frame: pd.DataFrame, table: ComparisonTable, spec: dict) -> list[str]:
    """Each run's table cell as a short label: row labels joined by ', ', then the column label."""
    fields = list(dict.fromkeys(table.row_fields + table.column_fields))
    columns = {name: field_values(frame, name) for name in fields}
    labels = Labels((spec or {}).get("labels"), columns)
    texts = []
    for index in frame.index:
        row = ", ".join(labels.value(f, columns[f][index]) for f in table.row_fields)
        column = labels.combined(table.column_fields, tuple(columns[f][index] for f in table.column_fields))
        texts.append(" · ".join(part for part in (row, column if table.column_fields else "") if part) or "run")
    return texts


def _read_curve(job_dir: str, file_name: str, y: str) -> pd.DataFrame | None:
    path = Path(job_dir) / file_name
    if not path.is_file():
        return None
    try:
        curve = pd.read_csv(path)
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None
    if "step" not in curve.columns or y not in curve.columns:
        return None
    return curve


def stage_starts(curve: pd.DataFrame) -> list[float]:
    """First step of every stage after the first one."""
    if "stage" not in curve.columns or curve.empty:
        return []
    stages = curve["stage"].to_numpy()
    steps = pd.to_numeric(curve["step"], errors="coerce").to_numpy(dtype=float)
    return [float(steps[i]) for i in range(1, len(stages)) if stages[i] != stages[i - 1]]


def plot_curves(frame: pd.DataFrame, table: ComparisonTable, spec: dict, path, file_name: str = "curve.csv",
                y: str = "psnr") -> Path | None:
    """Column ``y`` (PSNR by default) against step for every run with a ``file_name`` in its folder
    (curve.csv; R5's rd_curve.csv with y="rmse"), one colour and legend entry per table cell (its
    seeds share them); dotted lines where stages start. None (nothing written) when no run has one."""
    plt = _pyplot()
    cells = _cell_of_runs(frame, table, spec)
    colours = {cell: f"C{i % 10}" for i, cell in enumerate(dict.fromkeys(cells))}
    figure, axes = plt.subplots(figsize=(8, 5))
    drawn: set[str] = set()
    for cell, job_dir in zip(cells, frame["job_dir"]):
        curve = _read_curve(job_dir, file_name, y)
        if curve is None:
            continue
        values = pd.to_numeric(curve[y], errors="coerce")
        step = pd.to_numeric(curve["step"], errors="coerce")
        evaluated = values.notna() & step.notna()
        if not evaluated.any():
            continue
        axes.plot(step[evaluated], values[evaluated], color=colours[cell], linewidth=1.2,
                  label=None if cell in drawn else cell)
        for start in stage_starts(curve):
            axes.axvline(start, color=colours[cell], linestyle=":", linewidth=0.8, alpha=0.7)
        drawn.add(cell)
    if not drawn:
        plt.close(figure)
        return None
    axes.set_xlabel("step")
    axes.set_ylabel(axis_label(y))
    axes.set_title(table.title)
    axes.grid(True, alpha=0.3)
    if len(drawn) <= MAX_LEGEND_ENTRIES:
        axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure_atomic(path, figure, svg=True)


def plot_bars(table: ComparisonTable, path) -> Path | None:
    """The first value: bars grouped by row and coloured by pivot column, mean ± std over seeds,
    the report's numbers as red diamonds. The mean row is left out."""
    if not table.values or table.numeric.empty:
        return None
    plt = _pyplot()
    name = table.values[0]
    shown = np.array([kind != "mean" for kind in table.cell_kinds], dtype=bool)
    numeric = table.numeric[shown]
    means = numeric[f"{name}_mean"].to_numpy(dtype=float)
    stds = np.nan_to_num(numeric[f"{name}_std"].to_numpy(dtype=float))
    reports = pd.to_numeric(numeric[f"{name}_report"], errors="coerce").to_numpy(dtype=float)
    rows = [label for label, keep in zip(table.cell_rows, shown) if keep]
    columns = [label for label, keep in zip(table.cell_columns, shown) if keep]
    groups, series = list(dict.fromkeys(rows)), list(dict.fromkeys(columns))
    width = 0.8 / len(series)
    offsets = {label: (i - (len(series) - 1) / 2) * width for i, label in enumerate(series)}
    positions = np.array([groups.index(r) + offsets[c] for r, c in zip(rows, columns)])
    figure, axes = plt.subplots(figsize=(max(4.0, 0.5 * len(means) + 0.6 * len(groups) + 2.0), 4.5))
    finite = np.isfinite(means)
    for i, label in enumerate(series):
        chosen = finite & np.array([c == label for c in columns])
        axes.bar(positions[chosen], means[chosen], width=width, yerr=stds[chosen], capsize=3,
                 color=f"C{i % 10}", label=label or None)
    collapsed = numeric["collapsed"].fillna(0).to_numpy(dtype=float) if "collapsed" in numeric else np.zeros(len(means))
    for position, all_collapsed in zip(positions[~finite], collapsed[~finite] > 0):
        axes.text(position, 0.0, ALL_COLLAPSED_CELL if all_collapsed else MISSING_CELL, ha="center", va="bottom",
                  rotation=90, fontsize="small")
    if np.isfinite(reports).any():
        has_report = np.isfinite(reports)
        axes.scatter(positions[has_report], reports[has_report], marker="D", color="tab:red", zorder=3,
                     label="report")
    if len(series) > 1 or np.isfinite(reports).any():
        axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.set_xticks(np.arange(len(groups)))
    crowded = len(groups) > 3
    axes.set_xticklabels([label or "all" for label in groups], rotation=30 if crowded else 0,
                         ha="right" if crowded else "center")
    axes.set_ylabel(axis_label(name))
    axes.set_title(table.title)
    axes.grid(True, axis="y", alpha=0.3)
    return save_figure_atomic(path, figure, svg=True)

