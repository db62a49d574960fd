"""The "skip" hourglass of Deep Image Prior (Ulyanov et al.), used by reports R4 and R5.

With L levels (the length of the three channel lists), level i (0-based) receives
``d`` maps at side S / 2**i (``d`` = in_channels at level 0, else num_channels_down[i-1])
and computes::

    deeper = conv(d -> down[i], filter_size_down, stride 2) BN act
             conv(down[i] -> down[i], filter_size_down) BN act
             [level i+1]                      (absent at the last level)
             upsample x2 (upsample_mode)
    skip   = conv(d -> skip[i], filter_skip_size) BN act     (only when skip[i] > 0)
    out    = concat(skip, deeper) along channels              (deeper alone if skip[i] == 0)
             BN(skip[i] + k)        k = up[i+1], or down[i] at the last level
             conv(skip[i] + k -> up[i], filter_size_up) BN act
             [conv1x1(up[i] -> up[i]) BN act]                 (need1x1_up)

followed by conv1x1(up[0] -> out_channels) and a sigmoid (need_sigmoid). Padding is
``pad`` (reflection | zero), biases follow ``need_bias``; ``downsample_mode`` avg/max
replace the stride-2 conv by a stride-1 conv and a 2x2 pool.
Input (N, in_channels, S, S) -> output (N, out_channels, S, S), in [0, 1] with the sigmoid.
"""

from __future__ import annotations

import torch
from torch import nn

from dipddpm.errors import ConfigError, require, require_choice

ACTIVATIONS = ("LeakyReLU", "ReLU", "ELU", "Swish", "none")
PADS = ("reflection", "zero")
UPSAMPLE_MODES = ("nearest", "bilinear")
DOWNSAMPLE_MODES = ("stride", "avg", "max")


def _channel_list(cfg, name: str, allow_zero: bool) -> list[int]:
    key = f"backbone.{name}"
    value = cfg.get(name)
    lowest = 0 if allow_zero else 1
    allowed = f"a non-empty list of integers >= {lowest}, one per level"
    try:
        items = list(value)
    except TypeError:
        raise ConfigError(key, value, allowed) from None
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= lowest for v in items)
    require(ok and len(items) > 0, key, value, allowed)
    return [int(v) for v in items]


def _kernel_list(cfg, name: str, default: int, levels: int) -> list[int]:
    """An odd kernel size, or a list of them with one per level."""
    key = f"backbone.{name}"
    value = cfg.get(name, default)
    allowed = f"an odd integer >= 1 or a list of {levels} of them"
    if isinstance(value, int) and not isinstance(value, bool):
        items = [value] * levels
    else:
        try:
            items = list(value)
        except TypeError:
            raise ConfigError(key, value, allowed) from None
    ok = len(items) == levels and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v % 2 == 1 for v in items
    )
    require(ok, key, value, allowed)
    return [int(v) for v in items]


class SkipSettings:
    """Validated keys of a ``skip`` backbone config."""

    def __init__(self, cfg):
        self.down = _channel_list(cfg, "num_channels_down", allow_zero=False)
        self.up = _channel_list(cfg, "num_channels_up", allow_zero=False)
        self.skip = _channel_list(cfg, "num_channels_skip", allow_zero=True)
        levels = len(self.down)
        for name, values in (("num_channels_up", self.up), ("num_channels_skip", self.skip)):
            require(
                len(values) == levels,
                f"backbone.{name}",
                values,
                f"a list as long as backbone.num_channels_down ({levels} levels)",
            )
        self.levels = levels
        self.filter_size_down = _kernel_list(cfg, "filter_size_down", 3, levels)
        self.filter_size_up = _kernel_list(cfg, "filter_size_up", 3, levels)
        self.filter_skip_size = _kernel_list(cfg, "filter_skip_size", 1, levels)
        self.upsample_mode = cfg.get("upsample_mode", "bilinear")
        require_choice("backbone.upsample_mode", self.upsample_mode, UPSAMPLE_MODES)
        self.downsample_mode = cfg.get("downsample_mode", "stride")
        require_choice("backbone.downsample_mode", self.downsample_mode, DOWNSAMPLE_MODES)
        self.pad = cfg.get("pad", "reflection")
        require_choice("backbone.pad", self.pad, PADS)
        self.act = cfg.get("act", "LeakyReLU")
        require_choice("backbone.act", self.act, ACTIVATIONS)
        self.act_slope = cfg.get("act_slope", 0.2)
        slope_is_number = isinstance(self.act_slope, (int, float)) and not isinstance(self.act_slope, bool)
        require(
            slope_is_number and self.act_slope >= 0,
            "backbone.act_slope",
            self.act_slope,
            "a number >= 0",
        )
        for flag, default in (("need_sigmoid", True), ("need_bias", True), ("need1x1_up", True)):
            value = cfg.get(flag, default)
            require(isinstance(value, bool), f"backbone.{flag}", value, "true or false")
            setattr(self, flag, value)


