"""Disk cache of trained networks keyed by their training configuration.

``cache_dir/<key>.pt`` holds ``{"key": key, "state_dict": ...}`` and ``<key>.json``
holds the key config (and any info the trainer returned). Both are written through a
temporary file in the same folder and ``os.replace``, so a reader never sees a partial
file; if two processes train the same key at once, the last writer wins.
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


def _plain(obj):
    """Config objects (OmegaConf, numpy, paths, tuples) -> plain JSON-able values."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return _plain(OmegaConf.to_container(obj, resolve=True))
    except ImportError:
        pass
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def canonical_json(config) -> str:
    """Sorted-key, compact JSON of a config (dict or OmegaConf)."""
    return json.dumps(_plain(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


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


def _device_of(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def load_or_train_with_info(
    cache_dir,
    key_config,
    build_model: Callable[[], nn.Module],
    train_fn: Callable[[nn.Module], tuple[nn.Module, dict]],
) -> tuple[nn.Module, bool, dict]:
    """Like :func:`load_or_train`, but train_fn returns (model, info) with a JSON-able info
    dict (e.g. final loss, seconds) that is stored and returned again on a cache hit.

    Returns (model, trained_now, info).
    """
    weights, meta = checkpoint_paths(cache_dir, key_config)
    key = weights.stem
    if weights.exists():
        model = build_model()
        try:
            payload = torch.load(weights, map_location=_device_of(model), weights_only=True)
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
    model, info = train_fn(build_model())
    info = dict(info or {})
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    write_json_atomic(meta, {"key": key, "config": _plain(key_config), "info": info})
    _save_atomic(weights, {"key": key, "state_dict": state})
    return model, True, info


def load_or_train(
    cache_dir,
    key_config,
    build_model: Callable[[], nn.Module],
    train_fn: Callable[[nn.Module], nn.Module],
) -> tuple[nn.Module, bool]:
    """Load ``cache_dir/<checkpoint_key(key_config)>.pt`` into ``build_model()``, or train.

    On a miss, ``train_fn(build_model())`` returns the trained module, whose state dict
    is stored (with ``<key>.json`` holding key_config). build_model must build the same
    architecture every time. Returns (model, trained_now).
    """
    model, trained_now, _ = load_or_train_with_info(
        cache_dir, key_config, build_model, lambda m: (train_fn(m), {})
    )
    return model, trained_now
