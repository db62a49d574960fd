"""Report R3's small time-conditioned UNet (family ``unet_res``): (x, t) -> eps.

Three levels for a side ``s`` (a multiple of 4): ``s``, ``s/2``, ``s/4`` (28, 14, 7 for
MNIST) with channels ``channels = [c0, c1, c2]``. Each level adds a linear projection of
a sinusoidal time embedding (dim ``emb_dim``) to its input, then applies a residual conv
block (conv, then norm-act-conv-norm-act added back). The lowest level has linear
attention. The decoder concatenates the skip features, goes through residual blocks
with ``c0`` channels and ends in a 1x1 conv to ``out_channels``.

Input x: (B, in_channels, s, s) float; t: (B,) integer timesteps. Output (B, out_channels, s, s).
"""

from __future__ import annotations

import torch
from torch import nn

from dipddpm.errors import require, require_choice
from dipddpm.models.embeddings import SinusoidalEmbedding, batch_timesteps, check_three_levels_and_embedding

DEFAULTS = {
    "channels": [64, 128, 128],
    "emb_dim": 1024,
    "attention": True,
    "attention_heads": 4,
    "attention_head_dim": 32,
    "norm": "batch",
}
NORMS = ("batch", "group", "none")


def _get(cfg, key):
    value = cfg.get(key, DEFAULTS[key]) if cfg is not None else DEFAULTS[key]
    return DEFAULTS[key] if value is None and key != "norm" else value


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    return nn.Identity()


class ResidualBlock(nn.Module):
    """conv3x3(in->out) then h + [norm, LeakyReLU, conv3x3, norm, LeakyReLU](h)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm == "none")
        self.body = nn.Sequential(
            _norm(norm, out_channels),
            nn.LeakyReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=norm == "none"),
            _norm(norm, out_channels),
            nn.LeakyReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        return h + self.body(h)


class LinearAttention(nn.Module):
    """Linear (softmax-kernel) attention over all pixels, added back residually.

    Queries are softmax-normalised over feature channels, keys over positions, so the
    cost is linear in the number of pixels. (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        hidden = heads * head_dim
        self.to_qkv = nn.Conv2d(channels, 3 * hidden, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, channels, 1)
        self.out_norm = nn.GroupNorm(1, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (
            part.reshape(b, self.heads, self.head_dim, h * w) for part in self.to_qkv(x).chunk(3, dim=1)
        )
        q = q.softmax(dim=2) * self.head_dim**-0.5
        k = k.softmax(dim=3)
        context = torch.einsum("bhdn,bhen->bhde", k, v / (h * w))
        out = torch.einsum("bhde,bhdn->bhen", context, q).reshape(b, self.heads * self.head_dim, h, w)
        return x + self.out_norm(self.to_out(out))


class UNetRes(nn.Module):
    """Time-conditioned three-level UNet of report R3; forward(x, t) -> eps."""

    def __init__(self, in_channels, out_channels, channels, emb_dim, attention, heads, head_dim, norm):
        super().__init__()
        c0, c1, c2 = channels
        self.embed = SinusoidalEmbedding(emb_dim)
        self.t_in = nn.Linear(emb_dim, in_channels)
        self.block1 = ResidualBlock(in_channels, c0, norm)
        self.t1 = nn.Linear(emb_dim, c0)
        self.down1 = nn.Conv2d(c0, c0, 4, stride=2, padding=1)
        self.block2 = ResidualBlock(c0, c1, norm)
        self.t2 = nn.Linear(emb_dim, c1)
        self.down2 = nn.Conv2d(c1, c1, 4, stride=2, padding=1)
        self.block3 = ResidualBlock(c1, c2, norm)
        self.attention = LinearAttention(c2, heads, head_dim) if attention else nn.Identity()
        self.up1 = nn.ConvTranspose2d(c2, c2, 4, stride=2, padding=1)
        self.t3 = nn.Linear(emb_dim, c1 + c2)
        self.block4 = ResidualBlock(c1 + c2, c0, norm)
        self.up2 = nn.ConvTranspose2d(c0, c0, 4, stride=2, padding=1)
        self.t4 = nn.Linear(emb_dim, 2 * c0)
        self.block5 = ResidualBlock(2 * c0, c0, norm)
        self.out = nn.Conv2d(c0, out_channels, 1)

    @staticmethod
    def _add(h: torch.Tensor, proj: nn.Module, emb: torch.Tensor) -> torch.Tensor:
        return h + proj(emb)[:, :, None, None]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed(batch_timesteps(t, x.shape[0], x.device))
        h1 = self._add(self.block1(self._add(x, self.t_in, emb)), self.t1, emb)
        h2 = self._add(self.block2(self.down1(h1)), self.t2, emb)
        h3 = self.up1(self.attention(self.block3(self.down2(h2))))
        h4 = self.up2(self.block4(self._add(torch.cat([h2, h3], dim=1), self.t3, emb)))
        h5 = self.block5(self._add(torch.cat([h4, h1], dim=1), self.t4, emb))
        return self.out(h5)


def _validated(cfg):
    channels, emb_dim = list(_get(cfg, "channels")), _get(cfg, "emb_dim")
    check_three_levels_and_embedding(channels, emb_dim, "[c0, c1, c2]")
    attention = _get(cfg, "attention")
    require(isinstance(attention, bool), "backbone.attention", attention, "true or false")
    heads, head_dim = _get(cfg, "attention_heads"), _get(cfg, "attention_head_dim")
    require(isinstance(heads, int) and heads > 0, "backbone.attention_heads", heads, "a positive integer")
    require(isinstance(head_dim, int) and head_dim > 0,
            "backbone.attention_head_dim", head_dim, "a positive integer")
    norm = _get(cfg, "norm")
    require_choice("backbone.norm", norm, NORMS)
    return channels, emb_dim, attention, heads, head_dim, norm


def build(cfg, in_channels: int, out_channels: int) -> nn.Module:
    """Build the R3 UNet from the ``backbone`` config group."""
    return UNetRes(in_channels, out_channels, *_validated(cfg))


def size_requirement(cfg) -> tuple[int, int]:
    """Two stride-2 downsamplings: the side must be a multiple of 4 and at least 4."""
    _validated(cfg)
    return 4, 4
