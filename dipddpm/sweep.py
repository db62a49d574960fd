"""Sweep plumbing: where configs live, job folder names, resume, locks, the end-of-sweep table."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import socket
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dipddpm.io import write_json_atomic, write_text_atomic

log = logging.getLogger("dipddpm")

RUN_ONLY_KEYS = ("force", "dry_run", "threads", "device", "seeds", "output_root", "cache_dir", "table", "report",
                 "experiment_name", "hydra")
FINISHED_STATUSES = ("ok", "collapsed", "diverged")
LAST_SWEEP: dict = {}


def config_dir() -> Path:
    """The config tree: shipped inside the package when installed, else the repo's conf/."""
    packaged = Path(__file__).resolve().parent / "conf"
    if (packaged / "train.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "conf"


def job_dirname(override_dirname: str) -> str:
    """A folder name from a job's overrides: '/' made safe, long names shortened with a hash."""
    name = override_dirname.replace("/", "%") or "default"
    if len(name) > 150:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:120]}...{digest}"
    return name


def folder_sweep(folder, default: str) -> str:
    """A sweep over a folder's images: their file stems joined by commas (``data.image=${dipddpm_images:
    ${data.folder},astronaut}`` in hydra.sweeper.params); ``default`` when there is no folder."""
    if not folder:
        return default
    from dipddpm.data.images import folder_images

    return ",".join(path.stem for path in folder_images(folder))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("dipddpm_jobdir"):
        OmegaConf.register_new_resolver("dipddpm_jobdir", job_dirname)
    if not OmegaConf.has_resolver("dipddpm_images"):
        OmegaConf.register_new_resolver("dipddpm_images", folder_sweep)


def overrides_dict(task_overrides) -> dict:
    """['a.b=1', '+c=x'] -> {'a.b': '1', 'c': 'x'} (strings, as typed)."""
    result = {}
    for item in task_overrides:
        key, _, value = str(item).partition("=")
        result[key.lstrip("+~")] = value
    return result


def _flatten(node, prefix: str, out: dict) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _flatten(value, f"{prefix}{key}.", out)
    else:
        out[prefix[:-1]] = node


def flat_config(cfg: DictConfig) -> dict:
    """The resolved config as {dotted.key: value}, without run-only keys."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in RUN_ONLY_KEYS:
        container.pop(key, None)
    out: dict = {}
    _flatten(container, "", out)
    return out


def nested_config(flat: dict, head: str = "") -> dict:
    """The inverse of flat_config: {dotted.key: value} -> nested dicts. With ``head``
    only the keys under ``head.`` count, and the tree below it is returned."""
    prefix = f"{head}." if head else ""
    tree: dict = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix):].split(".")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def now() -> str:
    """Local time to the second, as result.json's started / finished."""
    return _dt.datetime.now().isoformat(timespec="seconds")


def failed_result(run_dir: Path, error: BaseException, header: dict) -> dict:
    """The result of a job that raised ``error`` (call it in the except block): status
    failed, the error's type and message, the traceback written to run_dir/traceback.txt."""
    write_text_atomic(Path(run_dir) / "traceback.txt", traceback.format_exc())
    return {"status": "failed", "error": {"type": type(error).__name__, "message": str(error),
                                          "traceback_file": "traceback.txt"}, **header, "metrics": {}}


