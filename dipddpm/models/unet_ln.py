"""Report R4's time-conditioned UNet with LayerNorm conv blocks (family ``unet_ln``).

Levels at sides ``s``, ``s/2``, ``s/4`` (28, 14, 7 for MNIST) with channels
``channels = [c1, c2, c3]`` (10, 20, 40), each made of three blocks
``LayerNorm((C, H, W)) -> conv3x3 -> SiLU -> conv3x3 -> SiLU``, plus a bottleneck at
about ``s/8``. The timestep goes through a fixed (parameter-free) sinusoidal embedding
of dim ``emb_dim`` (100); every level has its own MLP ``Linear -> SiLU -> Linear`` of
that embedding, added to the level's input as a per-channel bias.

The LayerNorm has one affine weight per element, so the network is built for one side,
``image_size``; forward raises ConfigError for another side.
Input x: (B, in_channels, s, s); t: (B,) integer timesteps. Output (B, out_channels, s, s).
"""

from __future__ import annotations

import torch
from torch import nn

from dipddpm.errors import ConfigError, require
from dipddpm.models.embeddings import SinusoidalEmbedding, batch_timesteps, check_three_levels_and_embedding

DEFAULTS = {"channels": [10, 20, 40], "emb_dim": 100, "image_size": 28}


def _get(cfg, key):
    value = cfg.get(key, DEFAULTS[key]) if cfg is not None else DEFAULTS[key]
    return DEFAULTS[key] if value is None else value


class LNBlock(nn.Module):
    """LayerNorm over (C, H, W) (optional), conv3x3, SiLU, conv3x3, SiLU."""

    def __init__(self, shape, in_channels: int, out_channels: int, normalize: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(list(shape)) if normalize else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(self.norm(x)))))


def _mlp(emb_dim: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(emb_dim, out), nn.SiLU(), nn.Linear(out, out))


def _level(side: int, widths) -> nn.Sequential:
    """Three LNBlocks through widths [w_in, w1, w2, w3] at a fixed side."""
    return nn.Sequential(*(LNBlock((widths[i], side, side), widths[i], widths[i + 1]) for i in range(3)))


def _bottleneck_resampling(side: int, c: int):
    """(down, up, side_mid): R4's kernel-2 + stride-2 pair for an odd side >= 3, else an equivalent."""
    if side == 1:
        down = [nn.Conv2d(c, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1)]
        up = [nn.ConvTranspose2d(c, c, 3, padding=1), nn.SiLU(), nn.ConvTranspose2d(c, c, 3, padding=1)]
        return nn.Sequential(*down), nn.Sequential(*up), 1
    if side % 2 == 1:
        down = [nn.Conv2d(c, c, 2, 1), nn.SiLU(), nn.Conv2d(c, c, 4, 2, 1)]
        up = [nn.ConvTranspose2d(c, c, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(c, c, 2, 1)]
        return nn.Sequential(*down), nn.Sequential(*up), (side - 1) // 2
    down = [nn.Conv2d(c, c, 3, 1, 1), nn.SiLU(), nn.Conv2d(c, c, 4, 2, 1)]
    up = [nn.ConvTranspose2d(c, c, 4, 2, 1), nn.SiLU(), nn.ConvTranspose2d(c, c, 3, 1, 1)]
    return nn.Sequential(*down), nn.Sequential(*up), side // 2


class UNetLN(nn.Module):
    """forward(x (B, C_in, s, s), t (B,)) -> (B, C_out, s, s)."""

    def __init__(self, in_channels: int, out_channels: int, channels, emb_dim: int, image_size: int):
        super().__init__()
        c1, c2, c3 = channels
        s1, s2, s3 = image_size, image_size // 2, image_size // 4
        self.image_size = image_size
        self.embed = SinusoidalEmbedding(emb_dim)
        self.te1, self.b1 = _mlp(emb_dim, in_channels), _level(s1, [in_channels, c1, c1, c1])
        self.down1 = nn.Conv2d(c1, c1, 4, 2, 1)
        self.te2, self.b2 = _mlp(emb_dim, c1), _level(s2, [c1, c2, c2, c2])
        self.down2 = nn.Conv2d(c2, c2, 4, 2, 1)
        self.te3, self.b3 = _mlp(emb_dim, c2), _level(s3, [c2, c3, c3, c3])
        self.down3, self.up1, s4 = _bottleneck_resampling(s3, c3)
        self.te_mid, self.b_mid = _mlp(emb_dim, c3), _level(s4, [c3, c2, c2, c3])
        self.te4, self.b4 = _mlp(emb_dim, 2 * c3), _level(s3, [2 * c3, c3, c2, c2])
        self.up2 = nn.ConvTranspose2d(c2, c2, 4, 2, 1)
        self.te5, self.b5 = _mlp(emb_dim, 2 * c2), _level(s2, [2 * c2, c2, c1, c1])
        self.up3 = nn.ConvTranspose2d(c1, c1, 4, 2, 1)
        self.te_out = _mlp(emb_dim, 2 * c1)
        self.b_out = nn.Sequential(
            LNBlock((2 * c1, s1, s1), 2 * c1, c1),
            LNBlock((c1, s1, s1), c1, c1),
            LNBlock((c1, s1, s1), c1, c1, normalize=False),
        )
        self.conv_out = nn.Conv2d(c1, out_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ConfigError("backbone.image_size", self.image_size,
                              f"equal to the input side (got input {tuple(x.shape[-2:])})")
        emb = self.embed(batch_timesteps(t, x.shape[0], x.device))

        def bias(mlp):
            return mlp(emb)[:, :, None, None]

        out1 = self.b1(x + bias(self.te1))
        out2 = self.b2(self.down1(out1) + bias(self.te2))
        out3 = self.b3(self.down2(out2) + bias(self.te3))
        mid = self.b_mid(self.down3(out3) + bias(self.te_mid))
        out4 = self.b4(torch.cat([out3, self.up1(mid)], dim=1) + bias(self.te4))
        out5 = self.b5(torch.cat([out2, self.up2(out4)], dim=1) + bias(self.te5))
        out = self.b_out(torch.cat([out1, self.up3(out5)], dim=1) + bias(self.te_out))
        return self.conv_out(out)


def _validated(cfg):
    channels, emb_dim = list(_get(cfg, "channels")), _get(cfg, "emb_dim")
    check_three_levels_and_embedding(channels, emb_dim, "[c1, c2, c3]")
    size = _get(cfg, "image_size")
    require(isinstance(size, int) and size >= 4 and size % 4 == 0,
            "backbone.image_size", size, "a multiple of 4, at least 4 (the data side, 28 for MNIST)")
    return channels, emb_dim, size


def build(cfg, in_channels: int, out_channels: int) -> nn.Module:
    """Build the R4 UNet from the ``backbone`` config group."""
    return UNetLN(in_channels, out_channels, *_validated(cfg))


def size_requirement(cfg) -> tuple[int, int]:
    """Two stride-2 downsamplings: a multiple of 4, at least 4 (and equal to ``image_size``)."""
    _validated(cfg)
    return 4, 4
