import os
import subprocess
import sys
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
    """conf/train.yaml composed with ``overrides`` as dipddpm-train would compose it."""
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


@pytest.fixture
def train():
    return run_train
