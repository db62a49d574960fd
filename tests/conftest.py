import copy
import functools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)


def run_train(*args, cwd=None, timeout=600):
    """Run dipddpm-train as a user would (a fresh process); returns CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "dipddpm.train", *map(str, args)],
        cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def composed(*overrides):
    """conf/train.yaml composed with ``overrides`` as dipddpm-train would compose it: a fresh copy
    each call (each command line is composed once per session; composing takes about 0.2 s)."""
    return copy.deepcopy(_composed_once(tuple(overrides)))


@functools.lru_cache(maxsize=None)
def _composed_once(overrides: tuple):
    from hydra import compose, initialize_config_dir

    from dipddpm.sweep import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def run_method(module, cfg, run_dir, seed: int = 0):
    """One run of a method module in-process on the CPU, the way train.run_job runs it:
    apply the profile, validate, seed everything, run; returns its metrics."""
    from dipddpm.profile import apply_profile
    from dipddpm.runtime import RunContext, seed_everything

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = apply_profile(cfg)
    module.validate(cfg)
    seed_everything(seed)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, device=torch.device("cpu"), seed=seed, progress=False,
                     cache_dir=run_dir)
    return module.run(ctx)


@contextmanager
def in_background(commands: dict, root: Path, timeout=300):
    """Run dipddpm-train with each command of ``commands`` ({name: args}), one after another in a
    background thread, each with output_root=root/name: {name: (future of the finished process,
    root/name)}. Leaving the block waits for them."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield {name: (pool.submit(run_train, *args, f"output_root={root / name}", timeout=timeout), root / name)
               for name, args in commands.items()}


@pytest.fixture
def train():
    return run_train


TINY_RUN = ["backbone=skip_mnist", "data.size=32", "method.steps=12", "eval_every=4", "method.code_channels=4",
            "threads=1"]


def run_dir_from(output: str) -> Path:
    """The run folder a finished dipddpm-train job names on its last "results: " line."""
    line = [l for l in output.splitlines() if "results: " in l][-1]
    return Path(line.split("results: ", 1)[1].strip())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One TINY_RUN job with seed 0 as a user runs it (a fresh process, stdout and stderr piped):
    (the finished process, its run folder)."""
    proc = run_train(*TINY_RUN, f"output_root={tmp_path_factory.mktemp('tiny')}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, run_dir_from(proc.stdout + proc.stderr)
