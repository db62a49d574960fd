"""Report R5: a DIP output inside DDPM training on a 32x32 colour set.

A DDPM (the ``backbone`` group, an eps-net such as unet_wide) is trained on the ``data``
set (cifar10 or the offline patches32; images (N, 3, 32, 32) in [-1, 1], random
horizontal flips). ``method.dip_mode`` says where a DIP output enters:

- ``none``: pure DDPM. x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, eps ~ N(0, I), target eps.
- ``replace_noise`` (idea 1): a DIP output d replaces eps in the forward process, is
  therefore the loss target, and replaces the Gaussian draws of sampling (x_T and every
  per-step z, through ancestral_sample's noise_fn).
- ``target`` (idea 2): Gaussian x_t as in ``none``; d is the loss target.

The DIP is the skip hourglass (``method.dip_backbone``) fitted through fit_dip from a fixed
code to one noisy training image (sigma 25/255 on the [0, 1] scale). A draw of d runs the
fitted DIP on fresh codes (same kind and scale as the fitted one) with its BatchNorm in
training mode on one image at a time (as it was fitted), and maps the [0, 1] output to the
noise scale (``noise.output_map``: standardize = zero mean, unit std per image, the
moments of N(0, I); symmetric = 2 d - 1; raw = d, as R5). ``noise.draw``: bank = each
sample picks one of ``bank_size`` precomputed outputs; per_batch = one fresh code per call,
shared by the whole batch (R5's ``repeat(batch_size)``).

The Gaussian eps of ``none`` and ``target`` comes from the same seeded generator, so with
one seed the two runs see the same x_t and differ only in the loss target.

Evaluation: a sample grid every ``eval.grid_every_epochs`` epochs (drawn inside training,
stored beside the cached weights), ``profile.num_samples`` samples from the ancestral chain
(respaced to ``sample.steps`` steps when shorter than T), the RMSE of the predicted x0 per
step against a reference image (rd_curve.csv / rd_curve.png), and a Frechet distance of
encoder features to the held-out split (dipddpm.patch_metrics).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import math
import time

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from dipddpm import patch_metrics
from dipddpm.data import cifar
from dipddpm.data.images import add_gaussian_noise
from dipddpm.diffusion import ancestral_sample
from dipddpm.diffusion.sampling import VARIANCES
from dipddpm.diffusion.training import LR_SCHEDULES
from dipddpm.errors import ConfigError, require, require_choice
from dipddpm.io import save_figure_atomic, save_image_atomic, write_bytes_atomic, write_text_atomic
from dipddpm.methods import diffusion_common as common
from dipddpm.metrics import psnr
from dipddpm.models import backbone_for_profile, check_size
from dipddpm.schedulers import NoiseSchedule

log = logging.getLogger("dipddpm")

DIP_MODES = ("none", "replace_noise", "target")
NOISE_DRAWS = ("bank", "per_batch")
OUTPUT_MAPS = ("standardize", "symmetric", "raw")
REFERENCES = ("train_image", "nearest")
DEFAULT_DIP_STEPS = {"replace_noise": 5, "target": 1000}
SIDE = cifar.SIDE


# ---------------------------------------------------------------- configuration


def effective_config(cfg):
    """A copy of ``cfg`` with the profile's presets applied: ``backbone.at_profile[profile.name]``
    merged over the backbone (models.backbone_for_profile) and ``method.at_profile[profile.name]``
    over the method (e.g. a larger learning rate for the short quick runs). A preset key
    that the group does not have is a ConfigError."""
    name = cfg.profile.get("name")
    method = common.plain(cfg.method)
    presets = method.pop("at_profile", None) or {}
    require(isinstance(presets, dict), "method.at_profile", presets, "a mapping from profile name to method keys")
    base = OmegaConf.create(method)
    OmegaConf.set_struct(base, True)
    try:
        merged = OmegaConf.merge(base, presets.get(name) or {})
    except OmegaConfBaseException as error:  # an unknown key or a wrong type in the preset
        raise ConfigError(f"method.at_profile.{name}", presets.get(name),
                          f"keys of the method config ({error})") from None
    OmegaConf.set_struct(merged, False)
    backbone = cfg.backbone
    if backbone.get("at_profile") is not None:
        backbone = backbone_for_profile(backbone, name)
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.method = merged
        out.backbone = OmegaConf.create(common.plain(backbone))
    return out


def _flag(key: str, value) -> bool:
    require(isinstance(value, bool), key, value, "true or false")
    return value


def validate(cfg) -> None:
    cfg = effective_config(cfg)
    m = cfg.method
    cifar.validate_data_config(cfg.data)
    common.validate_eps_backbone(cfg, SIDE)
    require_choice("method.dip_mode", m.dip_mode, DIP_MODES)
    schedule = common.schedule_from(cfg)
    if m.dip_mode != "none":
        check_size(m.dip_backbone, SIDE, key="method.dip_backbone")
        if m.dip.steps is not None:
            common.require_int("method.dip.steps", m.dip.steps)
        common.require_int("method.dip.min_steps", m.dip.min_steps)
        common.validate_dip_settings(OmegaConf.merge(m.dip, {"steps": 1}), "method.dip")
        common.require_int("method.dip.code_channels", m.dip.code_channels)
        require(isinstance(m.dip.sigma, (int, float)) and 0 <= m.dip.sigma <= 1, "method.dip.sigma", m.dip.sigma,
                "a number in [0, 1] (noise std on the [0, 1] scale)")
        _flag("method.dip.clip", m.dip.clip)
        common.require_int("method.dip.noise_seed", m.dip.noise_seed, minimum=0)
        require_choice("method.noise.draw", m.noise.draw, NOISE_DRAWS)
        common.require_int("method.noise.bank_size", m.noise.bank_size)
        require_choice("method.noise.output_map", m.noise.output_map, OUTPUT_MAPS)
    t = m.train
    common.require_int("method.train.epochs", t.epochs)
    common.require_int("method.train.min_iterations", t.min_iterations)
    common.require_int("method.train.batch_size", t.batch_size)
    common.require_positive("method.train.lr", t.lr)
    require_choice("method.train.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    if t.grad_clip is not None:
        common.require_positive("method.train.grad_clip", t.grad_clip)
    require(t.ema_decay is None or (isinstance(t.ema_decay, float) and 0 <= t.ema_decay < 1),
            "method.train.ema_decay", t.ema_decay, "null or a number in [0, 1)")
    _flag("method.train.flip", t.flip)
    common.require_int("method.train.seed", t.seed, minimum=0)
    if m.sample.steps is not None:
        common.require_int("method.sample.steps", m.sample.steps, maximum=schedule.num_timesteps)
    require_choice("method.sample.variance", m.sample.variance, VARIANCES)
    _flag("method.sample.clip_x0", m.sample.clip_x0)
    e = m.eval
    if e.grid_every_epochs is not None:
        common.require_int("method.eval.grid_every_epochs", e.grid_every_epochs)
    common.require_int("method.eval.grid_samples", e.grid_samples)
    common.require_int("method.eval.rd_samples", e.rd_samples)
    require_choice("method.eval.reference", e.reference, REFERENCES)
    common.require_int("method.quality.encoder_epochs", m.quality.encoder_epochs)
    common.require_int("method.quality.reference_count", m.quality.reference_count, minimum=2)
    common.validate_num_samples(cfg.profile)
    count = len(cifar.load_dataset(cfg.data, "train"))
    common.require_int("method.eval.reference_index", e.reference_index, minimum=0, maximum=count - 1)
    if m.dip_mode != "none":
        common.require_int("method.dip.image_index", m.dip.image_index, minimum=0, maximum=count - 1)


def clean_image_uses(cfg) -> list[str]:
    return []


def dip_steps(cfg) -> int:
    """The DIP's fitting steps: method.dip.steps (null: R5's 5 for replace_noise, 1000 for
    target) times the profile's step_scale, but at least min(steps, method.dip.min_steps), so a
    profile shortens a long fit and leaves a short one (idea 1's 5 steps) as it is; 0 for none."""
    m = cfg.method
    if m.dip_mode == "none":
        return 0
    steps = int(m.dip.steps) if m.dip.steps is not None else DEFAULT_DIP_STEPS[m.dip_mode]
    return min(steps, max(common.profile_steps(cfg.profile, steps), int(m.dip.min_steps)))


def plan(cfg, train_count: int | None = None) -> dict:
    """Run sizes after the profile: iterations, epochs, chain length, grid epochs."""
    cfg = effective_config(cfg)
    m = cfg.method
    schedule = common.schedule_from(cfg)
    count = train_count if train_count is not None else len(cifar.load_dataset(cfg.data, "train"))
    batch = int(m.train.batch_size)
    per_epoch = math.ceil(count / batch)
    iterations = common.epoch_iterations(cfg.profile, int(m.train.epochs), count, batch, int(m.train.min_iterations))
    T = schedule.num_timesteps
    chain = int(m.sample.steps) if m.sample.steps is not None else min(T, common.profile_steps(cfg.profile, T))
    every = m.eval.grid_every_epochs
    grid_iterations = []
    if every is not None:
        grid_iterations = list(range(int(every) * per_epoch, iterations, int(every) * per_epoch))
    return {
        "dip_mode": str(m.dip_mode), "dip_steps": dip_steps(cfg), "num_timesteps": T,
        "train_images": count, "iterations_per_epoch": per_epoch, "train_iterations": iterations,
        "epochs": iterations / per_epoch, "grid_iterations": grid_iterations, "chain_steps": chain,
        "num_samples": int(cfg.profile.num_samples), "lr": float(m.train.lr),
    }


def describe(cfg):
    p = plan(cfg)
    where = {"none": "nowhere (pure DDPM)", "replace_noise": "forward/sampling noise and loss target (idea 1)",
             "target": "loss target only (idea 2)"}[p["dip_mode"]]
    text = (f"DIP output in: {where}; DIP {p['dip_steps']} steps. DDPM T={p['num_timesteps']} on "
            f"{p['train_images']} images: {p['train_iterations']} iterations "
            f"({p['epochs']:.3g} epochs, lr {p['lr']:g}), "
            f"grids after iterations {p['grid_iterations']}; {p['num_samples']} samples over "
            f"{p['chain_steps']} reverse steps")
    return text, p


# ---------------------------------------------------------------- DIP noise


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

    @torch.no_grad()
    def fresh(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` mapped outputs for fresh codes: (count, C, H, W)."""
        self.net.train()
        outputs = []
        for _ in range(int(count)):
            code = common.make_code(self.code_channels, SIDE, self.code_kind, self.code_scale, generator, self.device)
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
    """ancestral_sample's noise_fn: DIP draws for replace_noise (x_T and every z), else None (Gaussian)."""
    if mode != "replace_noise":
        return None
    return lambda shape: dip_noise.draw(shape[0], generator)


# ---------------------------------------------------------------- sampling


class Respaced(nn.Module):
    """An eps-net on a respaced chain: step index i of the short chain is timestep timesteps[i].
    The last output is kept in ``last_eps`` (for the unclipped x0 of the rate-distortion curve)."""

    def __init__(self, model: nn.Module, timesteps):
        super().__init__()
        self.model = model
        self.register_buffer("timesteps", torch.as_tensor(list(timesteps), dtype=torch.long))
        self.last_eps = None

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.last_eps = self.model(x, self.timesteps.to(t.device)[t.long()])
        return self.last_eps


def respaced_chain(schedule: NoiseSchedule, steps: int) -> tuple[NoiseSchedule, list[int]]:
    """(schedule, timesteps) of a DDPM chain over ``steps`` evenly spaced timesteps from 0 to T-1
    (Nichol & Dhariwal's respacing: abar is kept, beta_i = 1 - abar[s_i] / abar[s_{i-1}])."""
    T = schedule.num_timesteps
    timesteps = sorted({int(v) for v in np.round(np.linspace(0, T - 1, int(steps)))})
    abar = schedule.alphas_cumprod.cpu()[torch.as_tensor(timesteps)]
    previous = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
    return NoiseSchedule(1.0 - abar / previous), timesteps


class Sampler:
    """Ancestral sampling of (count, 3, 32, 32) images on the configured chain (all T steps, or
    ``chain_steps`` respaced ones).

    ``callback(t, x_t, x0)`` gets the original timestep and the network's x0 prediction
    (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) before any clipping (sample.clip_x0 only
    changes the chain itself).
    """

    def __init__(self, cfg, schedule: NoiseSchedule, chain_steps: int, mode: str, dip_noise, device):
        self.schedule, self.timesteps = respaced_chain(schedule, min(chain_steps, schedule.num_timesteps))
        self.abar = self.schedule.alphas_cumprod.tolist()
        self.mode, self.dip_noise, self.device = mode, dip_noise, device
        self.variance, self.clip = str(cfg.method.sample.variance), bool(cfg.method.sample.clip_x0)

    def __call__(self, model: nn.Module, count: int, seed_generator: torch.Generator, callback=None):
        net = Respaced(model, self.timesteps)
        wrapped = None
        if callback is not None:
            def wrapped(i: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
                raw = (x_t - (1.0 - self.abar[i]) ** 0.5 * net.last_eps) / self.abar[i] ** 0.5
                callback(self.timesteps[i], x_t, raw)
        return ancestral_sample(net, self.schedule, (count, 3, SIDE, SIDE), variance=self.variance,
                                generator=seed_generator, device=self.device,
                                noise_fn=sampling_noise_fn(self.mode, self.dip_noise, seed_generator),
                                clip_x0=self.clip, callback=wrapped)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> [0, 1] (clipped)."""
    return ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0, 1)


# ---------------------------------------------------------------- rate-distortion


def rd_rows(timesteps: list[int], x0_preds: torch.Tensor, references: dict[str, torch.Tensor],
            chosen: str) -> list[dict]:
    """Per visited step (chain order, t descending): t, step, rmse (the ``chosen`` reference) and
    rmse_<name> for every reference. x0_preds (S, R, C, H, W), references (R, C, H, W); RMSE on
    the [-1, 1] scale, averaged over the R tracked samples."""
    per_ref = {name: torch.sqrt(((x0_preds - ref[None]) ** 2).flatten(2).mean(2)).mean(1).tolist()
               for name, ref in references.items()}
    rows = []
    for i, t in enumerate(timesteps):
        row = {"t": t, "step": i + 1, "rmse": per_ref[chosen][i]}
        row.update({f"rmse_{name}": values[i] for name, values in per_ref.items()})
        rows.append(row)
    return rows


def nearest_images(samples: torch.Tensor, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """For each sample (R, C, H, W), the image of ``images`` (N, C, H, W) with the smallest L2 distance."""
    flat = samples.flatten(1).double()
    best_d = torch.full((len(samples),), math.inf, dtype=torch.float64)
    best_i = torch.zeros(len(samples), dtype=torch.long)
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch].flatten(1).double()
        distance = torch.cdist(flat, chunk)
        value, index = distance.min(1)
        better = value < best_d
        best_d = torch.where(better, value, best_d)
        best_i = torch.where(better, index + start, best_i)
    return images[best_i]


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_rd_plot(path, rows: list[dict], chosen: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    for name in [k[len("rmse_"):] for k in rows[0] if k.startswith("rmse_")]:
        axis.plot(steps, [r[f"rmse_{name}"] for r in rows], label=f"vs {name.replace('_', ' ')}",
                  linestyle="-" if name == chosen else "--")
    axis.set_xlabel(f"reverse steps taken (t = {rows[0]['t']} .. {rows[-1]['t']})")
    axis.set_ylabel("RMSE of predicted x0 ([-1, 1] scale)")
    axis.set_yscale("log")
    axis.legend()
    axis.set_title(title)
    save_figure_atomic(path, figure)


# ---------------------------------------------------------------- grids beside the cached weights


def save_grids(path, grids: dict[int, np.ndarray], settings: dict) -> None:
    """Store grids {epoch: HxWx3 array in [0, 1]} as uint8 with the settings that drew them."""
    buffer = io.BytesIO()
    epochs = sorted(grids)
    arrays = [np.round(grids[e] * 255).astype(np.uint8) for e in epochs]
    np.savez(buffer, epochs=np.asarray(epochs, dtype=np.int64),
             settings=np.asarray(json.dumps(settings, sort_keys=True)),
             grids=np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8))
    write_bytes_atomic(path, buffer.getvalue())


def load_grids(path, settings: dict) -> dict[int, np.ndarray]:
    """The grids stored at ``path`` if they were drawn with ``settings``, else {}."""
    try:
        with np.load(path) as stored:
            if str(stored["settings"]) != json.dumps(settings, sort_keys=True):
                log.info("grids beside the cached eps-net were drawn with other settings; not shown")
                return {}
            return {int(e): g.astype(np.float32) / 255.0 for e, g in zip(stored["epochs"], stored["grids"])}
    except (OSError, ValueError, KeyError):
        return {}


# ---------------------------------------------------------------- run


def run(ctx) -> dict:
    started = time.perf_counter()
    ctx = dataclasses.replace(ctx, cfg=effective_config(ctx.cfg))
    cfg, device = ctx.cfg, ctx.device
    m = cfg.method
    mode = str(m.dip_mode)
    train_set = cifar.load_dataset(cfg.data, "train")
    test_set = cifar.load_dataset(cfg.data, "test")
    p = plan(cfg, len(train_set))
    schedule = common.schedule_from(cfg)
    data_identity = cifar.identity(cfg.data)
    metrics: dict = {"num_timesteps": p["num_timesteps"], "train_images": len(train_set),
                     "train_iterations": p["train_iterations"], "epochs": p["epochs"], "chain_steps": p["chain_steps"],
                     "num_samples": p["num_samples"], "dip_steps": p["dip_steps"],
                     "train_lr": p["lr"]}
    out = ctx.run_dir

    dip_noise, dip_key = None, None
    if mode != "none":
        dip_noise, dip_key = _dip_noise(ctx, train_set, data_identity, p["dip_steps"], metrics)

    holder: dict = {}
    base_build = common.build_seeded(cfg.backbone, 3, 3, int(m.train.seed), device)

    def build():
        holder["model"] = base_build()
        return holder["model"]

    sampler = Sampler(cfg, schedule, p["chain_steps"], mode, dip_noise, device)
    grid_count = min(int(m.eval.grid_samples), p["num_samples"])
    grids: dict[int, np.ndarray] = {}
    grid_at = {i: i // p["iterations_per_epoch"] for i in p["grid_iterations"]}

    def on_iteration(i: int) -> None:
        if i in grid_at:
            generator = common.seeded_generator(device, ctx.seed, offset=20)
            grids[grid_at[i]] = common.sample_grid(to_unit(sampler(holder["model"], grid_count, generator).samples))

    noise_generator = common.seeded_generator(device, int(m.train.seed), offset=3)
    forward_noise, loss_target = training_hooks(mode, dip_noise, noise_generator, on_iteration)
    identity = {"data": data_identity, "dip_mode": mode, "dip": dip_key,
                "noise": common.plain(m.noise) if mode != "none" else None, "noise_stream": "ddpm_dataset/1"}
    grid_settings = {"iterations": p["grid_iterations"], "samples": grid_count, "seed": ctx.seed,
                     "sample": common.plain(m.sample), "chain_steps": p["chain_steps"]}
    trained = common.train_eps_cached(
        ctx, identity, build, train_set.images, schedule, iterations=p["train_iterations"],
        batch_size=int(m.train.batch_size), lr=float(m.train.lr), seed=int(m.train.seed),
        lr_schedule=str(m.train.lr_schedule), grad_clip=None if m.train.grad_clip is None else float(m.train.grad_clip),
        ema_decay=None if m.train.ema_decay is None else float(m.train.ema_decay), flip=bool(m.train.flip),
        forward_noise=forward_noise, loss_target=loss_target)
    grids_path = ctx.cache_dir / f"{trained.key}.grids.npz"
    if trained.trained_now:
        save_grids(grids_path, grids, grid_settings)
    else:
        grids = load_grids(grids_path, grid_settings)
    model = trained.model.to(device)

    rd_count = min(int(m.eval.rd_samples), p["num_samples"])
    x0_track: list[torch.Tensor] = []
    generator = common.seeded_generator(device, ctx.seed, offset=10)
    result, sample_seconds = common.timed(
        lambda: sampler(model, p["num_samples"], generator,
                        callback=lambda t, x_t, x0: x0_track.append(x0[:rd_count].detach().float().cpu())),
        device)
    samples = result.samples.detach().float().cpu()
    x0_preds = torch.stack(x0_track)
    chain_order = list(reversed(sampler.timesteps))
    train_reference = train_set.images[int(m.eval.reference_index)]
    references = {"train_image": train_reference.expand_as(samples[:rd_count]),
                  "nearest": nearest_images(samples[:rd_count], train_set.images)}
    rows = rd_rows(chain_order, x0_preds, references, str(m.eval.reference))
    write_text_atomic(out / "rd_curve.csv", _csv(rows))
    label = {"none": "pure DDPM", "replace_noise": "idea 1: DIP noise", "target": "idea 2: DIP target"}[mode]
    write_rd_plot(out / "rd_curve.png", rows, str(m.eval.reference), f"{label}, seed {ctx.seed}")

    encoder = patch_metrics.get_encoder(ctx.cache_dir, train_set, test_set, data_identity, device=device,
                                        epochs=int(m.quality.encoder_epochs))
    reference_images = test_set.images[: int(m.quality.reference_count)]
    metrics.update(
        final_rmse=rows[-1]["rmse"], final_rmse_train_image=rows[-1]["rmse_train_image"],
        final_rmse_nearest=rows[-1]["rmse_nearest"], start_rmse=rows[0]["rmse"],
        max_rmse=max(r["rmse"] for r in rows),
        frechet=patch_metrics.patch_frechet(samples, reference_images, encoder),
        frechet_real=patch_metrics.real_frechet(train_set, reference_images, encoder, len(samples), seed=ctx.seed),
        encoder_accuracy=encoder.heldout_accuracy,
        sample_mean=float(samples.mean()), sample_std=float(samples.std()),
        sample_saturated=float((samples.abs() >= 1.0).float().mean()),
        ddpm_trained_now=trained.trained_now, train_loss_final=trained.info.get("loss_final"),
        train_seconds=trained.info.get("train_seconds"), sample_seconds=sample_seconds,
        model_calls=result.model_calls,
    )

    epochs_label = lambda e: f"{int(round(e)):03d}"  # noqa: E731
    for epoch, grid in grids.items():
        save_image_atomic(out / f"grid_epoch_{epochs_label(epoch)}.png", grid)
    save_image_atomic(out / f"grid_epoch_{epochs_label(p['epochs'])}.png",
                      common.sample_grid(to_unit(samples[:grid_count])))
    common.save_sample_grid(out / "samples.png", to_unit(samples))
    save_image_atomic(out / "reference.png", to_unit(train_reference[None])[0].numpy().transpose(1, 2, 0))
    metrics["wall_seconds"] = time.perf_counter() - started
    return metrics


def _dip_noise(ctx, train_set, data_identity: dict, steps: int, metrics: dict):
    """Fit (or load) the DIP on the noisy training image; return (DipNoise, DIP cache key)."""
    cfg, device = ctx.cfg, ctx.device
    m = cfg.method
    dip = m.dip
    clean = to_unit(train_set.images[int(dip.image_index)][None])
    noisy_np = add_gaussian_noise(clean[0].numpy().transpose(1, 2, 0), float(dip.sigma), bool(dip.clip),
                                  int(dip.noise_seed))
    noisy = torch.from_numpy(noisy_np.transpose(2, 0, 1).copy())[None].to(device)
    clean = clean.to(device)
    code = common.make_code(int(dip.code_channels), SIDE, str(dip.code_kind), float(dip.code_scale),
                            common.seeded_generator(device, int(dip.seed), offset=1), device)
    build = common.build_seeded(m.dip_backbone, int(dip.code_channels), 3, int(dip.seed), device)
    identity = {"net": common.plain(m.dip_backbone), "data": data_identity, "image_index": int(dip.image_index),
                "sigma": float(dip.sigma), "clip": bool(dip.clip), "noise_seed": int(dip.noise_seed)}
    fitted = common.fit_dip_cached(ctx, identity, build, code, noisy, dip, clean=clean, steps=steps)
    net = fitted.model.to(device)
    with torch.no_grad():
        output = net.train()(code)
    noise = DipNoise(net, int(dip.code_channels), str(dip.code_kind), float(dip.code_scale), str(m.noise.draw),
                     int(m.noise.bank_size), str(m.noise.output_map),
                     common.seeded_generator(device, int(dip.seed), offset=4), device)
    examples = noise.draw(8, common.seeded_generator(device, int(dip.seed), offset=5)).cpu()
    low, high = examples.amin(dim=(1, 2, 3), keepdim=True), examples.amax(dim=(1, 2, 3), keepdim=True)
    out = ctx.run_dir
    save_image_atomic(out / "dip_target.png", noisy_np)
    save_image_atomic(out / "dip_output.png", output[0].clamp(0, 1).cpu().numpy().transpose(1, 2, 0))
    common.save_sample_grid(out / "dip_noise.png", (examples - low) / (high - low).clamp_min(1e-8))
    metrics.update(dip_trained_now=fitted.trained_now, dip_psnr=fitted.info.get("psnr_final"),
                   dip_psnr_noisy=float(psnr(clean.cpu().numpy(), noisy.cpu().numpy())),
                   dip_seconds=fitted.info.get("dip_seconds"), dip_loss_final=fitted.info.get("loss_final"))
    return noise, fitted.key
