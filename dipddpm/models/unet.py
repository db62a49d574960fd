"""Encoder-decoder "UNet" of report R2 (its DIP backbone).

Down path: ``len(channels)`` blocks of conv(kernel_size, stride 2) + BatchNorm +
LeakyReLU, so level i (1-based) holds ``channels[i-1]`` maps at side H / 2**i.
Skip path: at level i < L a conv(skip_kernel_size, stride 1) maps the level's
features to ``skip_channels[i-1]`` maps (0 = no skip at that level).
Up path: from the bottleneck, ConvTranspose(up_kernel_size, stride 2) to the next
finer level, concatenated with the level's skip maps, then BatchNorm + LeakyReLU.
``merge_width`` says how wide the concatenation is: ``level`` (R2's code) makes it the
level's down width, so the transposed conv outputs width - skip maps (124 + 4 = 128);
``level_plus_skip`` lets the transposed conv output the full width (128 + 4 = 132).
The last ConvTranspose reaches full size with ``out_channels`` maps, then BatchNorm
over those maps when ``out_norm`` is ``batch`` (R2), then ``out_activation`` (sigmoid by
default, so output in [0, 1]).
Input (N, in_channels, H, W) -> output (N, out_channels, H, W).
"""

from __future__ import annotations

import torch
from torch import nn

from dipddpm.errors import require, require_choice
from dipddpm.models.cnn import OUT_ACTIVATIONS, output_activation, positive_int_list

DEFAULT_CHANNELS = (8, 16, 32, 64, 128, 256)
DEFAULT_SKIP_CHANNELS = (0, 0, 4, 4, 4)
MERGE_WIDTHS = ("level", "level_plus_skip")
OUT_NORMS = ("batch", "none")


class _Settings:
    """Validated unet keys of a backbone config."""

    def __init__(self, cfg):
        self.channels = positive_int_list("backbone.channels", cfg.get("channels", DEFAULT_CHANNELS))
        skip = cfg.get("skip_channels", DEFAULT_SKIP_CHANNELS)
        levels_with_skip = len(self.channels) - 1
        allowed = f"a list of {levels_with_skip} integers >= 0 (one per level above the bottleneck)"
        require(
            _is_int_list(skip) and len(skip) == levels_with_skip and all(v >= 0 for v in skip),
            "backbone.skip_channels",
            skip,
            allowed,
        )
        self.skip_channels = [int(v) for v in skip]
        self.kernel_size = cfg.get("kernel_size", 5)
        require(_is_odd(self.kernel_size), "backbone.kernel_size", self.kernel_size, "an odd integer >= 1")
        self.skip_kernel_size = cfg.get("skip_kernel_size", 5)
        require(
            _is_odd(self.skip_kernel_size),
            "backbone.skip_kernel_size",
            self.skip_kernel_size,
            "an odd integer >= 1",
        )
        self.up_kernel_size = cfg.get("up_kernel_size", 4)
        up_ok = isinstance(self.up_kernel_size, int) and self.up_kernel_size >= 2
        require(
            up_ok and self.up_kernel_size % 2 == 0,
            "backbone.up_kernel_size",
            self.up_kernel_size,
            "an even integer >= 2 (so a stride-2 transposed conv exactly doubles the side)",
        )
        self.negative_slope = cfg.get("negative_slope", 0.01)
        require(
            isinstance(self.negative_slope, (int, float)) and self.negative_slope >= 0,
            "backbone.negative_slope",
            self.negative_slope,
            "a number >= 0",
        )
        self.out_activation = cfg.get("out_activation", "sigmoid")
        require_choice("backbone.out_activation", self.out_activation, OUT_ACTIVATIONS)
        self.merge_width = cfg.get("merge_width", "level")
        require_choice("backbone.merge_width", self.merge_width, MERGE_WIDTHS)
        if self.merge_width == "level":
            require(
                all(s < c for c, s in zip(self.channels, self.skip_channels)),
                "backbone.skip_channels",
                skip,
                "each below its level's width in backbone.channels when backbone.merge_width=level",
            )
        self.out_norm = cfg.get("out_norm", "batch")
        require_choice("backbone.out_norm", self.out_norm, OUT_NORMS)


def _is_int_list(value) -> bool:
    try:
        items = list(value)
    except TypeError:
        return False
    return all(isinstance(v, int) and not isinstance(v, bool) for v in items)


def _is_odd(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and value % 2 == 1


class UNet(nn.Module):
    """Stride-2 conv encoder, transposed-conv decoder, conv skips concatenated on the way up."""

    def __init__(self, settings: _Settings, in_channels: int, out_channels: int):
        super().__init__()
        widths = settings.channels
        slope = settings.negative_slope
        k, ks, ku = settings.kernel_size, settings.skip_kernel_size, settings.up_kernel_size
        self.down = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.down.append(
                nn.Sequential(
                    nn.Conv2d(previous, width, k, stride=2, padding=k // 2),
                    nn.BatchNorm2d(width),
                    nn.LeakyReLU(slope),
                )
            )
            previous = width
        self.skip = nn.ModuleList(
            nn.Conv2d(width, skip_width, ks, padding=ks // 2) if skip_width > 0 else nn.Identity()
            for width, skip_width in zip(widths[:-1], settings.skip_channels)
        )
        self.skip_used = [skip_width > 0 for skip_width in settings.skip_channels]
        self.up = nn.ModuleList()
        self.up_post = nn.ModuleList()
        previous = widths[-1]
        for width, skip_width in reversed(list(zip(widths[:-1], settings.skip_channels))):
            up_width = width - skip_width if settings.merge_width == "level" else width
            self.up.append(nn.ConvTranspose2d(previous, up_width, ku, stride=2, padding=(ku - 2) // 2))
            merged = up_width + skip_width
            self.up_post.append(nn.Sequential(nn.BatchNorm2d(merged), nn.LeakyReLU(slope)))
            previous = merged
        self.head = nn.ConvTranspose2d(previous, out_channels, ku, stride=2, padding=(ku - 2) // 2)
        self.out_norm = nn.BatchNorm2d(out_channels) if settings.out_norm == "batch" else nn.Identity()
        self.out_activation = output_activation("backbone.out_activation", settings.out_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W); H, W multiples of 2**len(channels)."""
        features = []
        for block in self.down:
            x = block(x)
            features.append(x)
        levels = len(self.skip)
        for step, (up, post) in enumerate(zip(self.up, self.up_post)):
            level = levels - 1 - step
            x = up(x)
            if self.skip_used[level]:
                x = torch.cat([x, self.skip[level](features[level])], dim=1)
            x = post(x)
        return self.out_activation(self.out_norm(self.head(x)))


def build(cfg, in_channels: int, out_channels: int) -> UNet:
    """The R2 UNet for ``in_channels`` -> ``out_channels``."""
    return UNet(_Settings(cfg), in_channels, out_channels)


def size_requirement(cfg) -> tuple[int, int]:
    """(2**L, 2**(L+1)) with L = len(channels): (64, 128) for the defaults.

    Each of the L stride-2 convs halves the side, so it must divide by 2**L. At
    side 2**L the bottleneck is 1x1, and with batch 1 (a DIP fit) training-mode
    BatchNorm then sees a single value per channel and raises; one more factor of
    two keeps the bottleneck at 2x2 or larger.
    """
    levels = len(_Settings(cfg).channels)
    return 2**levels, 2 ** (levels + 1)
