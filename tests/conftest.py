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


@pytest.fixture
def train():
    return run_train
