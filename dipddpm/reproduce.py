"""dipddpm-reproduce PROFILE: run every experiment's sweep, then write one REPRODUCTION.md.

Each experiment runs as `dipddpm-train -m experiment=<name> profile=<profile>` in its own
process, so a failing experiment does not stop the others, and since sweeps resume, a
second call only runs what is missing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import subprocess
import sys
import time
from pathlib import Path

from dipddpm.io import write_text_atomic
from dipddpm.sweep import config_dir


def experiment_names(pattern: str | None = None) -> list[str]:
    """Every experiment config (path under conf/experiment without .yaml), sorted."""
    root = config_dir() / "experiment"
    names = sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))
    return [n for n in names if pattern is None or Path(n).match(pattern) or n.startswith(pattern)]


def sweep_dir(output_root: Path, name: str, profile: str) -> Path:
    return output_root / "sweeps" / name / profile


def reproduce(profile: str, pattern: str | None, extra: list[str], output_root: Path) -> int:
    names = experiment_names(pattern)
    if not names:
        print(f"dipddpm-reproduce: error: no experiment matches {pattern!r}", file=sys.stderr)
        return 2
    sections, failures = [], 0
    for name in names:
        began = time.perf_counter()
        print(f"== {name} (profile={profile})", flush=True)
        command = [sys.executable, "-m", "dipddpm.train", "-m", f"experiment={name}", f"profile={profile}",
                   f"output_root={output_root}", *extra]
        code = subprocess.call(command)
        seconds = time.perf_counter() - began
        failures += code != 0
        table = sweep_dir(output_root, name, profile) / "table.md"
        body = table.read_text() if table.is_file() else "_no table: the sweep produced no results_\n"
        status = "all jobs ok" if code == 0 else f"exit status {code} (failed jobs are listed in the table)"
        sections.append(f"### `{name}`\n\nCommand: `dipddpm-train -m experiment={name} profile={profile}`"
                        f" — {seconds:.0f} s, {status}.\n\n{body}\n")
    header = (f"# Reproduction ({profile} profile)\n\nWritten {_dt.datetime.now().isoformat(timespec='seconds')} "
              f"by `dipddpm-reproduce {profile}`. Each table: ours as mean ± std over seeds (n = seeds that "
              f"finished ok), the report's numbers in the `(report)` columns.\n\n")
    path = write_text_atomic(output_root / "REPRODUCTION.md", header + "\n".join(sections))
    print(f"wrote {path}")
    return min(failures, 100)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dipddpm-reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("profile", choices=sorted(p.stem for p in (config_dir() / "profile").glob("*.yaml")))
    parser.add_argument("--only", help="run only experiments whose name starts with or matches this pattern")
    parser.add_argument("--output-root", default="outputs", type=Path)
    parser.add_argument("overrides", nargs="*", help="extra overrides passed to every sweep, e.g. seeds=1")
    args = parser.parse_args(argv)
    return reproduce(args.profile, args.only, args.overrides, args.output_root)


def main() -> None:
    sys.exit(cli())


if __name__ == "__main__":
    main()
