"""Sweeps as a user runs them: job folders, resume, failures, launchers, the end table.

The failing-job and launcher sweeps run one after another in a background thread (the
``background`` fixture) while the resume test runs its three sweeps: two processes at a time.
"""

import json
import os
import time

import pytest
from conftest import in_background

from dipddpm.sweep import JobLock, check_group_choices, job_dirname, overrides_dict

SWEEP = ["-m", "backbone=cnn", "backbone.depth=3", "data.size=16", "method.steps=3", "eval_every=1",
         "seed=0,1,2,3", "threads=1"]
LAUNCHERS = ["joblib", "submitit_local"]


def results(root):
    return {p.parent.name: p for p in root.rglob("result.json")}


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    """The failing-job sweep and one sweep per parallel launcher, started in a background thread:
    {name: (future of the finished process, its output_root)}."""
    tiny = ["-m", "backbone=cnn", "backbone.depth=3", "data.size=16", "method.steps=3"]
    commands = {"failing": [*tiny, "threads=1", "data.sigma=0.1,1.5,0.2"]}
    commands.update({launcher: [*tiny, "seed=0,1", f"launcher={launcher}"] for launcher in LAUNCHERS})
    with in_background(commands, tmp_path_factory.mktemp("background")) as runs:
        yield runs


@pytest.mark.usefixtures("background")  # starts the background sweeps first
def test_job_folders_are_named_by_overrides_and_rerun_skips_finished(train, tmp_path):
    """A rerun skips finished jobs and reruns deleted, interrupted and failed ones; force reruns all."""
    first = train(*SWEEP, f"output_root={tmp_path}")
    assert first.returncode == 0, first.stderr[-3000:]
    found = results(tmp_path)
    assert set(found) == {f"backbone.depth=3,backbone=cnn,data.size=16,eval_every=1,method.steps=3,seed={s}" for s in range(4)}
    sweep_dir = next(iter(found.values())).parent.parent
    assert sweep_dir == tmp_path / "sweeps" / "adhoc" / "faithful"
    assert (sweep_dir / "table.md").is_file() and (sweep_dir / "results.csv").is_file()

    stamps = {name: path.stat().st_mtime_ns for name, path in found.items()}
    finished, removed, interrupted, failed = sorted(found)
    found[removed].unlink()
    # an interrupted job: no result.json, a lock left by a process that no longer exists
    found[interrupted].unlink()
    (found[interrupted].parent / ".lock").write_text(f"{os.uname().nodename} 999999\n")
    record = json.loads(found[failed].read_text())
    record["status"] = "failed"
    found[failed].write_text(json.dumps(record))
    time.sleep(0.05)
    second = train(*SWEEP, f"output_root={tmp_path}")
    assert second.returncode == 0
    after = results(tmp_path)
    rerun = {name for name, path in after.items() if path.stat().st_mtime_ns != stamps.get(name)}
    assert rerun == {removed, interrupted, failed}
    assert (second.stdout + second.stderr).count("skip ") == 1
    assert {json.loads(path.read_text())["status"] for path in after.values()} == {"ok"}
    assert not (found[interrupted].parent / ".lock").exists()

    stamps = {name: path.stat().st_mtime_ns for name, path in after.items()}
    forced = train(*SWEEP, "force=true", f"output_root={tmp_path}")
    assert forced.returncode == 0
    assert all(p.stat().st_mtime_ns != stamps.get(n) for n, p in results(tmp_path).items())


def test_a_failing_job_does_not_stop_the_sweep(background):
    future, root = background["failing"]
    proc = future.result()
    assert proc.returncode == 1, proc.stderr[-3000:]  # one failed job
    statuses = {p.parent.name: json.loads(p.read_text()) for p in root.rglob("result.json")}
    assert len(statuses) == 3
    bad = [r for r in statuses.values() if r["status"] == "failed"]
    assert len(bad) == 1 and "data.sigma=1.5" in bad[0]["error"]["message"]
    assert bad[0]["error"]["type"] == "ConfigError"
    assert sum(r["status"] == "ok" for r in statuses.values()) == 2
    table = next(root.rglob("table.md")).read_text()
    assert "missing" in table and "Runs not ok: 1" in table


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_parallel_launchers_produce_all_results(background, launcher):
    future, root = background[launcher]
    proc = future.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = results(root)
    assert len(found) == 2
    assert all(json.loads(p.read_text())["status"] == "ok" for p in found.values())
    assert next(root.rglob("table.md")).is_file()


