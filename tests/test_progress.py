"""Progress bars: drawn when stderr is a terminal (even one that reports no size), absent
from pipes and log files."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest
from conftest import REPO

TINY = ["method.steps=60", "data.size=32", "backbone=skip_mnist", "eval_every=20", "threads=1"]


def _train_with_stderr_on(stderr_fd: int, run_dir) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "dipddpm.train", *TINY, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr_fd, timeout=300)


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the terminal's other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_bar_is_drawn_on_a_terminal_that_reports_no_size(tmp_path):
    try:
        leader, follower = pty.openpty()  # a fresh pseudo-terminal: 0 columns x 0 lines
    except OSError as error:
        pytest.skip(f"no pseudo-terminals on this machine: {error}")
    try:
        assert os.get_terminal_size(follower) == os.terminal_size((0, 0))
        process = _train_with_stderr_on(follower, tmp_path / "tty")
        os.close(follower)
        drawn = _read_all(leader).decode(errors="replace")
    finally:
        os.close(leader)
    assert process.returncode == 0
    assert "dip skip:" in drawn and "/60" in drawn and "%|" in drawn
    assert (tmp_path / "tty" / "result.json").is_file()


def test_no_bar_in_pipes_or_the_log_file(tiny_run):
    """The session's tiny job (conftest.py) ran with stdout and stderr piped."""
    process, run = tiny_run
    log = (run / "train.log").read_text()
    for text in (process.stderr, process.stdout, log):
        assert "%|" not in text and "it/s" not in text
    assert "done:" in log
