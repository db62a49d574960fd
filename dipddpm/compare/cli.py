"""Entry points: compare_paths (gather -> table -> files), the dipddpm-compare command line, and
the end-of-sweep table callback (conf/train.yaml's hydra.callbacks.sweep_table)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from dipddpm.compare.gather import field_text, frame_from_records, gather_records
from dipddpm.compare.keys import resolve_field, resolve_metric
from dipddpm.compare.plots import plot_bars, plot_curves
from dipddpm.compare.render import FORMATS, render
from dipddpm.compare.table import ComparisonTable, build_table, select_runs
from dipddpm.io import write_csv_atomic, write_text_atomic
from dipddpm.sweep import Callback

log = logging.getLogger("dipddpm")


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
    """Gather runs under paths and write results.csv, table.csv, table.md, curves.png, bars.png
    (plus .svg). The table spec is `spec` if given, else the first one found among the runs."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    return write_comparison(paths, gather_records(paths), out_dir, spec)


def write_comparison(paths: list, records: list, out_dir=None, spec: dict | None = None,
                     options: dict | None = None) -> CompareOutput:
    """compare_paths for gathered records; `options` (rows, columns, values, where, mean_row,
    baseline, pivot_headers) replace the spec's keys."""
    if not records:
        raise NoResultsError("no result.json or started job found under: " + " ".join(str(p) for p in paths))
    frame = frame_from_records(records)
    if spec is None:
        spec = next((record.spec for record in records if record.spec), None) or {}
    spec = dict(spec) | (options or {})
    out_dir = Path(out_dir) if out_dir is not None else _default_out_dir(paths)
    out_dir.mkdir(parents=True, exist_ok=True)

    table = build_table(frame, spec)
    shown = select_runs(frame, spec["where"]) if spec.get("where") else frame
    notes = _not_ok_notes(shown, out_dir)
    markdown = table.markdown + ("\n" + notes if notes else "")
    n_ok = int((shown["status"] == "ok").sum())
    return CompareOutput(
        out_dir=out_dir,
        results_csv=write_csv_atomic(out_dir / "results.csv", frame),
        table_csv=write_csv_atomic(out_dir / "table.csv", table.numeric),
        table_md=write_text_atomic(out_dir / "table.md", markdown),
        curves_png=plot_curves(shown, table, spec, out_dir / "curves.png"),
        bars_png=plot_bars(table, out_dir / "bars.png"),
        markdown=markdown,
        n_runs=len(shown),
        n_ok=n_ok,
        n_failed=len(shown) - n_ok,
        frame=frame,
        table=table,
    )


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _pair(option: str, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{option} {text}: expected KEY=VALUE")
    return key.strip(), value.strip()


def table_options(args, frame: pd.DataFrame) -> dict:
    """The command line's table options as spec keys, every key checked against the runs."""
    options: dict = {}
    if args.rows:
        options["rows"] = [resolve_field(frame, key, "--rows") for key in _split(args.rows)]
    if args.cols:
        options["columns"] = [resolve_field(frame, key, "--cols") for key in _split(args.cols)]
        options["pivot_headers"] = "combined"
    if args.values:
        options["values"] = [resolve_metric(frame, key, "--values") for key in _split(args.values)]
    if args.where:
        pairs = [_pair("--where", text) for text in args.where]
        options["where"] = {resolve_field(frame, key, "--where"): value for key, value in pairs}
    if args.mean:
        options["mean_row"] = True
    if args.baseline:
        key, value = _pair("--baseline", args.baseline)
        options["baseline"] = {resolve_field(frame, key, "--baseline"): value}
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dipddpm-compare",
        description="Turn sweep results (result.json files) into results.csv, table.csv/md and plots. "
                    "Keys are those of results.csv, with or without their prefix (override., choice., cfg.).",
    )
    parser.add_argument("paths", nargs="+", help="sweep directories, job directories or result.json files")
    parser.add_argument("--out", default=None, help="output folder (default: the first path if it is a folder)")
    parser.add_argument("--quiet", action="store_true", help="print only the paths written, not the table")
    parser.add_argument("--rows", help="KEY[,KEY]: row fields (default: the table spec's, or the varying overrides)")
    parser.add_argument("--cols", help="KEY[,KEY]: pivot column fields; several make one label (classical/nlm)")
    parser.add_argument("--values", help="METRIC[,METRIC]: the metrics shown")
    parser.add_argument("--where", action="append", metavar="KEY=VALUE", help="keep only these runs (repeatable)")
    parser.add_argument("--mean", action="store_true", help="add a mean row: mean ± std over the rows")
    parser.add_argument("--baseline", metavar="KEY=VALUE", help="add Δ columns: difference from this column or row")
    parser.add_argument("--format", choices=FORMATS, default="md", help="printed table: md (default), csv or latex")
    return parser


def cli(argv=None) -> int:
    """dipddpm-compare PATH... [options]; 0 on success (failed runs are marked), 2 on bad input."""
    args = _parser().parse_args(argv)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"dipddpm-compare: no such path: {' '.join(missing)}", file=sys.stderr)
        return 2
    try:
        records = gather_records(args.paths)
        options = table_options(args, frame_from_records(records)) if records else {}
        output = write_comparison(args.paths, records, out_dir=args.out, options=options)
    except ValueError as exc:
        print(f"dipddpm-compare: {exc}", file=sys.stderr)
        return 2
    plots = [path.with_suffix(".svg") for path in (output.curves_png, output.bars_png) if path is not None]
    written = [output.results_csv, output.table_csv, output.table_md, output.curves_png, output.bars_png, *plots]
    if args.format == "latex":
        written.append(write_text_atomic(output.out_dir / "table.tex", render(output.table, "latex")))
    if not args.quiet:
        print(output.markdown if args.format == "md" else render(output.table, args.format))
    for path in written:
        if path is not None:
            print(f"wrote {path}")
    return 0


class SweepTableCallback(Callback):
    """After a multirun (not a dry run): write the sweep's comparison table and print it."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if config.get("dry_run"):
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            output = compare_paths([sweep_dir], out_dir=sweep_dir)
            print(output.markdown)
            log.info("table: %s", sweep_dir / "table.md")
        except Exception as error:  # the sweep's own results stay valid without a table
            log.error("could not build the table for %s: %s", sweep_dir, error)
