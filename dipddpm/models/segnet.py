"""SegNet (VGG16-style encoder, max-unpool decoder), report R2's second DIP backbone.

Encoder: ``blocks`` is a list of blocks, each a list of conv widths; every conv is
3x3 (padding 1) + BatchNorm (momentum ``bn_momentum``: torch's 0.1 by default, R2's
code 0.5) + ReLU, and every block ends with 2x2 max pooling that
keeps its indices. Decoder: blocks in reverse order, each starts with max unpooling
at the saved indices, then mirrors the block's convs (a conv a->b becomes b->a, in
reverse order). The mirror of the very first conv maps to ``out_channels`` and has
no BatchNorm/ReLU; ``out_activation`` (default none) follows, so the output is linear.
Input (N, in_channels, H, W) -> output (N, out_channels, H, W).
"""

from __future__ import annotations

import torch
from torch import nn

from dipddpm.errors import ConfigError, require, require_choice
from dipddpm.models.cnn import OUT_ACTIVATIONS, output_activation, positive_int_list

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def _conv_bn_relu(c_in: int, c_out: int, momentum: float) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out, momentum=momentum), nn.ReLU())


def block_widths(cfg) -> list[list[int]]:
    """Validated ``backbone.blocks``: a non-empty list of non-empty lists of positive ints."""
    blocks = cfg.get("blocks", VGG16_BLOCKS)
    try:
        items = list(blocks)
    except TypeError:
        raise ConfigError("backbone.blocks", blocks, "a non-empty list of lists of conv widths") from None
    if not items:
        raise ConfigError("backbone.blocks", blocks, "a non-empty list of lists of conv widths")
    return [positive_int_list(f"backbone.blocks[{i}]", block) for i, block in enumerate(items)]


class SegNet(nn.Module):
    """Conv-BN-ReLU encoder with pooling indices, mirrored unpooling decoder."""

    def __init__(self, blocks: list[list[int]], in_channels: int, out_channels: int, out_activation: str,
                 bn_momentum: float = 0.1):
        super().__init__()
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        previous = in_channels
        encoder_convs: list[list[tuple[int, int]]] = []
        for widths in blocks:
            pairs = []
            for width in widths:
                pairs.append((previous, width))
                previous = width
            encoder_convs.append(pairs)
            self.encoder.append(nn.Sequential(*(_conv_bn_relu(a, b, bn_momentum) for a, b in pairs)))
        for block_index in reversed(range(len(blocks))):
            layers = []
            for conv_index, (a, b) in reversed(list(enumerate(encoder_convs[block_index]))):
                if block_index == 0 and conv_index == 0:
                    layers.append(nn.Conv2d(b, out_channels, 3, padding=1))
                else:
                    layers.append(_conv_bn_relu(b, a, bn_momentum))
            self.decoder.append(nn.Sequential(*layers))
        self.pool = nn.MaxPool2d(2, stride=2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, stride=2)
        self.out_activation = output_activation("backbone.out_activation", out_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H, W) -> (N, C_out, H, W); H, W multiples of 2**len(blocks)."""
        saved = []
        for block in self.encoder:
            x = block(x)
            size = x.shape
            x, indices = self.pool(x)
            saved.append((indices, size))
        for block, (indices, size) in zip(self.decoder, reversed(saved)):
            x = self.unpool(x, indices, output_size=size)
            x = block(x)
        return self.out_activation(x)


def build(cfg, in_channels: int, out_channels: int) -> SegNet:
    """SegNet for ``in_channels`` -> ``out_channels`` (VGG16 widths by default)."""
    out_activation = cfg.get("out_activation", "none")
    require_choice("backbone.out_activation", out_activation, OUT_ACTIVATIONS)
    momentum = cfg.get("bn_momentum", 0.1)
    require(isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and 0.0 < momentum <= 1.0,
            "backbone.bn_momentum", momentum, "a number in (0, 1]")
    return SegNet(block_widths(cfg), in_channels, out_channels, out_activation, float(momentum))


def size_requirement(cfg) -> tuple[int, int]:
    """(2**B, 2**B) with B = len(blocks): (32, 32) for VGG16.

    Each block halves the side with a 2x2 pool, so the side must divide by 2**B; at the
    minimum the deepest conv block works on 2x2 maps, so with batch 1 its training-mode
    BatchNorm pools 4 values per channel (R2 ran 128x128: 8x8 maps there). profile=standard
    runs SegNet at 32x32 because 64x64 costs about 2.5 times as much per step.
    """
    count = len(block_widths(cfg))
    return 2**count, 2**count
