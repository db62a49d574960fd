"""Writers of small data files in the formats the loaders read (tests only)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

# IDX type codes (http://yann.lecun.com/exdb/mnist/): the inverse of dipddpm.data.mnist's reader table
IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}


def write_idx(path, array) -> Path:
    """Write ``array`` (uint8, int8, int16, int32, float32 or float64) as an IDX file: two zero
    bytes, the type code, the number of dimensions, each dimension as a big-endian uint32,
    then the values big-endian; gzipped when the name ends with .gz."""
    path = Path(path)
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    header = bytes([0, 0, IDX_CODES[native], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(native.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")) as handle:
        handle.write(data)
    return path


def write_cifar_batch(path, images: np.ndarray, labels) -> Path:
    """Write uint8 images (N, 32, 32, 3) and labels as a CIFAR-10 python batch: a pickle of
    {b"data": (N, 3072) uint8, channel-major RGB, b"labels": list, ...}."""
    path = Path(path)
    images = np.asarray(images, dtype=np.uint8)
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    payload = {b"batch_label": path.name.encode(), b"labels": [int(v) for v in labels], b"data": data,
               b"filenames": [f"{i}.png".encode() for i in range(len(images))]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(payload, handle)
    return path
