"""Progress bars: drawn on a terminal, silent when output goes to a file or pipe."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

FALLBACK_SIZE = (80, 24)  # columns, lines of a terminal that reports no size (e.g. a fresh pseudo-terminal)


def progress_enabled(setting=None) -> bool:
    """``setting`` True/False forces it; None means: only when stderr is a terminal."""
    if setting is not None:
        return bool(setting)
    return sys.stderr.isatty()


def _terminal_size_known() -> bool:
    """Whether stderr's terminal reports a size (columns and lines both above 0)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return size.columns > 0 and size.lines > 0


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` units on stderr, or a no-op bar when disabled.

    The bar follows the terminal's size; where the terminal reports a size of 0 x 0
    (tqdm would then draw nothing) it assumes FALLBACK_SIZE.
    """
    known = _terminal_size_known() if enabled else True
    columns, lines = (None, None) if known else FALLBACK_SIZE
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=known,
                ncols=columns, nrows=lines, mininterval=0.5, file=sys.stderr)
