"""Method registry. A method module exposes:

- ``DATA_KINDS``: the data groups (``data.name``) it accepts, checked before ``validate``;
- ``validate(cfg)``: raise ConfigError for anything unusable, before any training;
- ``describe(cfg) -> (text, plan_dict)``: what a dry run prints and writes;
- ``clean_image_uses(cfg) -> list[str]``: where the clean image steers the run (not just scores it);
- ``run(ctx) -> dict``: train/evaluate and return flat metrics.
"""

from __future__ import annotations

import importlib

from dipddpm.errors import require, require_choice

METHODS = {
    "dip": "dipddpm.methods.dip",
    "classical": "dipddpm.methods.classical",
    "ddpm_single": "dipddpm.methods.ddpm_single",
    "ddpm_dipnoise": "dipddpm.methods.ddpm_dipnoise",
    "ddpm_dataset": "dipddpm.methods.ddpm_dataset",
    "zsn2n": "dipddpm.methods.zsn2n",
    "noise2fast": "dipddpm.methods.noise2fast",
}


def get_method(name: str):
    """The module implementing method ``name``."""
    require_choice("method.name", name, METHODS)
    return importlib.import_module(METHODS[name])


def require_data_kind(method, cfg) -> None:
    """ConfigError naming ``data`` unless ``cfg.data.name`` is one of the method module's DATA_KINDS."""
    kinds = method.DATA_KINDS
    require(cfg.data.name in kinds, "data", cfg.data.name,
            f"method={cfg.method.name} accepts data=" + " | ".join(kinds))
