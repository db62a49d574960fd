"""Backbone registry: one module per family, each exposing ``build`` and ``size_requirement``.

``build(cfg, in_channels, out_channels) -> nn.Module`` and
``size_requirement(cfg) -> (multiple, minimum)``: the image side must be a multiple
of ``multiple`` and at least ``minimum``.
"""

from __future__ import annotations

import importlib

from dipddpm.errors import ConfigError, require_choice

FAMILIES = {
    "cnn": "dipddpm.models.cnn",
    "unet": "dipddpm.models.unet",
    "segnet": "dipddpm.models.segnet",
    "skip": "dipddpm.models.skip",
    "unet_res": "dipddpm.models.unet_res",
    "unet_ln": "dipddpm.models.unet_ln",
    "unet_wide": "dipddpm.models.unet_wide",
}


def _family(cfg):
    require_choice("backbone.name", cfg.name, FAMILIES)
    return importlib.import_module(FAMILIES[cfg.name])


def build_backbone(cfg, in_channels: int, out_channels: int):
    """Build the backbone named by ``cfg.name`` mapping in_channels to out_channels."""
    return _family(cfg).build(cfg, in_channels, out_channels)


def size_requirement(cfg) -> tuple[int, int]:
    """(multiple, minimum) that an input side must satisfy for this backbone."""
    return _family(cfg).size_requirement(cfg)


def check_size(cfg, size: int, key: str = "data.size") -> None:
    """Raise ConfigError naming ``key`` if ``size`` does not suit the backbone."""
    multiple, minimum = size_requirement(cfg)
    if size % multiple != 0 or size < minimum:
        raise ConfigError(
            key, size, f"a multiple of {multiple} and at least {minimum} for backbone={cfg.name}"
        )
