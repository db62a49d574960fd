"""dipddpm-reproduce PROFILE: run every report table's sweep that is not finished, then regenerate
its tables and docs/REPRODUCTION.md with a verdict per claim. One module (about 480 lines): the
up-to-date check, the launches and the document it writes follow the same manifest.

Each experiment's sweep writes under ``<output root>/reproduction/<profile>/<experiment>/`` (the
committed results: .gitignore keeps result.json, results.csv, table.md, table.csv, manifest.json
and the experiment-level plots). After a sweep, ``manifest.json`` records its job folders with
their config hashes and a fingerprint of the config tree; while the fingerprint matches and every
listed job has a finished result.json with that hash, the experiment is up to date and no Hydra
multirun is launched. Otherwise the sweep runs as
``dipddpm-train -m experiment=<name> profile=<profile> hydra.sweep.dir=<folder>``, in its own
process, and skips every finished job by its config hash (so a fresh clone resumes). Tables
are rebuilt only when the results or the experiment's table spec changed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # libyaml when present: 10x faster

from dipddpm.io import read_json, write_json_atomic, write_text_atomic
from dipddpm.sweep import FINISHED_STATUSES, config_dir

MANIFEST = "manifest.json"
DEFAULT_DOC = Path("docs") / "REPRODUCTION.md"
SPEC_KEYS = ("table", "report")          # experiment keys that do not change a job's config (nor its hash)


@dataclass(frozen=True)
class ReportTable:
    """A report table and the experiment that reproduces it."""

    id: str
    experiment: str
    baselines: bool = False              # classical denoiser rows beside it (+baselines=...)
    curve: tuple[str, str] | None = None  # (per-job csv, column) drawn as an extra aggregate figure


REPORT_TABLES = (
    ReportTable("T1.1", "staged/traditional_vs_staged", baselines=True),
    ReportTable("T1.2", "staged/depth_staged", baselines=True),
    ReportTable("T1.3", "staged/depth_traditional", baselines=True),
    ReportTable("T1.5", "staged/levels_1000", baselines=True),
    ReportTable("T1.6", "staged/levels_200", baselines=True),
    ReportTable("T1.7", "staged/levels_increasing", baselines=True),
    ReportTable("T1.8", "staged/fast_epochs", baselines=True),
    ReportTable("T2.1", "guided/backbone_scheduler", baselines=True),
    ReportTable("T3.1", "truncated/dip_vs_clean"),
    ReportTable("T3.2", "truncated/schedule_length"),
    ReportTable("T4.1", "dipnoise/time_vs_steps"),
    ReportTable("R4 ablation: DIP passes x chain length", "dipnoise/passes_steps"),
    ReportTable("R4 ablation: DDPM training epochs", "dipnoise/ddpm_epochs"),
    ReportTable("R4 ablation: DIP inside DDPM training", "dipnoise/dip_in_training"),
    ReportTable("R5", "dip_in_ddpm/ideas", curve=("rd_curve.csv", "rmse")),
)


# ---------------------------------------------------------------- experiments and folders


def experiment_names(pattern: str | None = None) -> list[str]:
    """Every experiment config (path under conf/experiment without .yaml), sorted."""
    root = config_dir() / "experiment"
    names = sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
    return [n for n in names if pattern is None or Path(n).match(pattern) or n.startswith(pattern)]


def tables(pattern: str | None = None) -> list[ReportTable]:
    """The report tables in report order, then every other experiment (baselines) as its own table."""
    names = experiment_names(pattern)
    listed = [entry for entry in REPORT_TABLES if entry.experiment in names]
    known = {entry.experiment for entry in REPORT_TABLES}
    return listed + [ReportTable(name, name) for name in names if name not in known]


def sweep_size(experiment: str) -> int | None:
    """How many jobs the experiment's own sweep has (the product of its hydra.sweeper.params axes,
    ``${seeds}`` from the experiment or train.yaml); None when an axis cannot be read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    raw = yaml.load((config_dir() / "experiment" / f"{experiment}.yaml").read_text(), Loader=_YAML_LOADER) or {}
    params = ((raw.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    seeds = raw.get("seeds", (yaml.load((config_dir() / "train.yaml").read_text(), Loader=_YAML_LOADER) or {}).get("seeds"))
    parser, count = OverridesParser.create(), 1
    try:
        for key, value in params.items():
            override = parser.parse_overrides([f"{key}={str(value).replace('${seeds}', str(seeds))}"])[0]
            count *= len(list(override.sweep_string_iterator())) if override.is_sweep_override() else 1
    except Exception:
        return None
    return count


def reproducing_profiles(spec: dict) -> list[str] | None:
    """The profiles whose ``dipddpm-reproduce`` runs this table (``table.profiles``); None: every profile."""
    profiles = spec.get("profiles")
    if profiles is None:
        return None
    return [str(name) for name in ([profiles] if isinstance(profiles, str) else profiles)]


def reproduced_under(spec: dict, profile: str) -> bool:
    """Whether ``dipddpm-reproduce <profile>`` runs this table (its ``table.profiles`` allows it)."""
    only = reproducing_profiles(spec)
    return only is None or profile in only


def experiment_dir(output_root: Path, profile: str, experiment: str) -> Path:
    """Where an experiment's sweep of a profile lives: <output root>/reproduction/<profile>/<experiment>."""
    return Path(output_root) / "reproduction" / profile / experiment


def table_spec(experiment: str) -> dict:
    """The experiment file's current table spec (its `report` under `report` unless the table has one)."""
    raw = yaml.load((config_dir() / "experiment" / f"{experiment}.yaml").read_text(), Loader=_YAML_LOADER) or {}
    spec = dict(raw.get("table") or {})
    if raw.get("report") and not spec.get("report"):
        spec["report"] = raw["report"]
    return spec


def config_fingerprint() -> str:
    """sha256 of the config tree as data (comments and the experiments' table/report keys left out):
    the same fingerprint means the same composed job configs for the same command."""
    root = config_dir()
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.yaml")):
        relative = path.relative_to(root).as_posix()
        data = yaml.load(path.read_text(), Loader=_YAML_LOADER)
        if relative.startswith("experiment/") and isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in SPEC_KEYS}
        digest.update(relative.encode() + b"\0" + json.dumps(data, sort_keys=True, default=str).encode() + b"\0")
    return digest.hexdigest()[:16]


def sweep_overrides(entry: ReportTable, profile: str, baselines: str, extra: list[str]) -> list[str]:
    """The dipddpm-train arguments of an experiment's reproduction sweep that choose its jobs (the
    manifest records them; where the sweep writes is left out, so a moved folder stays up to date)."""
    args = ["-m", f"experiment={entry.experiment}", f"profile={profile}"]
    if entry.baselines and baselines != "none":
        args.append(f"+baselines={baselines}")
    return args + list(extra)


def cache_folder(output_root: Path, profile: str) -> Path:
    """Where a profile's reproduction sweeps keep the networks they train (eps-nets, classifiers,
    DIP fits): <output root>/reproduction/<profile>/cache, committed with the results, so a sweep
    resumed on another machine loads the networks its finished jobs used instead of training
    others (CPU training gives other float results on another CPU)."""
    return Path(output_root) / "reproduction" / profile / "cache"


def sweep_location(folder: Path, output_root: Path, profile: str) -> list[str]:
    """The arguments that put a sweep in its reproduction folder and its trained networks in the
    profile's committed cache (output_root: the results root)."""
    location = [f"hydra.sweep.dir={Path(folder).as_posix()}",
                f"cache_dir={cache_folder(output_root, profile).as_posix()}"]
    return location + ([] if Path(output_root) == Path("outputs") else [f"output_root={Path(output_root).as_posix()}"])


# ---------------------------------------------------------------- results and the manifest


def job_results(folder: Path) -> dict[str, dict | None]:
    """{job folder relative to ``folder``: its result.json (None when absent or unreadable)} for every
    job folder below: one with a result.json, or one Hydra started (.hydra/) that left none."""
    from dipddpm.compare.gather import find_jobs

    found: dict[str, dict | None] = {}
    if not Path(folder).is_dir():
        return found
    for job_dir, has_result in find_jobs([folder]):
        relative = job_dir.relative_to(folder).as_posix()
        try:
            found[relative] = read_json(job_dir / "result.json") if has_result else None
        except (OSError, ValueError):
            found[relative] = None
    return found


def is_finished(result: dict | None) -> bool:
    return isinstance(result, dict) and result.get("status") in FINISHED_STATUSES


def machine() -> dict:
    """The machine a sweep ran on: OS, CPU architecture and count, torch, the GPU's name or None."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"system": f"{platform.system()} {platform.release()}", "cpu": platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "gpu": gpu}


def read_manifest(folder: Path) -> dict:
    try:
        manifest = read_json(Path(folder) / MANIFEST)
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def write_manifest(folder: Path, command: str, fingerprint: str, overrides: list[str]) -> dict:
    """Record the sweep just run: every job folder with its config hash (None: not finished), the
    command, the config fingerprint and the machine. The tables' digest is dropped: the sweep's own
    table.md (its callback's, built from the specs its results recorded) is rebuilt from the current spec."""
    jobs = job_results(folder)
    manifest = read_manifest(folder) | {
        "tables_digest": None,
        "command": command, "fingerprint": fingerprint, "overrides": overrides, "machine": machine(),
        "jobs": {name: result.get("config_hash") if is_finished(result) else None for name, result in jobs.items()},
    }
    write_json_atomic(Path(folder) / MANIFEST, manifest)
    return manifest


HOW_TO_RUN = ("launcher=", "threads=", "device=", "hydra.launcher.")   # overrides that leave the jobs as they are


def job_choosing(overrides: list[str]) -> list[str]:
    """``overrides`` without those that only say how the jobs run (launcher, threads, device)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(HOW_TO_RUN)]


def is_up_to_date(folder: Path, fingerprint: str, overrides: list[str]) -> bool:
    """True when the manifest's fingerprint and job-choosing overrides match and every job it lists
    has a finished result.json with the recorded config hash: nothing to launch."""
    manifest = read_manifest(folder)
    jobs = manifest.get("jobs")
    recorded = manifest.get("overrides")
    if (manifest.get("fingerprint") != fingerprint or not isinstance(recorded, list)
            or job_choosing(recorded) != job_choosing(overrides) or not jobs):
        return False
    found = job_results(folder)
    return all(expected is not None and is_finished(found.get(name)) and found[name].get("config_hash") == expected
               for name, expected in jobs.items())


def _job_times(result) -> tuple[_dt.datetime, _dt.datetime] | None:
    """A result's (started, finished) datetimes; None when either is absent or unreadable."""
    try:
        return _dt.datetime.fromisoformat(result["started"]), _dt.datetime.fromisoformat(result["finished"])
    except (KeyError, TypeError, ValueError):
        return None


def wall_seconds(results) -> float:
    """Sum over jobs of result.json's job_seconds (the method's run), else finished - started."""
    total = 0.0
    for result in results:
        if not isinstance(result, dict):
            continue
        if isinstance(result.get("job_seconds"), (int, float)):
            total += float(result["job_seconds"])
        elif (times := _job_times(result)) is not None:
            total += (times[1] - times[0]).total_seconds()
    return total


RESUME_GAP_SECONDS = 60.0


def elapsed_seconds(results) -> tuple[float, int] | None:
    """(seconds, runs): the wall-clock time during which the sweep's jobs ran, as the union of
    their [started, finished] intervals, and how many separate runs that union falls into (a gap
    of over RESUME_GAP_SECONDS between one job's finish and every later start splits runs, so the
    pause of an interrupted and resumed sweep does not count). None: no dated job."""
    dated = sorted(times for times in map(_job_times, results) if times is not None)
    if not dated:
        return None
    total, runs = 0.0, 1
    begin, end = dated[0]
    for start, finish in dated[1:]:
        if (start - end).total_seconds() > RESUME_GAP_SECONDS:
            total += (end - begin).total_seconds()
            begin, runs = start, runs + 1
        end = max(end, finish)
    return total + (end - begin).total_seconds(), runs


def _elapsed_text(seconds: float, runs: int) -> str:
    where = "in one run" if runs == 1 else f"over {runs} runs (the pauses between them not counted)"
    return f"; {seconds / 60:.1f} minutes of elapsed time {where}."


# ---------------------------------------------------------------- tables and the document


def results_digest(folder: Path, spec: dict) -> str:
    """sha256 of every result.json below ``folder`` and of the table spec: tables are rebuilt when it changes."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for path in sorted(Path(folder).rglob("result.json")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def regenerate_tables(folder: Path, entry: ReportTable, spec: dict) -> bool:
    """results.csv, table.md, table.csv and the plots of one experiment folder, rebuilt only when its
    results or table spec changed since the last time (manifest's tables_digest). True if rebuilt."""
    from dipddpm.compare.cli import compare_paths
    from dipddpm.compare.plots import plot_curves

    digest = results_digest(folder, spec)
    manifest = read_manifest(folder)
    if manifest.get("tables_digest") == digest and (folder / "table.md").is_file():
        return False
    output = compare_paths([folder], out_dir=folder, spec=spec)
    if entry.curve:
        file_name, column = entry.curve
        plot_curves(output.frame, output.table, spec, folder / f"{Path(file_name).stem}s.png", file_name, column)
    write_json_atomic(folder / MANIFEST, read_manifest(folder) | {"tables_digest": digest})
    return True


def _display_command(overrides: list[str]) -> str:
    return "dipddpm-train " + " ".join(shlex.quote(part) for part in overrides)


VERDICT_RULE = (
    "A claim compares one metric between two groups of runs (the rows the report compares, over every "
    "seed). With d = mean(better) − mean(worse), signed so that d > 0 is the report's direction, and the "
    "pooled standard deviation s_p = sqrt(((n_b − 1) s_b² + (n_w − 1) s_w²) / (n_b + n_w − 2)) (s: std with "
    "ddof = 1), the claim is **confirmed** when d > 2 s_p, **refuted** when d < −2 s_p, and **inconclusive** "
    "otherwise or when a side has fewer than 2 runs; *no results yet* when a side has none. Runs that "
    "finished count, collapsed ones included (a method that collapses is judged with its collapses); "
    "diverged and failed runs do not. The *honest rows* are the same comparison on rows that use no clean "
    "image (when the experiment has them).")


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def _claim_lines(index: int, judged, report: list, fmt: str) -> list[str]:
    from dipddpm.compare.claims import report_number

    claim = judged.claim
    direction = "higher is better" if claim["higher_is_better"] else "lower is better"
    reported = [report_number(report, claim[side], claim["metric"]) for side in ("better", "worse")]
    report_text = (" vs ".join("—" if value is None else str(value) for value in reported)
                   if any(value is not None for value in reported) else "no number")
    lines = [f"{index}. {claim['text']} — `{claim['metric']}`, {direction}.",
             f"   - ours: {judged.better.text(fmt)} vs {judged.worse.text(fmt)}; report: {report_text}",
             f"   - verdict: **{judged.verdict.kind}** — {judged.verdict.reason}"]
    if judged.honest:
        better, worse, verdict = judged.honest
        lines.append(f"   - honest rows (no clean image): {better.text(fmt)} vs {worse.text(fmt)}: "
                     f"**{verdict.kind}** — {verdict.reason}")
    return lines


def _section(entry: ReportTable, profile: str, output_root: Path, doc_dir: Path, baselines: str,
             extra: list[str], results: dict, problem: str | None = None) -> tuple[str, dict]:
    """One table's section of the document and a summary {jobs, verdicts}."""
    import pandas as pd

    from dipddpm.compare.claims import judge, parse_claims
    from dipddpm.compare.gather import gather

    folder = experiment_dir(output_root, profile, entry.experiment)
    spec = table_spec(entry.experiment)
    claims = parse_claims(spec, f"{entry.experiment}: table.claims")
    finished = [r for r in results.values() if is_finished(r)]
    title = str(spec.get("title") or entry.experiment)
    heading = title if title.startswith(entry.id.split(":")[0]) else f"{entry.id} — {title}"   # no "R4 ablation" twice
    only = reproducing_profiles(spec)
    elsewhere = not reproduced_under(spec, profile) and not finished   # another profile's table
    ran = read_manifest(folder).get("overrides")       # what produced the results, else what would run now
    overrides = (ran if isinstance(ran, list) else sweep_overrides(entry, profile, baselines, extra)) + sweep_location(
        experiment_dir(Path("outputs"), profile, entry.experiment), Path("outputs"), profile)
    lines = [f"## {heading}", "",
             f"Experiment `{entry.experiment}`: not a `{profile}` sweep (its `table.profiles`: {', '.join(only)}), "
             f"so `dipddpm-reproduce {profile}` launches nothing for it." if elsewhere else
             f"Experiment `{entry.experiment}`: `dipddpm-reproduce {profile} --only {entry.experiment}`, "
             f"which runs `{_display_command(overrides)}`.", ""]
    differs = differences(spec, profile)
    if differs:
        lines += ["What differs from the report:", "", *[f"- {text}" for text in differs], ""]
    jobs = {name: r for name, r in results.items() if not (isinstance(r, dict) and r.get("baseline"))}
    done = [r for r in jobs.values() if is_finished(r)]
    total = max(sweep_size(entry.experiment) or len(jobs), len(jobs))
    summary = {"jobs": f"{len(done)} of {total}" if results else "not yet run", "verdicts": [],
               "elapsed": elapsed_seconds(finished)}
    if elsewhere:
        summary["jobs"] = f"{', '.join(only)} only"
    elif not finished:
        lines += ["**Not yet run.**" if not results else "**No job has finished yet.**", ""]
    if not finished:
        lines += _report_lines(spec)
        if entry not in REPORT_TABLES:
            lines += _other_profile_lines(entry.experiment, profile, output_root, doc_dir)
    else:
        collapsed = [r.get("status") for r in done].count("collapsed")
        baseline_runs = len(finished) - len(done)
        lines += [f"Jobs: {len(done)} of the sweep's {total} finished ({collapsed} collapsed, "
                  f"{len(jobs) - len(done)} failed or stopped, {total - len(jobs)} not started)"
                  + (f", and {baseline_runs} baseline runs" if baseline_runs else "")
                  + f"; wall time {wall_seconds(results.values()):.0f} s "
                  "(the sum of the jobs' run times, result.json's `job_seconds`)"
                  + (_elapsed_text(*summary["elapsed"]) if summary["elapsed"] is not None else "."), ""]
    if problem:
        lines += [problem, ""]
    frame = gather([folder]) if finished else None
    if claims:
        lines += ["**Claims**", ""]
        for index, claim in enumerate(claims, start=1):
            judged = judge(frame if frame is not None else pd.DataFrame(columns=["status"]), claim)
            summary["verdicts"].append(judged.verdict.kind)
            lines += _claim_lines(index, judged, spec.get("report") or [], ".4g")
        lines.append("")
    table_md = folder / "table.md"
    if finished and table_md.is_file() and not problem:
        lines += _table_lines(folder, doc_dir)
    return "\n".join(lines), summary


def _table_lines(folder: Path, doc_dir: Path, label: str = "") -> list[str]:
    """An experiment folder's table.md without its heading, then its figures (links relative to doc_dir)."""
    text = (folder / "table.md").read_text()
    body = text.split("\n", 2)
    lines = [body[2].strip() if len(body) > 2 and body[0].startswith("## ") else text.strip(), ""]
    figures = [name for name in ("bars.png", "curves.png", "rd_curves.png") if (folder / name).is_file()]
    lines += [f"![{label}{name[:-4]}]({_relative(folder / name, doc_dir)})" for name in figures]
    return lines + ([""] if figures else [])


def _other_profile_lines(experiment: str, profile: str, output_root: Path, doc_dir: Path) -> list[str]:
    """For a baseline experiment this profile has not run: the committed tables of the profiles that
    ran it (<output root>/reproduction/<other>/<experiment>/table.md), each said to be that profile's."""
    lines = []
    for folder in sorted(Path(output_root, "reproduction").glob(f"*/{experiment}")):
        other = folder.relative_to(Path(output_root, "reproduction")).parts[0]
        if other == profile or not (folder / "table.md").is_file():
            continue
        finished = [r for r in job_results(folder).values() if is_finished(r)]
        if not finished:
            continue
        lines += [f"Profile `{other}` ran it ({len(finished)} jobs, committed in "
                  f"`outputs/reproduction/{other}/{experiment}/`); its table, not this profile's:", "",
                  *_table_lines(folder, doc_dir, f"{other} ")]
    return lines


def differences(spec: dict, profile: str) -> list[str]:
    """What differs from the report for this profile: the spec's ``differs`` entries under ``all``
    and under the profile's name (each a string or a list of strings), in that order."""
    differs = spec.get("differs") or {}
    if not isinstance(differs, dict):
        raise ValueError(f"table.differs must map a profile name (or all) to text, got {differs!r}")
    found = []
    for key in ("all", profile):
        entries = differs.get(key) or []
        found += [str(text) for text in ([entries] if isinstance(entries, str) else entries)]
    return found


def _report_lines(spec: dict) -> list[str]:
    """The report's numbers as a small Markdown table (field and metric names as in the spec)."""
    import pandas as pd

    from dipddpm.compare.render import markdown_table

    report = [entry for entry in spec.get("report") or [] if isinstance(entry, dict)]
    if not report:
        return []
    columns = list(dict.fromkeys(key for entry in report for key in entry))
    frame = pd.DataFrame([[entry.get(key, "") for key in columns] for entry in report], columns=columns)
    return ["The report's numbers:", "", markdown_table(frame), ""]


def _machine_lines(folders: list[Path], results: list[dict]) -> tuple[list[str], str | None]:
    """What the results say about where and when they ran: machine lines and the last finish date."""
    machines, devices, last = [], set(), None
    for folder, found in zip(folders, results):
        described = read_manifest(folder).get("machine")
        if described and described not in machines:
            machines.append(described)
        for result in found.values():
            if is_finished(result):
                devices.add(str(result.get("device")))
                last = max(last or "", str(result.get("finished") or ""))
    lines = []
    for described in machines:
        gpu = described.get("gpu") or "no GPU"
        lines.append(f"{described.get('system')}, {described.get('cpu')} × {described.get('cpu_count')} CPUs, "
                     f"{gpu}, Python {described.get('python')}, torch {described.get('torch')}")
    return lines + ([f"job devices: {', '.join(sorted(devices))}"] if devices else []), last


def write_document(profile: str, output_root: Path, doc: Path, baselines: str = "all",
                   extra: list[str] | None = None) -> Path:
    """docs/REPRODUCTION.md from the results under <output root>/reproduction/<profile>/ (every
    experiment, those without results listed as not yet run); tables rebuilt where results changed."""
    doc = Path(doc)
    entries = tables()
    problems, found = {}, {}
    for entry in entries:
        folder = experiment_dir(output_root, profile, entry.experiment)
        found[entry.experiment] = job_results(folder)
        if any(is_finished(r) for r in found[entry.experiment].values()):
            try:
                regenerate_tables(folder, entry, table_spec(entry.experiment))
            except ValueError as error:    # one experiment's table cannot stop the document
                problems[entry.experiment] = f"**The table could not be built:** {error}"
    folders = [experiment_dir(output_root, profile, entry.experiment) for entry in entries]
    machine_lines, last = _machine_lines(folders, [found[entry.experiment] for entry in entries])
    gpus = [line for line in machine_lines if "no GPU" not in line and not line.startswith("job devices")]
    if last is None:
        gpu_note = ("**No results yet**: every table below is listed as not yet run. No GPU has run these sweeps, "
                    "and no number is guessed; the claims' verdicts fill in as results are committed.")
    elif not gpus:
        gpu_note = ("**These results ran without a GPU.** They are the numbers of the "
                    f"`{profile}` profile on the machine above, not the reports' faithful scale; no faithful "
                    "number is guessed.")
    else:
        gpu_note = f"GPU: {'; '.join(gpus)}."
    sections, rows, minutes = [], [], []
    for entry in entries:
        text, summary = _section(entry, profile, output_root, doc.parent, baselines, list(extra or []),
                                 found[entry.experiment], problems.get(entry.experiment))
        sections.append(text)
        counts = ", ".join(f"{summary['verdicts'].count(kind)} {kind}" for kind in dict.fromkeys(summary["verdicts"]))
        elapsed = summary["elapsed"] and summary["elapsed"][0] / 60
        minutes += [elapsed] if elapsed else []
        rows.append(f"| {entry.id} | `{entry.experiment}` | {summary['jobs']} | {counts or '—'} | "
                    + (f"{elapsed:.1f} |" if elapsed else "— |"))
    header = [
        f"# Reproduction (profile `{profile}`)", "",
        f"Generated by `dipddpm-reproduce {profile}` from the committed results under "
        f"`outputs/reproduction/{profile}/`; do not edit by hand (`dipddpm-reproduce {profile} --report-only` "
        "regenerates it in seconds).", "",
        "- Machine: " + ("; ".join(machine_lines) if machine_lines else "none yet (no results)"),
        f"- Date: {last[:10] if last else 'no results yet'} (the last job's finish)",
        f"- Profile: `{profile}`; every table is mean ± std over seeds, the report's numbers in its `(report)` "
        "columns. `uses clean image`: whether the row's runs used the clean image (a real user could run only "
        "the `no` rows). `collapsed k of n`: runs whose output ended constant over the image, counted apart; "
        "cells are the runs that learned, `(all runs)` cells include the collapsed ones.",
        f"- {gpu_note}", "",
        "How a verdict is decided: " + VERDICT_RULE, "",
        "| table | experiment | jobs finished | claims | elapsed (min) |", "|---|---|---|---|---|", *rows, "",
        f"Elapsed time of all these sweeps: {sum(minutes):.0f} min ({sum(minutes) / 60:.1f} h), the sum of "
        "each table's elapsed time (the union of its jobs' run intervals, pauses between resumed runs left out).",
        ""]
    return write_text_atomic(doc, "\n".join(header) + "\n" + "\n".join(sections))


def reproduce(profile: str, pattern: str | None = None, extra: list[str] | None = None,
              output_root: Path = Path("outputs"), doc: Path | None = DEFAULT_DOC, baselines: str = "all",
              launch: str = "missing") -> int:
    """Run what is missing (launch="missing"), every sweep (launch="all", each still skipping finished
    jobs) or nothing (launch="none"), then regenerate the tables and ``doc``. Returns the number of
    sweeps that ended with failed jobs (capped at 100), 2 for bad input."""
    from dipddpm.errors import ConfigError

    extra = list(extra or [])
    chosen = tables(pattern)
    if not chosen:
        print(f"dipddpm-reproduce: error: no experiment matches {pattern!r}", file=sys.stderr)
        return 2
    profiles = sorted(p.stem for p in (config_dir() / "profile").glob("*.yaml"))
    if launch != "none" and profile not in profiles:
        print(f"dipddpm-reproduce: error: {ConfigError('profile', profile, 'one of ' + ', '.join(profiles))}",
              file=sys.stderr)
        return 2
    failures = 0
    if launch != "none":
        fingerprint = config_fingerprint()
        for entry in chosen:
            folder = experiment_dir(output_root, profile, entry.experiment)
            overrides = sweep_overrides(entry, profile, baselines, extra)
            spec = table_spec(entry.experiment)
            if not reproduced_under(spec, profile):
                print(f"== {entry.experiment}: reproduced under {', '.join(reproducing_profiles(spec))} only "
                      "(table.profiles)", flush=True)
                continue
            if launch == "missing" and is_up_to_date(folder, fingerprint, overrides):
                print(f"== {entry.experiment}: up to date", flush=True)
                continue
            print(f"== {entry.experiment} (profile={profile})", flush=True)
            arguments = overrides + sweep_location(folder, output_root, profile)
            code = subprocess.call([sys.executable, "-m", "dipddpm.train", *arguments])
            failures += code != 0
            if folder.is_dir():
                write_manifest(folder, _display_command(arguments), fingerprint, overrides)
    if doc is not None:
        path = write_document(profile, output_root, Path(doc), baselines, extra)
        print(f"wrote {path}")
    return min(failures, 100)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dipddpm-reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("profile", help="a profile of conf/profile (standard, faithful, quick, smoke)")
    parser.add_argument("--only", help="run only experiments whose name starts with or matches this pattern")
    parser.add_argument("--output-root", default="outputs", type=Path, help="results root (default: outputs)")
    parser.add_argument("--doc", default=DEFAULT_DOC, type=Path, help=f"the document written (default: {DEFAULT_DOC})")
    parser.add_argument("--baselines", choices=("all", "fast", "none"), default="all",
                        help="classical denoiser rows beside the denoising tables (default: all)")
    launch = parser.add_mutually_exclusive_group()
    launch.add_argument("--report-only", action="store_const", const="none", dest="launch",
                        help="launch nothing: regenerate the tables and the document from the results there are")
    launch.add_argument("--launch-all", action="store_const", const="all", dest="launch",
                        help="launch every sweep even when its manifest says it is up to date (finished jobs still skip)")
    parser.add_argument("overrides", nargs="*", help="extra overrides passed to every sweep, e.g. seeds=1")
    args = parser.parse_intermixed_args(argv)
    from dipddpm.errors import ConfigError

    try:
        return reproduce(args.profile, args.only, args.overrides, args.output_root, args.doc, args.baselines,
                         args.launch or "missing")
    except ConfigError as error:          # a bad claim in an experiment's table spec
        print(f"dipddpm-reproduce: error: {error}", file=sys.stderr)
        return 2


def main() -> None:
    sys.exit(cli())


if __name__ == "__main__":
    main()
