"""Plain convolutional stack (report R1; with ``hidden`` also report R3's DIP net).

Every layer is a 3x3 convolution with padding 1, so the spatial size is kept;
ReLU between layers, no normalisation, optional activation after the last layer.
Input (N, in_channels, H, W) -> output (N, out_channels, H, W), any H, W >= 1.
"""

from __future__ import annotations

from torch import nn

from dipddpm.errors import ConfigError, require, require_choice

DEPTH_PRESETS = {
    3: [64, 64],
    4: [64, 128, 64],
    5: [64, 128, 256, 128],
}

OUT_ACTIVATIONS = ("none", "relu", "sigmoid")


def output_activation(key: str, name: str) -> nn.Module:
    """Module for an output activation name (none | relu | sigmoid); ConfigError names ``key``."""
    require_choice(key, name, OUT_ACTIVATIONS)
    if name == "relu":
        return nn.ReLU()
    if name == "sigmoid":
        return nn.Sigmoid()
    return nn.Identity()


def positive_int_list(key: str, value, allow_empty: bool = False) -> list[int]:
    """``value`` as a list of positive ints, else ConfigError naming ``key``."""
    allowed = "a list of positive integers" + ("" if allow_empty else " (non-empty)")
    try:
        items = list(value)
    except TypeError:
        raise ConfigError(key, value, allowed) from None
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items)
    require(ok and (allow_empty or len(items) > 0), key, value, allowed)
    return [int(v) for v in items]


def hidden_widths(cfg) -> list[int]:
    """Widths of the hidden layers: ``cfg.hidden`` if set, else the preset for ``cfg.depth``.

    ``depth`` counts convolutions, so with ``hidden`` set it must be null or len(hidden) + 1.
    """
    depth = cfg.get("depth", None)
    hidden = cfg.get("hidden", None)
    if hidden is None:
        require(depth in DEPTH_PRESETS, "backbone.depth", depth, "one of 3, 4, 5")
        return list(DEPTH_PRESETS[depth])
    widths = positive_int_list("backbone.hidden", hidden, allow_empty=True)
    require(
        depth is None or depth == len(widths) + 1,
        "backbone.depth",
        depth,
        f"null or len(backbone.hidden) + 1 = {len(widths) + 1} when backbone.hidden is set",
    )
    return widths


def build(cfg, in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv stack in -> hidden... -> out with ReLU between layers and ``out_activation`` last."""
    widths = [in_channels] + hidden_widths(cfg) + [out_channels]
    layers: list[nn.Module] = []
    for index, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
        if index > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
    activation = output_activation("backbone.out_activation", cfg.get("out_activation", "none"))
    if not isinstance(activation, nn.Identity):
        layers.append(activation)
    return nn.Sequential(*layers)


def size_requirement(cfg) -> tuple[int, int]:
    """(1, 1): padded 3x3 convolutions accept any size."""
    hidden_widths(cfg)
    return 1, 1
