"""32x32 colour image sets for dataset-level DDPM training (report R5).

Two sources, both giving an :class:`ImageSet` of float32 images (N, 3, 32, 32) in [-1, 1]
with int64 labels (N,):

- ``cifar10``: the python pickle batches of CIFAR-10 (``data_batch_1`` .. ``data_batch_5``
  for ``train``, ``test_batch`` for ``test``) read from ``data.root`` (the
  ``cifar-10-batches-py`` folder itself or a folder holding it). Nothing is downloaded.
- ``patches32`` (offline default): deterministic 32x32 patches cut from colour photos
  bundled with scikit-image. Each photo is resized so its short side is each of
  ``sides``; the right-hand band of every resized photo (``holdout_fraction`` of its
  width, at least one patch wide) gives the ``test`` split, the rest the ``train`` split,
  so no pixel is in both. Patches lie on a grid with spacing ``stride``; the label is
  the photo's index in ``images``.

Horizontal flips are training augmentation (train_eps(flip=True)), not part of the sets.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dipddpm.errors import ConfigError, require, require_choice

NAMES = ("cifar10", "patches32")
SPLITS = ("train", "test")
SIDE = 32
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PHOTOS = {
    "astronaut": "astronaut", "coffee": "coffee", "chelsea": "chelsea", "rocket": "rocket",
    "immunohistochemistry": "immunohistochemistry", "hubble_deep_field": "hubble_deep_field",
    "retina": "retina", "motorcycle": "stereo_motorcycle",
}
_MISSING = (f"a folder with CIFAR-10's python batches ({CIFAR_FOLDER}/ with data_batch_1..5 and test_batch, "
            "from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz); or use data=patches32 offline")


@dataclass
class ImageSet:
    """images: float32 (N, 3, 32, 32) in [-1, 1]; labels: int64 (N,); classes: label names."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple

    def __len__(self) -> int:
        return int(self.images.shape[0])


