"""Report R5's DIP noise: outputs of a fitted DIP used as diffusion noise (dipddpm.methods.ddpm_dataset).

``DipNoise`` draws d = map(DIP(z')) for fresh codes z'; ``training_hooks`` turns it into
train_eps's forward_noise / loss_target for a dip_mode, ``sampling_noise_fn`` into the
sampler's noise_fn. Images are (B, C, 32, 32).
"""

from __future__ import annotations

import torch
from torch import nn

from dipddpm.data.cifar import SIDE
from dipddpm.dip import make_code

NOISE_DRAWS = ("bank", "per_batch")
OUTPUT_MAPS = ("standardize", "symmetric", "raw")

def map_output(d: torch.Tensor, output_map: str) -> torch.Tensor:
    """DIP outputs (B, C, H, W) in [0, 1] -> the noise scale: standardize (per image zero mean,
    unit std), symmetric (2 d - 1) or raw (d)."""
    if output_map == "standardize":
        flat = d.flatten(1)
        mean = flat.mean(1).reshape(-1, 1, 1, 1)
        std = flat.std(1).clamp_min(1e-6).reshape(-1, 1, 1, 1)
        return (d - mean) / std
    if output_map == "symmetric":
        return 2.0 * d - 1.0
    return d


class DipNoise:
    """Draws of d = map(DIP(z')) for fresh codes z' ~ code_kind * code_scale, shaped (B, C, H, W).

    The DIP runs under no_grad, one code at a time, with BatchNorm in training mode (batch
    statistics of that one image, as during the fit). ``draw="bank"`` precomputes
    ``bank_size`` outputs from ``generator`` and gives each sample a random one of them;
    ``draw="per_batch"`` runs one fresh code per call and repeats it over the batch.
    """

    def __init__(self, net: nn.Module, code_channels: int, code_kind: str, code_scale: float, draw: str,
                 bank_size: int, output_map: str, generator: torch.Generator, device):
        self.net, self.device = net, torch.device(device)
        self.code_channels, self.code_kind, self.code_scale = code_channels, code_kind, code_scale
        self.draw_mode, self.output_map = draw, output_map
        self.bank = self.fresh(bank_size, generator) if draw == "bank" else None

    @classmethod
    def from_config(cls, net: nn.Module, dip, noise, generator: torch.Generator, device) -> "DipNoise":
        """From a method's ``dip`` (code_channels, code_kind, code_scale) and ``noise`` (draw,
        bank_size, output_map) configs; ``generator`` fills the bank."""
        return cls(net, int(dip.code_channels), str(dip.code_kind), float(dip.code_scale), str(noise.draw),
                   int(noise.bank_size), str(noise.output_map), generator, device)

    @torch.no_grad()
    def fresh(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` mapped outputs for fresh codes: (count, C, H, W)."""
        self.net.train()
        outputs = []
        for _ in range(int(count)):
            code = make_code(self.code_channels, SIDE, self.code_kind, self.code_scale, generator, self.device)
            outputs.append(self.net(code))
        return map_output(torch.cat(outputs), self.output_map)

    def draw(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(batch, C, H, W) noise on the device."""
        if self.bank is None:
            return self.fresh(1, generator).expand(batch, -1, -1, -1).contiguous()
        index = torch.randint(0, len(self.bank), (batch,), generator=generator, device=generator.device)
        return self.bank[index.to(self.bank.device)]


class ForwardNoise:
    """train_eps's forward_noise: N(0, I) from ``generator`` (dip_mode none | target) or a
    DipNoise draw (replace_noise), shaped like x0 (B, C, H, W).

    ``on_iteration(i)`` (optional) is called before the noise of 0-based iteration i is
    drawn, i.e. after i optimiser steps; train_eps has no per-iteration hook of its own.
    """

    def __init__(self, mode: str, dip_noise: DipNoise | None, generator: torch.Generator, on_iteration=None):
        self.mode, self.dip_noise, self.generator, self.on_iteration = mode, dip_noise, generator, on_iteration
        self.calls = 0

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if self.on_iteration is not None:
            self.on_iteration(self.calls)
        self.calls += 1
        if self.mode == "replace_noise":
            return self.dip_noise.draw(x0.shape[0], self.generator).to(x0.device)
        return torch.randn(x0.shape, generator=self.generator, device=self.generator.device).to(x0.device)


def training_hooks(mode: str, dip_noise: DipNoise | None, generator: torch.Generator, on_iteration=None):
    """(forward_noise, loss_target) for train_eps: replace_noise puts d in x_t (and so in the
    target, loss_target None); target keeps Gaussian x_t and returns d as the target.

    The targets of ``target`` come from a second generator (seeded initial_seed + 1), so the
    Gaussian draws, and hence x_t, are the same as those of ``none`` with the same generator.
    """
    forward_noise = ForwardNoise(mode, dip_noise, generator, on_iteration)
    loss_target = None
    if mode == "target":
        target_generator = torch.Generator(device=generator.device).manual_seed(generator.initial_seed() + 1)

        def loss_target(noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
            return dip_noise.draw(x0.shape[0], target_generator).to(x0.device)
    return forward_noise, loss_target


def sampling_noise_fn(mode: str, dip_noise: DipNoise | None, generator: torch.Generator):
    """The sampler's noise_fn: DIP draws for replace_noise (x_T and every z), else None (Gaussian)."""
    if mode != "replace_noise":
        return None
    return lambda shape: dip_noise.draw(shape[0], generator)
