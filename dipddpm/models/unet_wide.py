"""Report R5's eps-net (family ``unet_wide``): the DDPM UNet of Ho et al. with wide
residual blocks, self-attention at chosen resolutions and a sinusoidal time embedding.

For a side ``s`` and ``L = len(channel_mults)`` levels, level ``i`` works at side
``s / 2**i`` with ``base_channels * channel_mults[i]`` channels. Down path: a 3x3 conv to
``base_channels``, then per level ``num_res_blocks`` residual blocks (each followed by
self-attention when the level's side is in ``attention_resolutions``) and a stride-2 conv
(not after the last level). Middle: residual block, attention, residual block. Up path:
per level (deepest first) ``num_res_blocks + 1`` residual blocks on the concatenation
with the stored down features, attention as above, and nearest x2 upsampling + 3x3 conv
(not after level 0). Attention levels are fixed at build time from ``image_size``: level
``i`` has attention when ``image_size / 2**i`` is in ``attention_resolutions``.
Output: GroupNorm, SiLU, 3x3 conv to ``out_channels``.

Residual block: GroupNorm, SiLU, conv3x3, + Linear(SiLU(temb)) per channel, GroupNorm,
SiLU, dropout, conv3x3, added to the input (1x1 conv when the width changes).
Time embedding: sinusoidal(t, base_channels) -> Linear(4 base) -> SiLU -> Linear(4 base).
GroupNorm uses ``norm_groups`` groups, or fewer for narrow levels (see :func:`group_count`).

Input x: (B, in_channels, s, s) float; t: (B,) integer timesteps (a scalar is repeated).
Output (B, out_channels, s, s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dipddpm.errors import ConfigError, require
from dipddpm.models.embeddings import SinusoidalEmbedding, batch_timesteps

DEFAULTS = {
    "base_channels": 128,
    "channel_mults": [1, 1, 2, 2, 4],
    "num_res_blocks": 2,
    "attention_resolutions": [16],
    "attention_heads": 1,
    "dropout": 0.1,
    "norm_groups": 32,
    "image_size": 32,
}


def _get(cfg, key):
    value = cfg.get(key, DEFAULTS[key]) if cfg is not None else DEFAULTS[key]
    return DEFAULTS[key] if value is None else value


MIN_GROUP_CHANNELS = 4


def group_count(channels: int, groups: int) -> int:
    """GroupNorm groups for a width: the largest divisor of ``channels`` that is at most
    ``groups`` and leaves at least MIN_GROUP_CHANNELS (4, as 128 channels / 32 groups in
    Ho et al.) channels per group. One channel per group would be an instance norm, which
    removes the per-channel time bias added just before it."""
    top = max(1, min(groups, channels // MIN_GROUP_CHANNELS))
    return next(g for g in range(top, 0, -1) if channels % g == 0)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels, groups), channels)


class ResBlock(nn.Module):
    """Wide residual block with an additive per-channel time bias: (B, Cin, H, W), (B, E) -> (B, Cout, H, W)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(emb_dim, out_channels)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class SelfAttention(nn.Module):
    """Multi-head softmax self-attention over all pixels, added back: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        attended = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 conv3x3: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2, then conv3x3: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Residual blocks, each followed by attention or an identity."""

    def __init__(self, blocks: list[ResBlock], attentions: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)


