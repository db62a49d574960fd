"""Report R4: DIP-preprocessed starting noise for a shorter DDPM reverse chain.

A DIP (the ``backbone`` group, R4's small skip hourglass skip_mnist) is fitted from a fixed
code to one noisy MNIST digit at ``method.dip.size`` (32). A DDPM (the ``eps_net`` group,
R4's unet_ln) is trained on the MNIST data (data=mnist). Sampling: x ~ N(0, I) at 32x32,
passed ``dip_passes`` times through the DIP (its BatchNorm in ``dip_bn_mode``), resized
to 28x28, then a chain of ``steps`` network calls: by default R4's ancestral steps
t = steps-1 .. 0 with sigma_t^2 = beta_t; ``method.sample`` picks another sampler (ddim)
or start (t_start, e.g. DDIM over the whole chain in the same number of calls).
dip_passes=0 is plain DDPM: x ~ N(0, I) drawn at 28x28 directly. With ``train_dip_passes`` > 0 (R4's
ablation) the eps-model itself sends its noisy input through the frozen DIP that many
times before the UNet, in training and in every sampling step.

Samples are (N, 1, 28, 28) in the data's value range; quality columns compare them on
the [0, 1] scale with real digits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dipddpm.data.mnist import load_mnist, to_tensor
from dipddpm.diffusion import sample, sample_options, validate_sample_config
from dipddpm.dip import make_code
from dipddpm.errors import require, require_choice
from dipddpm.methods import diffusion_common as common
from dipddpm.models import check_size
from dipddpm.runtime import model_device, synchronize

DATA_KINDS = ("mnist",)  # data groups this method accepts (checked by methods.require_data_kind)
SIDE = 28
BN_MODES = ("train", "eval")
DIP_OUTPUTS = ("raw", "symmetric")


def resize(images: torch.Tensor, side: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, side, side), bilinear (antialiased when shrinking)."""
    if images.shape[-1] == side and images.shape[-2] == side:
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False,
                         antialias=side < images.shape[-1])


class _BatchNormMode:
    """Within the block: the DIP's BatchNorm in train (batch statistics) or eval (running) mode."""

    def __init__(self, dip: nn.Module, mode: str):
        self.dip, self.mode, self.was_training = dip, mode, dip.training

    def __enter__(self):
        self.dip.train(self.mode == "train")

    def __exit__(self, *exc):
        self.dip.train(self.was_training)


def apply_dip(dip: nn.Module, x: torch.Tensor, passes: int, dip_size: int, side: int,
              bn_mode: str = "train", output: str = "raw") -> torch.Tensor:
    """x (N, 1, H, W) -> resize to dip_size, DIP ``passes`` times, resize to ``side``;
    ``output`` raw keeps the DIP's [0, 1] output, symmetric maps it to 2y - 1. No gradients."""
    with torch.no_grad(), _BatchNormMode(dip, bn_mode):
        y = resize(x, dip_size)
        for _ in range(passes):
            y = dip(y)
        y = resize(y, side)
    return y if output == "raw" else 2.0 * y - 1.0


class DipThenEps(nn.Module):
    """R4's "DIP inside training": eps(x_t, t) = eps_net(apply_dip(x_t), t) with a frozen DIP.

    x_t (B, 1, side, side) -> (B, 1, side, side). The DIP's BatchNorm stays in ``bn_mode``
    whatever mode the wrapper is put in.
    """

    def __init__(self, dip: nn.Module, eps_net: nn.Module, passes: int, dip_size: int, side: int, bn_mode: str):
        super().__init__()
        self.dip, self.eps_net = dip, eps_net
        self.passes, self.dip_size, self.side, self.bn_mode = passes, dip_size, side, bn_mode
        self.dip.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.dip.train(self.bn_mode == "train")
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.eps_net(apply_dip(self.dip, x, self.passes, self.dip_size, self.side, self.bn_mode), t)


@dataclass
class DipSample:
    """samples (N, 1, side, side); starts: x_{t_start} the chain began from; seconds: whole run
    (noise, DIP, resize, chain); dip_seconds / chain_seconds: its parts; model_calls: eps-net calls."""

    samples: torch.Tensor
    starts: torch.Tensor
    seconds: float
    dip_seconds: float
    chain_seconds: float
    model_calls: int


