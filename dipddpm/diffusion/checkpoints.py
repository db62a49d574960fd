"""Disk cache of trained networks keyed by their training configuration.

``cache_dir/<key>.pt`` holds ``{"key": key, "state_dict": ...}`` and ``<key>.json``
holds the key config (and any info the trainer returned). Both are written through a
temporary file in the same folder and ``os.replace``, so a reader never sees a partial
file; if two processes train the same key at once, the last writer wins. Training runs on
``TRAIN_THREADS`` CPU threads whatever the job's ``threads=``: on a CPU the weights then depend
on the key alone (on one machine and torch build), so every job and every resumed sweep that
shares an entry gets the same network whether it trains it or loads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from dipddpm.io import write_bytes_atomic, write_json_atomic
from dipddpm.runtime import cpu_threads, model_device

TRAIN_THREADS = 1


def plain(obj):
    """Config objects (OmegaConf, numpy, paths, tuples) -> plain JSON-able values."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return plain(OmegaConf.to_container(obj, resolve=True))
    except ImportError:
        pass
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def canonical_json(config) -> str:
    """Sorted-key, compact JSON of a config (dict or OmegaConf)."""
    return json.dumps(plain(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def checkpoint_key(train_config) -> str:
    """sha256 hex digest (64 chars) of the canonical JSON of ``train_config``."""
    return hashlib.sha256(canonical_json(train_config).encode("utf-8")).hexdigest()


def checkpoint_paths(cache_dir, key_config) -> tuple[Path, Path]:
    """(weights path, json path) for a key config."""
    key = checkpoint_key(key_config)
    cache_dir = Path(cache_dir)
    return cache_dir / f"{key}.pt", cache_dir / f"{key}.json"


def _save_atomic(path: Path, payload) -> None:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_or_train_with_info(
    cache_dir,
    key_config,
    build_model: Callable[[], nn.Module],
    train_fn: Callable[[nn.Module], tuple[nn.Module, dict]],
) -> tuple[nn.Module, bool, dict]:
    """Load ``cache_dir/<checkpoint_key(key_config)>.pt`` into ``build_model()``, or train it.

    On a miss, ``train_fn(build_model())`` returns (trained model, info) with a JSON-able
    info dict (e.g. final loss, seconds); the state dict is stored with ``<key>.json``
    holding key_config and info, which a later hit returns again. build_model must build
    the same architecture every time. Returns (model, trained_now, info).
    """
    weights, meta = checkpoint_paths(cache_dir, key_config)
    key = weights.stem
    if weights.exists():
        model = build_model()
        try:
            payload = torch.load(weights, map_location=model_device(model), weights_only=True)
            if payload.get("key") != key:
                raise ValueError("checkpoint key does not match its file name")
            model.load_state_dict(payload["state_dict"])
            info = {}
            if meta.exists():
                with open(meta, encoding="utf-8") as handle:
                    info = json.load(handle).get("info") or {}
            return model, False, info
        except Exception as error:  # unreadable or mismatched file: train again and overwrite it
            warnings.warn(f"cannot reuse checkpoint {weights} ({error}); training again", stacklevel=2)
    with cpu_threads(TRAIN_THREADS):
        model, info = train_fn(build_model())
    info = dict(info or {})
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    write_json_atomic(meta, {"key": key, "config": plain(key_config), "info": info})
    _save_atomic(weights, {"key": key, "state_dict": state})
    return model, True, info



def save_sample_grids(path, grids: dict, settings: dict) -> None:
    """Store sample grids {epoch: HxWxC array in [0, 1]} as uint8 beside a cached network,
    with the settings that drew them (a later run shows them only for the same settings)."""
    buffer = io.BytesIO()
    epochs = sorted(grids)
    arrays = [np.round(grids[e] * 255).astype(np.uint8) for e in epochs]
    np.savez(buffer, epochs=np.asarray(epochs, dtype=np.int64),
             settings=np.asarray(json.dumps(settings, sort_keys=True)),
             grids=np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8))
    write_bytes_atomic(path, buffer.getvalue())


def load_sample_grids(path, settings: dict) -> dict:
    """The grids stored at ``path`` ({epoch: float32 array in [0, 1]}) if they were drawn
    with ``settings``, else {}."""
    try:
        with np.load(path) as stored:
            if str(stored["settings"]) != json.dumps(settings, sort_keys=True):
                return {}
            return {int(e): g.astype(np.float32) / 255.0 for e, g in zip(stored["epochs"], stored["grids"])}
    except (OSError, ValueError, KeyError):
        return {}
