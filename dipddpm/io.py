"""Atomic file writing: a reader never sees a half-written result file."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in JSON")


def _clean_floats(obj):
    """Replace NaN/inf by None so the JSON stays standard and no silent NaN reaches a table."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    return obj


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write data to path through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj) -> Path:
    """Write obj as indented JSON; non-finite floats become null."""
    text = json.dumps(_clean_floats(obj), indent=2, sort_keys=False, default=_json_default)
    return write_text_atomic(path, text + "\n")


def read_json(path: str | Path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def csv_text(rows, columns: list[str] | None = None) -> str:
    """CSV text of a pandas DataFrame or of dicts (one per line; keys not in `columns` are left
    out, `columns` defaults to the keys in order of appearance). None and NaN are empty cells."""
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=columns, dtype=object)
    return frame.to_csv(index=False, columns=columns)


def write_csv_atomic(path: str | Path, rows, columns: list[str] | None = None) -> Path:
    """Write csv_text(rows, columns) to path atomically."""
    return write_text_atomic(path, csv_text(rows, columns))


def save_figure_atomic(path: str | Path, figure, svg: bool = False) -> Path:
    """Save a matplotlib figure as PNG atomically (with svg=True also beside it as .svg) and close it.
    The SVG carries no date and fixed element ids: the same figure gives the same bytes (committed plots
    change only when their data does)."""
    import io as _io

    import matplotlib
    import matplotlib.pyplot as plt

    formats = ("png", "svg") if svg else ("png",)
    data = {}
    for fmt in formats:
        buffer = _io.BytesIO()
        with matplotlib.rc_context({"svg.hashsalt": "dipddpm"}):
            figure.savefig(buffer, format=fmt, dpi=100, bbox_inches="tight",
                           metadata={"Date": None} if fmt == "svg" else None)
        data[fmt] = buffer.getvalue()
    plt.close(figure)
    for fmt in formats[1:]:
        write_bytes_atomic(Path(path).with_suffix("." + fmt), data[fmt])
    return write_bytes_atomic(path, data["png"])


def save_image_atomic(path: str | Path, image: np.ndarray) -> Path:
    """Save an HxW or HxWxC float image in [0, 1] as an 8-bit PNG atomically."""
    import io as _io

    from PIL import Image

    array = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    array = np.round(array * 255.0).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    buffer = _io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return write_bytes_atomic(path, buffer.getvalue())
