"""What a method gets to run: the resolved config, its output folder, device, seed, profile."""

from __future__ import annotations

import contextlib

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dipddpm.errors import require, require_choice


def resolve_device(setting: str) -> torch.device:
    """auto -> cuda when available else cpu; cuda without a GPU is a ConfigError."""
    require_choice("device", setting, ("auto", "cpu", "cuda"))
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda":
        require(torch.cuda.is_available(), "device", setting, "auto or cpu (no CUDA device is available)")
    return torch.device(setting)


def synchronize(device) -> None:
    """Wait for the work queued on a CUDA ``device`` (nothing elsewhere), so wall-clock timings are real."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer; cpu for a module with neither."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def apply_threads(threads) -> None:
    """Set torch's CPU thread count (None keeps torch's default)."""
    if threads is None:
        return
    require(isinstance(threads, int) and threads >= 1, "threads", threads, "null or an integer >= 1")
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


@contextlib.contextmanager
def cpu_threads(count: int):
    """Run the block with torch on ``count`` CPU threads, then restore the previous count.
    CPU float reductions split by thread count, so the same seeded training gives other weights
    on another count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class RunContext:
    """Everything a method's ``run(ctx)`` needs besides the config."""

    cfg: object
    run_dir: Path
    device: torch.device
    seed: int
    progress: bool
    cache_dir: Path

    @property
    def profile(self):
        return self.cfg.profile

    def generator(self, offset: int = 0) -> torch.Generator:
        """A torch generator on the run's device seeded by seed + offset."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(self.seed) * 1000003 + offset)
        return generator