def uint8_to_symmetric(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) in 0..255 -> float32 (N, 3, 32, 32) in [-1, 1]."""
    array = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float()
    return array / 127.5 - 1.0


# ---------------------------------------------------------------- CIFAR-10


def _cifar_folder(root) -> Path:
    require(root is not None, "data.root", root, _MISSING)
    folder = Path(str(root)).expanduser()
    for candidate in (folder, folder / CIFAR_FOLDER):
        if (candidate / "test_batch").is_file() or (candidate / "data_batch_1").is_file():
            return candidate
    raise ConfigError("data.root", str(root), _MISSING)


def _read_batch(path: Path, root) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            payload = pickle.load(handle, encoding="bytes")
        data = np.asarray(payload[b"data"], dtype=np.uint8)
        labels = np.asarray(payload[b"labels"], dtype=np.int64)
    except (OSError, KeyError, TypeError, ValueError, pickle.UnpicklingError, EOFError) as error:
        raise ConfigError("data.root", str(root), f"readable CIFAR-10 python batches ({path.name}: {error})") from None
    if data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE or len(labels) != len(data):
        raise ConfigError("data.root", str(root), f"CIFAR-10 batches of (N, 3072) bytes and N labels ({path.name})")
    return data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1), labels


@functools.lru_cache(maxsize=4)
def _cifar_arrays(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = _cifar_folder(root)
    names = CIFAR_TRAIN if split == "train" else CIFAR_TEST
    files = [folder / name for name in names if (folder / name).is_file()]
    require(bool(files), "data.root", root, f"{_MISSING} (no {'/'.join(names)} in {folder})")
    parts = [_read_batch(path, root) for path in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_cifar10(root, split: str = "train", limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 32, 32, 3), int64 labels (N,)) of a split; the first ``limit`` if set.

    The train split concatenates whichever of data_batch_1..5 exist (all five in the real set).
    """
    require_choice("data.split", split, SPLITS)
    require(root is not None, "data.root", root, _MISSING)
    images, labels = _cifar_arrays(str(root), split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.copy(), labels.copy()


# ---------------------------------------------------------------- patches32


@functools.lru_cache(maxsize=16)
def _photo(name: str) -> np.ndarray:
    from skimage import data as skdata

    raw = getattr(skdata, PHOTOS[name])()
    if isinstance(raw, tuple):
        raw = raw[0]
    raw = np.asarray(raw)
    if raw.ndim == 2:
        raw = np.stack([raw] * 3, axis=-1)
    return raw[:, :, :3]


def _interpolate(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=shape, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


@functools.lru_cache(maxsize=64)
def _resized(name: str, short_side: int) -> np.ndarray:
    """The photo resized (bilinear, anti-aliased) so its short side is ``short_side``: uint8 (H, W, 3).

    Photos are first brought to a short side of 512 (or kept when smaller), then to ``short_side``.
    """
    photo = _photo(name)
    height, width = photo.shape[:2]
    if min(height, width) > 512 and short_side < 512:
        photo = _resized(name, 512)
        height, width = photo.shape[:2]
    scale = short_side / min(height, width)
    shape = (max(SIDE, int(round(height * scale))), max(SIDE, int(round(width * scale))))
    return _interpolate(photo, shape)


def _grid(start: int, stop: int, stride: int) -> list[int]:
    """Patch origins in [start, stop - 32] spaced by stride (empty when the span is narrower than a patch)."""
    return list(range(start, stop - SIDE + 1, stride)) if stop - start >= SIDE else []


def patch_split(images, sides, stride: int, holdout_fraction: float, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 patches (N, 32, 32, 3), int64 labels (N,)) of ``split``, in a fixed order
    (photo, side, row, column). The held-out band of each resized photo is its right-most
    max(32, round(holdout_fraction * width)) columns."""
    patches, labels = [], []
    for label, name in enumerate(images):
        for short_side in sides:
            photo = _resized(name, int(short_side))
            height, width = photo.shape[:2]
            band = max(SIDE, int(round(holdout_fraction * width)))
            cut = width - band
            columns = _grid(cut, width, stride) if split == "test" else _grid(0, cut, stride)
            for top in _grid(0, height, stride):
                for left in columns:
                    patches.append(photo[top : top + SIDE, left : left + SIDE])
                    labels.append(label)
    if not patches:
        return np.zeros((0, SIDE, SIDE, 3), np.uint8), np.zeros(0, np.int64)
    return np.stack(patches), np.asarray(labels, dtype=np.int64)


@functools.lru_cache(maxsize=8)
def _patch_arrays(images: tuple, sides: tuple, stride: int, holdout_fraction: float, split: str):
    patches, labels = patch_split(images, sides, stride, holdout_fraction, split)
    patches.setflags(write=False)
    labels.setflags(write=False)
    return patches, labels


# ---------------------------------------------------------------- config entry points


def validate_data_config(cfg) -> None:
    """Check data.* of a 32x32 colour set before anything runs (cifar10 checks its files)."""
    require_choice("data.name", cfg.name, NAMES)
    limit = cfg.get("limit")
    require(limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 2),
            "data.limit", limit, "null or an integer >= 2")
    if cfg.name == "cifar10":
        _cifar_folder(cfg.get("root"))
        return
    images = list(cfg.get("images") or [])
    require(bool(images) and all(name in PHOTOS for name in images) and len(set(images)) == len(images),
            "data.images", cfg.get("images"), "a list of distinct photos from " + ", ".join(PHOTOS))
    sides = list(cfg.get("sides") or [])
    require(bool(sides) and all(isinstance(s, int) and not isinstance(s, bool) and s >= SIDE for s in sides),
            "data.sides", cfg.get("sides"), f"a non-empty list of integers >= {SIDE} (short side of each resize)")
    stride = cfg.get("stride")
    require(isinstance(stride, int) and not isinstance(stride, bool) and stride >= 1, "data.stride", stride,
            "an integer >= 1")
    fraction = cfg.get("holdout_fraction")
    require(isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction < 0.5,
            "data.holdout_fraction", fraction, "a number in (0, 0.5)")


def identity(cfg) -> dict:
    """The keys that fix a set's content (for cache keys)."""
    if cfg.name == "cifar10":
        return {"name": "cifar10", "root": str(Path(str(cfg.root)).expanduser().absolute()), "limit": cfg.get("limit")}
    return {"name": "patches32", "images": list(cfg.images), "sides": [int(s) for s in cfg.sides],
            "stride": int(cfg.stride), "holdout_fraction": float(cfg.holdout_fraction), "limit": cfg.get("limit"),
            "version": 1}


def load_dataset(cfg, split: str = "train") -> ImageSet:
    """The ``split`` (train | test) of the set named by ``cfg`` (a ``data`` group), in [-1, 1].

    ``limit`` keeps the first N images of each split (patches32: an evenly spaced subset,
    so every photo stays represented).
    """
    validate_data_config(cfg)
    require_choice("split", split, SPLITS)
    limit = cfg.get("limit")
    if cfg.name == "cifar10":
        images, labels = load_cifar10(cfg.root, split, limit)
        classes = CIFAR_CLASSES
    else:
        images, labels = _patch_arrays(tuple(cfg.images), tuple(int(s) for s in cfg.sides), int(cfg.stride),
                                       float(cfg.holdout_fraction), split)
        if limit is not None and limit < len(images):
            keep = np.round(np.linspace(0, len(images) - 1, int(limit))).astype(np.int64)
            images, labels = images[keep], labels[keep]
        classes = tuple(cfg.images)
    if len(images) == 0:
        raise ConfigError("data", cfg.name, f"a set whose {split} split is not empty")
    return ImageSet(name=str(cfg.name), split=split, images=uint8_to_symmetric(images),
                    labels=torch.from_numpy(np.array(labels, dtype=np.int64)), classes=tuple(classes))