def test_lock_is_exclusive_and_stale_locks_are_taken_over(tmp_path):
    lock = JobLock(tmp_path / ".lock")
    assert lock.acquire()
    assert not JobLock(tmp_path / ".lock").acquire()
    lock.release()
    (tmp_path / ".lock").write_text(f"{os.uname().nodename} 999999\n")
    assert JobLock(tmp_path / ".lock").acquire()


def test_job_dirname_and_overrides():
    assert job_dirname("a=1,b=x/y") == "a=1,b=x%y"
    assert job_dirname("") == "default"
    long = job_dirname("k=" + "v" * 300)
    assert len(long) < 160 and long != job_dirname("k=" + "v" * 299)
    assert overrides_dict(["+a.b=1", "c=x=y"]) == {"a.b": "1", "c": "x=y"}


def test_group_choice_check_lists_the_options():
    assert check_group_choices(["backbone=skip", "early_stop=wmv,none"]) is None
    message = check_group_choices(["early_stop=wmv,sometimes"])
    assert message.startswith("early_stop='sometimes' is not allowed: one of ") and "psnr_patience" in message


def test_record_job_is_the_one_job_sequence(tmp_path):
    from dipddpm.errors import ConfigError, DivergedError
    from dipddpm.sweep import record_job

    header = {"config_hash": "h1", "config": {"a": 1}}
    calls = []

    def prepare():
        calls.append("prepare")
        return 3

    def execute(value):
        calls.append(f"execute {value}")
        return {"metrics": {"value": value}}

    assert record_job(tmp_path, header, prepare, execute) == "ok"
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "ok" and result["error"] is None and result["metrics"] == {"value": 3}
    assert result["config_hash"] == "h1" and result["started"] <= result["finished"]
    assert calls == ["prepare", "execute 3"] and not (tmp_path / ".lock").exists()

    # complete for the same hash: skipped without preparing; force or another hash runs it again
    assert record_job(tmp_path, header, prepare, execute) == "ok" and len(calls) == 2
    assert record_job(tmp_path, header, prepare, execute, force=True) == "ok" and len(calls) == 4

    # a config error does not replace a complete result; other errors are recorded with a traceback
    def bad_config():
        raise ConfigError("data.sigma", 2, "a number in [0, 1]")

    assert record_job(tmp_path, {**header, "config_hash": "h2"}, bad_config, execute) == "failed"
    assert json.loads((tmp_path / "result.json").read_text())["config_hash"] == "h1"

    def broken(value):
        raise RuntimeError("boom")

    assert record_job(tmp_path, header, prepare, broken, force=True) == "failed"
    failed = json.loads((tmp_path / "result.json").read_text())
    assert failed["error"]["type"] == "RuntimeError" and failed["error"]["message"] == "boom"
    assert "boom" in (tmp_path / "traceback.txt").read_text() and failed["metrics"] == {}

    def diverging(value):
        raise DivergedError(7, float("nan"))

    assert record_job(tmp_path, header, prepare, diverging) == "diverged"
    assert json.loads((tmp_path / "result.json").read_text())["error"]["step"] == 7

    # an outcome that is not recorded (a dry run) leaves result.json alone; a held lock means "running"
    before = (tmp_path / "result.json").read_text()
    assert record_job(tmp_path, header, prepare, lambda value: "dry_run", force=True) == "dry_run"
    assert (tmp_path / "result.json").read_text() == before
    lock = JobLock(tmp_path / ".lock")
    assert lock.acquire()
    assert record_job(tmp_path, header, prepare, execute, force=True) == "running"
    lock.release()