class UNetWide(nn.Module):
    """R5's DDPM UNet; forward(x (B, C, s, s), t (B,)) -> eps (B, out_channels, s, s).

    Attention sits at the levels whose side, for an input of side ``image_size``, is in
    ``attention_resolutions`` (level i has side image_size / 2**i).
    """

    def __init__(self, in_channels: int, out_channels: int, *, base_channels: int, channel_mults, num_res_blocks: int,
                 attention_resolutions, attention_heads: int, dropout: float, norm_groups: int, image_size: int):
        super().__init__()
        self.num_levels = len(channel_mults)
        self.attention_levels = sorted(
            level for level in range(self.num_levels) if image_size // 2**level in set(attention_resolutions))
        emb_dim = 4 * base_channels
        self.embed = nn.Sequential(SinusoidalEmbedding(base_channels), nn.Linear(base_channels, emb_dim), nn.SiLU(),
                                   nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, norm_groups)

        def attention(channels: int, level: int) -> nn.Module:
            if level in self.attention_levels:
                return SelfAttention(channels, attention_heads, norm_groups)
            return nn.Identity()

        widths = [base_channels * m for m in channel_mults]
        skips = [base_channels]
        current = base_channels
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, width in enumerate(widths):
            blocks, attentions = [], []
            for _ in range(num_res_blocks):
                blocks.append(block(current, width))
                current = width
                attentions.append(attention(current, level))
                skips.append(current)
            self.down.append(_Level(blocks, attentions))
            if level < self.num_levels - 1:
                self.downsample.append(Downsample(current))
                skips.append(current)
        self.mid1 = block(current, current)
        self.mid_attn = SelfAttention(current, attention_heads, norm_groups)
        self.mid2 = block(current, current)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(self.num_levels)):
            blocks, attentions = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(current + skips.pop(), widths[level]))
                current = widths[level]
                attentions.append(attention(current, level))
            self.up.append(_Level(blocks, attentions))
            if level > 0:
                self.upsample.append(Upsample(current))
        self.out = nn.Sequential(_norm(current, norm_groups), nn.SiLU(), nn.Conv2d(current, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed(batch_timesteps(t, x.shape[0], x.device))
        h = self.conv_in(x)
        stored = [h]
        for level, stage in enumerate(self.down):
            for block, attention in zip(stage.blocks, stage.attentions):
                h = attention(block(h, emb))
                stored.append(h)
            if level < self.num_levels - 1:
                h = self.downsample[level](h)
                stored.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for index, stage in enumerate(self.up):
            for block, attention in zip(stage.blocks, stage.attentions):
                h = attention(block(torch.cat([h, stored.pop()], dim=1), emb))
            if index < self.num_levels - 1:
                h = self.upsample[index](h)
        return self.out(h)


def _int_list(cfg, key: str, lowest: int) -> list[int]:
    value = _get(cfg, key)
    allowed = f"a list of integers >= {lowest}"
    try:
        items = list(value)
    except TypeError:
        raise ConfigError(f"backbone.{key}", value, allowed) from None
    require(all(isinstance(v, int) and not isinstance(v, bool) and v >= lowest for v in items),
            f"backbone.{key}", value, allowed)
    return [int(v) for v in items]


def settings(cfg) -> dict:
    """The validated keyword arguments of UNetWide from a ``backbone`` config."""
    out = {}
    for key in ("base_channels", "num_res_blocks", "attention_heads", "norm_groups", "image_size"):
        value = _get(cfg, key)
        lowest = 0 if key == "num_res_blocks" else 1
        require(isinstance(value, int) and not isinstance(value, bool) and value >= lowest,
                f"backbone.{key}", value, f"an integer >= {lowest}")
        out[key] = int(value)
    require(out["num_res_blocks"] >= 1, "backbone.num_res_blocks", out["num_res_blocks"], "an integer >= 1")
    mults = _int_list(cfg, "channel_mults", 1)
    require(len(mults) >= 1, "backbone.channel_mults", mults, "a non-empty list of integers >= 1")
    out["channel_mults"] = mults
    out["attention_resolutions"] = _int_list(cfg, "attention_resolutions", 1)
    dropout = _get(cfg, "dropout")
    require(isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0,
            "backbone.dropout", dropout, "a number in [0, 1)")
    out["dropout"] = float(dropout)
    widths = {out["base_channels"] * m for m in mults}
    bad = sorted(w for w in widths if w % out["attention_heads"])
    require(not bad, "backbone.attention_heads", out["attention_heads"],
            f"a divisor of every level width ({sorted(widths)})")
    return out


def build(cfg, in_channels: int, out_channels: int) -> UNetWide:
    """Build the R5 UNet from the ``backbone`` config group (``at_profile`` is not applied here)."""
    return UNetWide(in_channels, out_channels, **settings(cfg))


def size_requirement(cfg) -> tuple[int, int]:
    """L levels halve the side L - 1 times: a multiple of 2**(L-1), at least 2**(L-1)."""
    factor = 2 ** (len(settings(cfg)["channel_mults"]) - 1)
    return factor, factor