def sample_with_dip(model: nn.Module, schedule, count: int, steps: int, *, dip: nn.Module | None = None,
                    passes: int = 0, dip_size: int = 32, side: int = SIDE, bn_mode: str = "train",
                    output: str = "raw", t_start: int | None = None, generator: torch.Generator | None = None,
                    device=None, **sampler) -> DipSample:
    """``count`` samples from a chain of ``steps`` network calls from t_start (default
    steps-1: R4's truncated chain t = steps-1 .. 0); ``sampler``: the sampler keywords of
    dipddpm.diffusion.sample (sampler, eta, variance, noise_until, clip_x0; ancestral by default).

    passes = 0 (or no DIP): exactly sample(model, schedule, (count, 1, side, side),
    t_start=t_start, calls=steps, generator=generator, **sampler). passes > 0: x ~ N(0, I) of
    shape (count, 1, dip_size, dip_size) from ``generator``, apply_dip, then the same chain from it.
    """
    device = torch.device(device) if device is not None else model_device(model)
    t_start = steps - 1 if t_start is None else t_start
    synchronize(device)
    started = time.perf_counter()
    if passes > 0:
        if dip is None:
            raise ValueError("passes > 0 needs a DIP")
        noise = torch.randn((count, 1, dip_size, dip_size), generator=generator,
                            device=generator.device if generator is not None else device).to(device)
        start = apply_dip(dip, noise, passes, dip_size, side, bn_mode, output)
        synchronize(device)
        dip_seconds = time.perf_counter() - started
        chain = sample(model, schedule, start, t_start=t_start, calls=steps, generator=generator, device=device,
                       **sampler)
    else:
        start, dip_seconds = None, 0.0
        chain = sample(model, schedule, (count, 1, side, side), t_start=t_start, calls=steps, generator=generator,
                       device=device, **sampler)
    seconds = time.perf_counter() - started
    return DipSample(samples=chain.samples, starts=start, seconds=seconds, dip_seconds=dip_seconds,
                     chain_seconds=chain.seconds, model_calls=chain.model_calls)


def validate(cfg) -> None:
    m = cfg.method
    require(cfg.data.name == "mnist", "data", cfg.data.name,
            "mnist, e.g. experiment=dipnoise/time_vs_steps or data=mnist eps_net=unet_ln")
    common.validate_eps_net(cfg, SIDE)
    check_size(cfg.backbone, int(m.dip.size), key="method.dip.size")
    schedule = common.schedule_from(cfg)
    common.require_int("method.steps", m.steps, maximum=schedule.num_timesteps)
    if m.sample.t_start is not None:
        common.require_int("method.sample.t_start", m.sample.t_start, minimum=int(m.steps) - 1,
                           maximum=schedule.num_timesteps - 1)
    validate_sample_config(m.sample)
    common.require_int("method.dip_passes", m.dip_passes, minimum=0)
    common.require_int("method.train_dip_passes", m.train_dip_passes, minimum=0)
    require_choice("method.dip_bn_mode", m.dip_bn_mode, BN_MODES)
    require_choice("method.dip_output", m.dip_output, DIP_OUTPUTS)
    common.require_int("method.timing_starts", m.timing_starts, minimum=0)
    common.require_int("method.quality_reference", m.quality_reference, minimum=2)
    common.validate_dip_settings(m.dip, "method.dip")
    common.require_int("method.dip.index", m.dip.index, minimum=0)
    require(isinstance(m.dip.sigma, (int, float)) and 0 <= m.dip.sigma <= 1, "method.dip.sigma", m.dip.sigma,
            "a number in [0, 1]")
    common.require_int("method.dip.noise_seed", m.dip.noise_seed, minimum=0)
    common.require_positive("method.train.epochs", m.train.epochs)  # a fraction after a profile
    common.require_int("method.train.min_iterations", m.train.min_iterations)
    common.require_int("method.train.batch_size", m.train.batch_size)
    common.require_positive("method.train.lr", m.train.lr)
    common.require_int("method.train.seed", m.train.seed, minimum=0)
    common.validate_num_samples(cfg.profile)
    images, _ = load_mnist(cfg.data.get("root"), cfg.data.get("split", "train"), cfg.data.get("limit"))
    require(images.shape[-1] == SIDE, "data.root", cfg.data.get("root"), f"{SIDE}x{SIDE} digits")
    if _uses_dip(cfg):
        common.noisy_digit(m.dip.index, cfg.data.get("root"), "train", m.dip.sigma, True, m.dip.noise_seed,
                           side=int(m.dip.size))


def _uses_dip(cfg) -> bool:
    return cfg.method.dip_passes > 0 or cfg.method.train_dip_passes > 0


def clean_image_uses(cfg) -> list[str]:
    """None: the DDPM learns the digit distribution from the training split and the samples
    are scored against real digits; no single clean image steers the run."""
    return []


def _training_images(cfg) -> torch.Tensor:
    d = cfg.data
    images, _ = load_mnist(d.get("root"), d.get("split", "train"), d.get("limit"))
    return to_tensor(images, d.get("value_range", "symmetric"))


def _plan(cfg, count: int) -> dict:
    """Run sizes from a config after apply_profile (which scaled steps, dip.steps and train.epochs)."""
    m = cfg.method
    calls = int(m.steps)
    return {
        "dip_steps": int(m.dip.steps) if _uses_dip(cfg) else 0,
        "train_iterations": common.epoch_iterations(m.train.epochs, count, int(m.train.batch_size),
                                                    int(m.train.min_iterations)),
        "chain_steps": calls,
        "t_start": calls - 1 if m.sample.t_start is None else int(m.sample.t_start),
        "sampler": str(m.sample.sampler),
        "dip_passes": int(m.dip_passes),
        "train_dip_passes": int(m.train_dip_passes),
        "num_samples": int(cfg.profile.num_samples),
        "training_images": count,
    }


