"""Single-image sources and Gaussian corruption.

Images are float32 NumPy arrays, HxWxC (C = 1 or 3), values in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage import color, data as skdata, io as skio, transform

from dipddpm.errors import ConfigError, require

BUNDLED = (
    "astronaut", "camera", "cat", "chelsea", "coffee", "coins", "moon",
    "rocket", "text", "brick", "grass", "gravel", "immunohistochemistry",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass
class Observation:
    """A clean image, its corrupted observation and the corruption's sigma."""

    name: str
    clean: np.ndarray
    noisy: np.ndarray
    sigma: float


def _to_float_rgb(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    else:
        array = array.astype(np.float32)
        if array.max() > 1.0:
            array = array / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 4:
        array = array[:, :, :3]
    return np.clip(array, 0.0, 1.0)


def folder_images(folder: str | Path) -> list[Path]:
    """Image files in ``folder`` sorted by name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError("data.folder", str(folder), "an existing folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError("data.folder", str(folder), f"a folder holding {'/'.join(IMAGE_SUFFIXES)} files")
    return files


def resolve_source(image: str | None, path: str | None, folder: str | None) -> tuple[str, Path | None]:
    """Return (display name, file path or None for a bundled image); raise ConfigError if unknown."""
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError("data.path", path, "an existing image file")
        return file.stem, file
    if folder:
        files = folder_images(folder)
        by_stem = {p.stem: p for p in files}
        if image not in by_stem:
            raise ConfigError("data.image", image, f"a file stem in {folder}: " + ", ".join(by_stem))
        return image, by_stem[image]
    if image not in BUNDLED:
        raise ConfigError("data.image", image, "a scikit-image sample: " + ", ".join(BUNDLED) + " (or set data.path)")
    return image, None


def read_file(file: Path) -> np.ndarray:
    """The decoded pixels of an image file; ConfigError naming data.path when it cannot be decoded."""
    try:
        return skio.imread(str(file))
    except Exception as exc:  # unreadable or not an image
        raise ConfigError("data.path", str(file), f"a readable image file ({type(exc).__name__})") from None


FITS = ("resize", "crop")   # data.fit: how the image is brought to size x size


def load_image(name: str, file: Path | None, size: int | None, grayscale: bool, fit: str = "resize") -> np.ndarray:
    """Load and bring to size x size; HxWxC float32 in [0, 1]. ``fit="resize"``: the centre square
    resized to size; ``fit="crop"``: the centre size x size crop at the image's own resolution
    (validate_image_config checks that the image is that large)."""
    image = _to_float_rgb(getattr(skdata, name)() if file is None else read_file(file))
    if grayscale and image.shape[2] == 3:
        image = color.rgb2gray(image).astype(np.float32)[:, :, None]
    height, width = image.shape[:2]
    side = min(height, width)
    if fit == "crop" and size is not None:
        side = min(size, side)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[top : top + side, left : left + side]
    if size is not None and size != side:
        image = transform.resize(image, (size, size), order=3, anti_aliasing=size < side, mode="reflect")
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def add_gaussian_noise(clean: np.ndarray, sigma: float, clip: bool, seed: int) -> np.ndarray:
    """clean + sigma * N(0, 1) with a NumPy generator seeded by ``seed``; optionally clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    noisy = clean + sigma * rng.standard_normal(clean.shape).astype(np.float32)
    if clip:
        noisy = np.clip(noisy, 0.0, 1.0)
    return noisy.astype(np.float32)


def validate_image_config(cfg) -> None:
    """Check data.* of an image source before anything runs."""
    sigma = cfg.sigma
    require(isinstance(sigma, (int, float)) and 0.0 <= float(sigma) <= 1.0, "data.sigma", sigma, "a number in [0, 1]")
    size = cfg.get("size")
    require(size is None or (isinstance(size, int) and size >= 8), "data.size", size, "null or an integer >= 8")
    require(cfg.get("fit", "resize") in FITS, "data.fit", cfg.get("fit"), "one of " + ", ".join(FITS))
    name, file = resolve_source(cfg.get("image"), cfg.get("path"), cfg.get("folder"))
    pixels = read_file(file) if file is not None else None
    if cfg.get("fit") == "crop" and size is not None:
        pixels = getattr(skdata, name)() if pixels is None else pixels
        side = min(pixels.shape[:2])
        require(size <= side, "data.size", size, f"at most {side}, the short side of {name} (data.fit=crop)")


def load_observation(cfg, size: int | None = None) -> Observation:
    """The clean image of ``cfg`` (data group) and its noisy observation.

    ``size`` overrides cfg.size (the caller applies the profile and backbone limits).
    """
    validate_image_config(cfg)
    name, file = resolve_source(cfg.get("image"), cfg.get("path"), cfg.get("folder"))
    clean = load_image(name, file, size if size is not None else cfg.get("size"), bool(cfg.get("grayscale", False)),
                       str(cfg.get("fit", "resize")))
    noisy = add_gaussian_noise(clean, float(cfg.sigma), bool(cfg.get("clip", True)), int(cfg.get("noise_seed", 0)))
    return Observation(name=name, clean=clean, noisy=noisy, sigma=float(cfg.sigma))


def to_tensor(image: np.ndarray):
    """HxWxC array -> (1, C, H, W) float32 torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()


def to_image(tensor) -> np.ndarray:
    """(1, C, H, W) or (C, H, W) tensor -> HxWxC float32 array."""
    array = tensor.detach().float().cpu().numpy()
    if array.ndim == 4:
        array = array[0]
    return array.transpose(1, 2, 0)
