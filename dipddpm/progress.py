"""Progress bars: drawn on a terminal, silent when output goes to a file or pipe."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_enabled(setting=None) -> bool:
    """``setting`` True/False forces it; None means: only when stderr is a terminal."""
    if setting is not None:
        return bool(setting)
    return sys.stderr.isatty()


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` units, or a no-op bar when disabled."""
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, mininterval=0.5)
