"""Sinusoidal time embedding shared by the time-conditioned eps-nets.

For an integer timestep ``t`` and an even dimension ``d`` with ``h = d // 2``,
frequency ``k`` is ``w_k = max_period ** (-k / h)`` (k = 0..h-1) and the embedding is
``[sin(t * w_0), ..., sin(t * w_{h-1}), cos(t * w_0), ..., cos(t * w_{h-1})]``.
The embedding has no parameters, so it behaves like a frozen lookup table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dipddpm.errors import require


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Embed timesteps ``t`` (B,) into a float32 tensor (B, dim); ``dim`` must be even."""
    if dim % 2 != 0 or dim < 2:
        raise ValueError(f"embedding dim must be a positive even number, got {dim}")
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    angles = t.reshape(-1).to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class SinusoidalEmbedding(nn.Module):
    """Module form of :func:`sinusoidal_embedding`: (B,) integer t -> (B, dim) float."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        if dim % 2 != 0 or dim < 2:
            raise ValueError(f"embedding dim must be a positive even number, got {dim}")
        self.dim = dim
        self.max_period = max_period

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(t, self.dim, self.max_period)


def batch_timesteps(t, batch: int, device=None) -> torch.Tensor:
    """Return timesteps as a LongTensor (batch,): a scalar or one-element t is repeated."""
    t = torch.as_tensor(t, device=device).reshape(-1).long()
    if t.numel() == 1 and batch != 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"got {t.numel()} timesteps for a batch of {batch}")
    return t


def check_three_levels_and_embedding(channels, emb_dim, names: str) -> None:
    """Shared config check of the three-level eps-nets: ``backbone.channels`` is three
    positive integers (``names`` says which, e.g. "[c1, c2, c3]") and
    ``backbone.emb_dim`` a positive even integer. Raises ConfigError naming the key."""
    require(
        len(channels) == 3 and all(isinstance(c, int) and c > 0 for c in channels),
        "backbone.channels", channels, f"three positive integers {names}",
    )
    require(isinstance(emb_dim, int) and emb_dim >= 2 and emb_dim % 2 == 0,
            "backbone.emb_dim", emb_dim, "a positive even integer")
