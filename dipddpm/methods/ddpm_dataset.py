"""Report R5: a DIP output inside DDPM training on a 32x32 colour set.

A DDPM (the ``eps_net`` group, e.g. unet_wide) is trained on the ``data``
set (cifar10 or the offline patches32; images (N, 3, 32, 32) in [-1, 1], random
horizontal flips). ``method.dip_mode`` says where a DIP output enters:

- ``none``: pure DDPM. x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, eps ~ N(0, I), target eps.
- ``replace_noise`` (idea 1): a DIP output d replaces eps in the forward process, is
  therefore the loss target, and replaces the Gaussian draws of sampling (x_T and every
  per-step z, through the sampler's noise_fn).
- ``target`` (idea 2): Gaussian x_t as in ``none``; d is the loss target.

The DIP (the ``backbone`` group, R5's skip hourglass) is fitted through fit_dip from a fixed
code to one noisy training image (sigma 25/255 on the [0, 1] scale). A draw of d runs the
fitted DIP on fresh codes (same kind and scale as the fitted one) with its BatchNorm in
training mode on one image at a time (as it was fitted), and maps the [0, 1] output to the
noise scale (``noise.output_map``: standardize = zero mean, unit std per image, the
moments of N(0, I); symmetric = 2 d - 1; raw = d, as R5). ``noise.draw``: bank = each
sample picks one of ``bank_size`` precomputed outputs; per_batch = one fresh code per call,
shared by the whole batch (R5's ``repeat(batch_size)``). experiment=dip_in_ddpm/ideas draws
idea 1's noise as R5 did (per_batch, raw); the default is the standardised bank
(dipddpm.methods.dip_noise).

The Gaussian eps of ``none`` and ``target`` comes from the same seeded generator, so with
one seed the two runs see the same x_t and differ only in the loss target.

Evaluation: a sample grid every ``eval.grid_every_epochs`` epochs (drawn inside training,
stored beside the cached weights), ``profile.num_samples`` samples from the ``method.sample``
chain (ancestral by default, respaced to ``sample.calls`` network calls when fewer than T), the RMSE of the predicted x0 per
step against a reference image (rd_curve.csv / rd_curve.png), and a Frechet distance of
encoder features to the held-out split (dipddpm.patch_metrics).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from dipddpm import patch_metrics
from dipddpm.data import cifar
from dipddpm.data.images import add_gaussian_noise
from dipddpm.diffusion import (chain_timesteps, load_sample_grids, sample, sample_options, save_sample_grids,
                               validate_sample_config)
from dipddpm.diffusion.training import LR_SCHEDULES
from dipddpm.dip import make_code
from dipddpm.errors import require, require_choice
from dipddpm.io import save_figure_atomic, save_image_atomic, write_csv_atomic
from dipddpm.methods import diffusion_common as common
from dipddpm.methods.dip_noise import NOISE_DRAWS, OUTPUT_MAPS, DipNoise, sampling_noise_fn, training_hooks
from dipddpm.metrics import psnr
from dipddpm.models import check_size

log = logging.getLogger("dipddpm")

DATA_KINDS = ("patches32", "cifar10")  # data groups this method accepts (methods.require_data_kind)
DIP_MODES = ("none", "replace_noise", "target")
REFERENCES = ("train_image", "nearest")
DEFAULT_DIP_STEPS = {"replace_noise": 5, "target": 1000}
SIDE = cifar.SIDE


# ---------------------------------------------------------------- configuration
def _flag(key: str, value) -> bool:
    require(isinstance(value, bool), key, value, "true or false")
    return value


def validate(cfg) -> None:
    m = cfg.method
    require_choice("method.dip_mode", m.dip_mode, DIP_MODES)
    cifar.validate_data_config(cfg.data)
    common.validate_eps_net(cfg, SIDE)
    schedule = common.schedule_from(cfg)
    if m.dip_mode != "none":
        check_size(cfg.backbone, SIDE, key="backbone")
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
    common.require_positive("method.train.epochs", t.epochs)  # a fraction after a profile
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
    if m.sample.calls is not None:
        common.require_int("method.sample.calls", m.sample.calls, maximum=schedule.num_timesteps)
    validate_sample_config(m.sample)
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
    target; apply_profile shortens a long fit, at least min(steps, method.dip.min_steps)); 0 for none."""
    m = cfg.method
    if m.dip_mode == "none":
        return 0
    return int(m.dip.steps) if m.dip.steps is not None else DEFAULT_DIP_STEPS[m.dip_mode]


