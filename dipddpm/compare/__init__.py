"""dipddpm-compare: sweep results (result.json, curve.csv) -> results.csv, table.csv/md, plots.

gather (result.json -> one frame row per run) -> table (one builder per row kind, deltas) ->
render (md, csv, latex) and plots -> cli (compare_paths, the command line, the end-of-sweep
callback). docs/COMPARE.md describes the table spec and the command line.
"""

from dipddpm.compare.cli import CompareOutput, NoResultsError, SweepTableCallback, cli, compare_paths
from dipddpm.compare.gather import TOP_LEVEL_FIELDS, field_text, field_values, find_jobs, gather, metric_columns
from dipddpm.compare.keys import UnknownKeyError, short_names
from dipddpm.compare.plots import plot_bars, plot_curves, stage_starts
from dipddpm.compare.table import ComparisonTable, auto_row_fields, build_table

__all__ = [
    "CompareOutput", "ComparisonTable", "NoResultsError", "SweepTableCallback", "TOP_LEVEL_FIELDS",
    "UnknownKeyError", "auto_row_fields", "build_table", "cli", "compare_paths", "field_text", "field_values",
    "find_jobs", "gather", "metric_columns", "plot_bars", "plot_curves", "short_names", "stage_starts",
]