def describe(cfg):
    plan = _plan(cfg, len(_training_images(cfg)))
    text = (f"DIP {plan['dip_steps']} steps; DDPM {plan['train_iterations']} iterations on "
            f"{plan['training_images']} digits (DIP inside the eps-model: {plan['train_dip_passes']} passes); "
            f"{plan['num_samples']} samples: {plan['dip_passes']} DIP passes on the noise, "
            f"then {plan['chain_steps']} {plan['sampler']} steps from t = {plan['t_start']}")
    return text, plan


def _fit_dip(ctx):
    cfg, device, m = ctx.cfg, ctx.device, ctx.cfg.method
    size = int(m.dip.size)
    clean, noisy = (x.to(device) for x in common.noisy_digit(
        m.dip.index, cfg.data.get("root"), "train", m.dip.sigma, True, m.dip.noise_seed, side=size))
    code = make_code(1, size, m.dip.code_kind, float(m.dip.code_scale),
                     common.seeded_generator(device, int(m.dip.seed), offset=1), device)
    identity = {"target": {"root": cfg.data.get("root")}, "net": common.plain(cfg.backbone)}
    build = common.build_seeded(cfg.backbone, 1, 1, int(m.dip.seed), device)
    return common.fit_dip_cached(ctx, identity, build, code, noisy, m.dip, clean=clean)


def run(ctx) -> dict:
    started = time.perf_counter()
    cfg, device, m = ctx.cfg, ctx.device, ctx.cfg.method
    images = _training_images(cfg)
    plan = _plan(cfg, len(images))
    schedule = common.schedule_from(cfg)
    value_range = cfg.data.get("value_range", "symmetric")
    metrics: dict = {}
    dip, dip_key = None, None
    if _uses_dip(cfg):
        fitted = _fit_dip(ctx)
        dip, dip_key = fitted.model, fitted.key
        metrics.update(dip_trained_now=fitted.trained_now, dip_steps=plan["dip_steps"],
                       dip_psnr=fitted.info.get("psnr_final"), dip_seconds=fitted.info.get("dip_seconds"))

    build_unet = common.build_seeded(cfg.eps_net, 1, 1, int(m.train.seed), device)
    identity = {"data": {k: cfg.data.get(k) for k in ("root", "split", "limit", "value_range")},
                "dip_in_model": None}
    build = build_unet
    if m.train_dip_passes > 0:
        identity["dip_in_model"] = {"passes": int(m.train_dip_passes), "bn_mode": str(m.dip_bn_mode),
                                    "dip": dip_key, "size": int(m.dip.size)}

        def build():
            frozen = common.build_seeded(cfg.backbone, 1, 1, int(m.dip.seed), device)()
            frozen.load_state_dict(dip.state_dict())
            return DipThenEps(frozen, build_unet(), int(m.train_dip_passes), int(m.dip.size), SIDE,
                              str(m.dip_bn_mode))

    trained = common.train_eps_cached(
        ctx, identity, build, images, schedule, iterations=plan["train_iterations"],
        batch_size=int(m.train.batch_size), lr=float(m.train.lr), seed=int(m.train.seed))
    model = trained.model.to(device)

    def sample(count: int, offset: int) -> DipSample:
        return sample_with_dip(model, schedule, count, plan["chain_steps"], dip=dip, passes=int(m.dip_passes),
                               dip_size=int(m.dip.size), bn_mode=str(m.dip_bn_mode), output=str(m.dip_output),
                               t_start=plan["t_start"], generator=ctx.generator(offset), device=device,
                               **sample_options(m.sample))

    batch = sample(plan["num_samples"], 10)
    timings = [sample(1, 11 + i) for i in range(int(m.timing_starts))]
    samples = common.to_unit(batch.samples, value_range)
    quality = common.digit_quality_columns(ctx, samples, cfg.data.get("root"), int(m.quality_reference))
    if timings:
        one = sum(t.seconds for t in timings) / len(timings)
        chain = sum(t.chain_seconds for t in timings) / len(timings)
        metrics.update(sample_seconds=one, ms_per_step=1000.0 * chain / plan["chain_steps"],
                       start_dip_seconds=sum(t.dip_seconds for t in timings) / len(timings))
    metrics.update(
        **quality,
        batch_seconds=batch.seconds, model_calls=batch.model_calls, chain_steps=plan["chain_steps"],
        num_samples=plan["num_samples"], ddpm_trained_now=trained.trained_now,
        train_iterations=plan["train_iterations"], train_loss_final=trained.info.get("loss_final"),
        train_seconds=trained.info.get("train_seconds"), wall_seconds=time.perf_counter() - started,
    )

    out = ctx.run_dir
    common.save_sample_grid(out / "samples.png", samples)
    if batch.starts is not None:
        shown = batch.starts if m.dip_output == "raw" else common.to_unit(batch.starts, "symmetric")
        common.save_sample_grid(out / "starts.png", shown)
    return metrics