class Concat(nn.Module):
    """Runs every branch on the same input and concatenates the results on channels."""

    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, sum of branch channels, H', W'); branches must agree on H', W'."""
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class _Builder:
    """Creates the layers of one skip network from validated settings."""

    def __init__(self, settings: SkipSettings):
        self.s = settings

    def conv(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Module:
        padding_mode = "reflect" if self.s.pad == "reflection" and kernel > 1 else "zeros"
        pool_after = stride == 2 and self.s.downsample_mode != "stride"
        conv = nn.Conv2d(
            c_in,
            c_out,
            kernel,
            stride=1 if pool_after else stride,
            padding=kernel // 2,
            padding_mode=padding_mode,
            bias=self.s.need_bias,
        )
        if not pool_after:
            return conv
        pool = nn.AvgPool2d(2) if self.s.downsample_mode == "avg" else nn.MaxPool2d(2)
        return nn.Sequential(conv, pool)

    def act(self) -> nn.Module:
        name = self.s.act
        if name == "LeakyReLU":
            return nn.LeakyReLU(self.s.act_slope)
        if name == "ReLU":
            return nn.ReLU()
        if name == "ELU":
            return nn.ELU()
        if name == "Swish":
            return nn.SiLU()
        return nn.Identity()

    def conv_bn_act(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
        return [self.conv(c_in, c_out, kernel, stride), nn.BatchNorm2d(c_out), self.act()]

    def level(self, i: int, input_depth: int) -> nn.Sequential:
        s = self.s
        last = i == s.levels - 1
        deeper = self.conv_bn_act(input_depth, s.down[i], s.filter_size_down[i], stride=2)
        deeper += self.conv_bn_act(s.down[i], s.down[i], s.filter_size_down[i])
        if not last:
            deeper.append(self.level(i + 1, s.down[i]))
        deeper.append(nn.Upsample(scale_factor=2, mode=s.upsample_mode))
        deeper_branch = nn.Sequential(*deeper)
        deeper_depth = s.down[i] if last else s.up[i + 1]
        if s.skip[i] > 0:
            skip_branch = nn.Sequential(*self.conv_bn_act(input_depth, s.skip[i], s.filter_skip_size[i]))
            layers: list[nn.Module] = [Concat(skip_branch, deeper_branch)]
        else:
            layers = [deeper_branch]
        merged = s.skip[i] + deeper_depth
        layers.append(nn.BatchNorm2d(merged))
        layers += self.conv_bn_act(merged, s.up[i], s.filter_size_up[i])
        if s.need1x1_up:
            layers += self.conv_bn_act(s.up[i], s.up[i], 1)
        return nn.Sequential(*layers)


def build(cfg, in_channels: int, out_channels: int) -> nn.Sequential:
    """The DIP skip network for ``in_channels`` -> ``out_channels``."""
    settings = SkipSettings(cfg)
    builder = _Builder(settings)
    layers = [builder.level(0, in_channels), builder.conv(settings.up[0], out_channels, 1)]
    if settings.need_sigmoid:
        layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def size_requirement(cfg) -> tuple[int, int]:
    """(2**L, 2**L * m) for L levels: (32, 64) for the 5-level default, (8, 16) for skip_mnist.

    Each level halves the side, so it must divide by 2**L. At side 2**L the deepest
    level works on 1x1 maps: training-mode BatchNorm with batch 1 then has a single
    value per channel and raises, and reflection padding of a 1x1 map is undefined.
    So the deepest maps must be m >= 2 pixels wide; with reflection padding m also
    exceeds the largest padding (kernel // 2) of any conv.
    """
    settings = SkipSettings(cfg)
    deepest = 2
    if settings.pad == "reflection":
        kernels = settings.filter_size_down + settings.filter_size_up + settings.filter_skip_size
        deepest = max(deepest, max(kernels) // 2 + 1)
    return 2**settings.levels, 2**settings.levels * deepest