def plan(cfg, train_count: int | None = None) -> dict:
    """Run sizes of a config after apply_profile: iterations, epochs, chain length, grid epochs."""
    m = cfg.method
    schedule = common.schedule_from(cfg)
    count = train_count if train_count is not None else len(cifar.load_dataset(cfg.data, "train"))
    batch = int(m.train.batch_size)
    per_epoch = math.ceil(count / batch)
    iterations = common.epoch_iterations(m.train.epochs, count, batch, int(m.train.min_iterations))
    T = schedule.num_timesteps
    chain = int(m.sample.calls) if m.sample.calls is not None else T
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


# ---------------------------------------------------------------- sampling


def sample_chain(model: nn.Module, cfg, schedule, count: int, calls: int, dip_noise, generator: torch.Generator,
                 device, callback=None):
    """``count`` samples (count, 3, 32, 32) from the configured chain (``method.sample``) with ``calls``
    network calls spread over T-1 .. 0 (respaced when fewer than T). For replace_noise the DIP
    noise replaces every Gaussian draw. ``callback(t, x_t, x0)`` gets each visited timestep and
    the network's x0 prediction before any clipping (sample.clip_x0 only changes the chain).
    """
    m = cfg.method
    return sample(model, schedule, (count, 3, SIDE, SIDE), calls=min(calls, schedule.num_timesteps),
                  generator=generator, device=device,
                  noise_fn=sampling_noise_fn(str(m.dip_mode), dip_noise, generator), callback=callback,
                  **sample_options(m.sample))


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


# ---------------------------------------------------------------- run


def run(ctx) -> dict:
    started = time.perf_counter()
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
    base_build = common.build_seeded(cfg.eps_net, 3, 3, int(m.train.seed), device)

    def build():
        holder["model"] = base_build()
        return holder["model"]

    grid_count = min(int(m.eval.grid_samples), p["num_samples"])
    grids: dict[int, np.ndarray] = {}
    grid_at = {i: i // p["iterations_per_epoch"] for i in p["grid_iterations"]}

    def on_iteration(i: int) -> None:
        if i in grid_at:
            generator = common.seeded_generator(device, ctx.seed, offset=20)
            drawn = sample_chain(holder["model"], cfg, schedule, grid_count, p["chain_steps"], dip_noise, generator,
                                 device)
            grids[grid_at[i]] = common.sample_grid(to_unit(drawn.samples))

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
        save_sample_grids(grids_path, grids, grid_settings)
    else:
        grids = load_sample_grids(grids_path, grid_settings)
    model = trained.model.to(device)

    rd_count = min(int(m.eval.rd_samples), p["num_samples"])
    x0_track: list[torch.Tensor] = []
    generator = common.seeded_generator(device, ctx.seed, offset=10)
    result, sample_seconds = common.timed(
        lambda: sample_chain(model, cfg, schedule, p["num_samples"], p["chain_steps"], dip_noise, generator, device,
                             callback=lambda t, x_t, x0: x0_track.append(x0[:rd_count].detach().float().cpu())),
        device)
    samples = result.samples.detach().float().cpu()
    x0_preds = torch.stack(x0_track)
    chain_order = chain_timesteps(p["num_timesteps"] - 1, min(p["chain_steps"], p["num_timesteps"]))
    train_reference = train_set.images[int(m.eval.reference_index)]
    references = {"train_image": train_reference.expand_as(samples[:rd_count]),
                  "nearest": nearest_images(samples[:rd_count], train_set.images)}
    rows = rd_rows(chain_order, x0_preds, references, str(m.eval.reference))
    write_csv_atomic(out / "rd_curve.csv", rows)
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
    code = make_code(int(dip.code_channels), SIDE, str(dip.code_kind), float(dip.code_scale),
                     common.seeded_generator(device, int(dip.seed), offset=1), device)
    build = common.build_seeded(cfg.backbone, int(dip.code_channels), 3, int(dip.seed), device)
    identity = {"net": common.plain(cfg.backbone), "data": data_identity, "image_index": int(dip.image_index),
                "sigma": float(dip.sigma), "clip": bool(dip.clip), "noise_seed": int(dip.noise_seed)}
    fitted = common.fit_dip_cached(ctx, identity, build, code, noisy, dip, clean=clean, steps=steps)
    net = fitted.model.to(device)
    with torch.no_grad():
        output = net.train()(code)
    noise = DipNoise.from_config(net, dip, m.noise, common.seeded_generator(device, int(dip.seed), offset=4), device)
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