def write_result(result_path: Path, result: dict, started: str) -> None:
    """Stamp ``result`` with its start and finish times and write it atomically."""
    result["started"] = started
    result["finished"] = now()
    write_json_atomic(result_path, result)


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved config minus the keys that do not change a result."""
    text = json.dumps(flat_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_complete(result_path: Path, expected_hash: str | None) -> bool:
    """True when result_path holds a finished result (ok, collapsed or diverged) for expected_hash (None: any)."""
    try:
        with open(result_path, encoding="utf-8") as handle:
            result = json.load(handle)
    except (OSError, ValueError):
        return False
    if result.get("status") not in FINISHED_STATUSES:
        return False
    return expected_hash is None or result.get("config_hash") == expected_hash


class JobLock:
    """An exclusive lock file holding 'host pid'; a lock left by a dead process is taken over."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.held = False

    def holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return "?"

    def _stale(self) -> bool:
        host, _, pid = self.holder().partition(" ")
        if host != socket.gethostname() or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._stale():
                    return False
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(f"{socket.gethostname()} {os.getpid()}\n")
            self.held = True
            return True
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def record_job(run_dir: Path, header: dict, prepare, execute, force: bool = False) -> str:
    """Run one job and record it: the sequence train.run_job and the classical baselines share.

    Skip when run_dir/result.json is complete for ``header["config_hash"]`` (unless ``force``);
    take the job's lock ("running" when another process holds it); ``prepared = prepare()``
    (validation), ``execute(prepared)``; write result.json atomically with ``header``: status ok
    with the fields ``execute`` returns (device, metrics, ...), collapsed (the same, when
    metrics["collapsed"] is true: the output is constant over the image), diverged, or failed with
    traceback.txt. ``execute`` may instead return a status string for an outcome that is not
    recorded (a dry run). A config error never replaces an earlier complete result.
    Returns the job's status.
    """
    from dipddpm.errors import ConfigError, DivergedError

    run_dir = Path(run_dir)
    result_path = run_dir / "result.json"
    if not force and is_complete(result_path, header["config_hash"]):
        log.info("skip %s: complete result for this config (force=true re-runs it)", run_dir.name)
        with open(result_path, encoding="utf-8") as handle:
            return json.load(handle)["status"]
    lock = JobLock(run_dir / ".lock")
    if not lock.acquire():
        log.info("skip %s: running in another process (%s)", run_dir.name, lock.holder())
        return "running"
    started = now()
    try:
        outcome = execute(prepare())
        if isinstance(outcome, str):
            return outcome
        metrics = outcome.get("metrics")
        collapsed = isinstance(metrics, dict) and metrics.get("collapsed") is True  # kept, with its metrics
        result = {"status": "collapsed" if collapsed else "ok", "error": None, **header, **outcome}
    except DivergedError as error:
        result = {"status": "diverged", "error": {"type": "DivergedError", "message": str(error), "step": error.step},
                  **header, "metrics": {}}
    except Exception as error:  # recorded; the sweep goes on
        result = failed_result(run_dir, error, header)
        if isinstance(error, ConfigError) and is_complete(result_path, None):
            log.error("%s: %s (kept the earlier complete result)", run_dir.name, error)
            return "failed"
    finally:
        lock.release()
    write_result(result_path, result, started)
    return result["status"]


def check_group_choices(argv: list[str], conf: Path | None = None) -> str | None:
    """A one-line message for the first 'group=option' naming an option that does not exist."""
    conf = conf or config_dir()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        group = conf / key
        if key.startswith("hydra") or not group.is_dir():
            continue
        if value.startswith(("choice(", "range(", "glob(")):
            continue
        options = sorted(str(p.relative_to(group).with_suffix("")) for p in group.rglob("*.yaml"))
        for option in value.split(","):
            if option and option != "null" and option not in options:
                return f"{key}={option!r} is not allowed: one of " + ", ".join(options)
    return None


def sweep_failures(sweep_dir: Path, since: float) -> tuple[int, int]:
    """(jobs finished since ``since`` that are not ok, jobs finished since then) in sweep_dir."""
    failed = total = 0
    for path in Path(sweep_dir).rglob("result.json"):
        if path.stat().st_mtime < since:
            continue
        total += 1
        try:
            status = json.loads(path.read_text()).get("status")
        except (OSError, ValueError):
            status = None
        failed += status not in ("ok", "collapsed")
    return failed, total


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra < 1.1
    Callback = object


class SweepEndCallback(Callback):
    """After a multirun: count this sweep's failed jobs (its table: dipddpm.compare.SweepTableCallback)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        LAST_SWEEP.clear()
        LAST_SWEEP["started"] = time.time() - 1.0

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed, total = sweep_failures(sweep_dir, LAST_SWEEP.get("started", 0.0))
        LAST_SWEEP.update(failed=failed, ran=total, sweep_dir=str(sweep_dir))
        if failed:
            log.error("%d of %d jobs run in this sweep did not finish ok; see their result.json", failed, total)


def _first_values(argv: list[str]) -> list[str] | None:
    """The command's config overrides with each sweep reduced to its first value (None if unparsable)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    plain = [a for a in argv if not a.startswith("-") and "=" in a and not a.lstrip("+~").startswith("hydra")]
    try:
        parsed = OverridesParser.create().parse_overrides(plain)
    except Exception:
        return None
    result = []
    for override in parsed:
        if override.is_sweep_override():
            try:
                first = next(iter(override.sweep_string_iterator()))
            except Exception:
                continue
            result.append(f"{override.get_key_element()}={first}")
        else:
            result.append(override.input_line)
    return result


def check_composition(argv: list[str]) -> str | None:
    """Compose the config the way the first job would; a one-line message if that fails."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = _first_values(argv)
    if overrides is None:
        return None
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
            OmegaConf.to_container(cfg, resolve=True)
    except Exception as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if lines and lines[0].startswith("Could not override '"):
            key = lines[0].split("'")[1]
            value = next((o.partition("=")[2] for o in overrides if o.startswith(key + "=")), "?")
            return f"{key}={value!r} is not allowed: no such key in the config (to add a new key: +{key}={value})"
        return " ".join(lines[:2]) if lines else type(error).__name__
    finally:
        GlobalHydra.instance().clear()
    return None
