"""Report R3: a DDPM trained on one image, sampled from a truncated reverse chain.

A DIP (the ``backbone`` group, R3's 4-conv net cnn_r3) is fitted from a fixed code z to
one noisy digit (data=digit). A DDPM (the ``eps_net`` group) is then trained with batch 1
on a fixed x0: the frozen DIP output (x0_source=dip, "DIP+DDPM") or the clean digit
(x0_source=clean, "sole DDPM"), with t ~ U{0..t_max-1}. Samples start from x ~ N(0, I)
and run the ``method.sample`` chain (ancestral by default) from t_start (at most L-1)
down to 0; each is scored by PSNR against the clean digit (no clipping, data range 1) and
by the digit quality columns. Images are (N, 1, 28, 28) in [0, 1].
"""

from __future__ import annotations

import time

import numpy as np
import torch

from dipddpm.diffusion import sample, sample_options, validate_sample_config
from dipddpm.dip import make_code
from dipddpm.errors import require, require_choice
from dipddpm.io import save_image_atomic
from dipddpm.methods import diffusion_common as common
from dipddpm.metrics import psnr_torch_batched
from dipddpm.models import check_size

X0_SOURCES = ("dip", "clean")
DATA_KINDS = ("digit",)  # data groups this method accepts (checked by methods.require_data_kind)
SIDE = 28
DEFAULT_ITERATIONS = {"dip": 3000, "clean": 5000}


def validate(cfg) -> None:
    m = cfg.method
    require(cfg.data.name == "digit", "data", cfg.data.name,
            "digit (one MNIST digit), e.g. experiment=truncated/dip_vs_clean or data=digit eps_net=unet_res")
    require_choice("data.value_range", cfg.data.get("value_range", "unit"), ("unit",))
    require(isinstance(cfg.data.sigma, (int, float)) and 0 <= cfg.data.sigma <= 1, "data.sigma", cfg.data.sigma,
            "a number in [0, 1]")
    common.validate_eps_net(cfg, SIDE)
    check_size(cfg.backbone, SIDE, key="backbone")
    require_choice("method.x0_source", m.x0_source, X0_SOURCES)
    common.validate_dip_settings(m.dip, "method.dip")
    common.require_int("method.dip.code_channels", m.dip.code_channels)
    common.schedule_from(cfg)
    if m.train.iterations is not None:
        common.require_int("method.train.iterations", m.train.iterations)
    common.require_int("method.train.min_iterations", m.train.min_iterations)
    common.require_int("method.train.batch_size", m.train.batch_size)
    common.require_positive("method.train.lr", m.train.lr)
    common.require_int("method.train.t_max", m.train.t_max)
    common.require_int("method.train.seed", m.train.seed, minimum=0)
    common.require_int("method.sample.t_start", m.sample.t_start, minimum=0)
    if m.sample.calls is not None:
        top = min(int(m.sample.t_start), common.schedule_from(cfg).num_timesteps - 1)
        common.require_int("method.sample.calls", m.sample.calls, maximum=top + 1)
    validate_sample_config(m.sample)
    if m.num_samples is None:
        common.validate_num_samples(cfg.profile)
    else:
        common.require_int("method.num_samples", m.num_samples, minimum=2)
    common.require_int("method.quality_reference", m.quality_reference, minimum=2)
    _load_digit(cfg)


def clean_image_uses(cfg) -> list[str]:
    return ["ddpm training x0 (sole DDPM)"] if cfg.method.x0_source == "clean" else []


def _plan(cfg) -> dict:
    """Run sizes from a config after apply_profile (which scaled dip.steps, train.iterations and the chain)."""
    m = cfg.method
    schedule = common.schedule_from(cfg)
    t_start = min(int(m.sample.t_start), schedule.num_timesteps - 1)
    # calls null: every timestep from t_start; else ``calls`` timesteps spread over t_start .. 0
    calls = t_start + 1 if m.sample.calls is None else int(m.sample.calls)
    base = m.train.iterations if m.train.iterations is not None else DEFAULT_ITERATIONS[m.x0_source]
    return {
        "x0_source": str(m.x0_source),
        "dip_steps": int(m.dip.steps) if m.x0_source == "dip" else 0,
        "train_iterations": max(int(m.train.min_iterations), int(base)),
        "t_max": min(int(m.train.t_max), schedule.num_timesteps),
        "num_timesteps": schedule.num_timesteps,
        "t_start": t_start,
        "model_calls": calls,
        "num_samples": int(cfg.profile.num_samples if m.num_samples is None else m.num_samples),
    }


def describe(cfg):
    plan = _plan(cfg)
    x0 = "frozen DIP output" if plan["x0_source"] == "dip" else "clean digit"
    text = (f"DIP {plan['dip_steps']} steps; DDPM on the {x0}: {plan['train_iterations']} iterations, "
            f"t ~ U{{0..{plan['t_max'] - 1}}}, L = {plan['num_timesteps']}; "
            f"{plan['num_samples']} samples from t = {plan['t_start']} ({plan['model_calls']} model calls, "
            f"{cfg.method.sample.sampler} sampler)")
    return text, plan


def _load_digit(cfg):
    d = cfg.data
    return common.noisy_digit(d.index, d.get("root"), d.get("split", "train"), d.sigma, d.get("clip", True),
                              d.get("noise_seed", 0), side=SIDE)


def _digit_identity(cfg) -> dict:
    d = cfg.data
    return {"index": d.index, "root": d.get("root"), "split": d.get("split", "train")}


def run(ctx) -> dict:
    started = time.perf_counter()
    cfg, device = ctx.cfg, ctx.device
    m = cfg.method
    plan = _plan(cfg)
    schedule = common.schedule_from(cfg)
    clean, noisy = (x.to(device) for x in _load_digit(cfg))
    metrics: dict = {}
    if m.x0_source == "dip":
        target = {"digit": _digit_identity(cfg), "sigma": cfg.data.sigma, "clip": cfg.data.get("clip", True),
                  "noise_seed": cfg.data.get("noise_seed", 0)}
        identity = {"target": target, "net": common.plain(cfg.backbone)}
        code_generator = common.seeded_generator(device, int(m.dip.seed), offset=1)
        code = make_code(int(m.dip.code_channels), SIDE, m.dip.code_kind, float(m.dip.code_scale),
                         code_generator, device)
        build_dip = common.build_seeded(cfg.backbone, int(m.dip.code_channels), 1, int(m.dip.seed), device)
        dip = common.fit_dip_cached(ctx, identity, build_dip, code, noisy, m.dip, clean=clean)
        with torch.no_grad():
            x0 = dip.model.eval()(code).detach()
        x0_identity = {"source": "dip", "dip": dip.key}
        metrics.update(dip_trained_now=dip.trained_now, dip_steps=plan["dip_steps"],
                       dip_psnr=float(psnr_torch_batched(clean, x0.clamp(0, 1))[0]),
                       dip_loss_final=dip.info.get("loss_final"), dip_seconds=dip.info.get("dip_seconds"))
    else:
        x0 = clean
        x0_identity = {"source": "clean", "digit": _digit_identity(cfg)}

    build_eps = common.build_seeded(cfg.eps_net, 1, 1, int(m.train.seed), device)
    trained = common.train_eps_cached(
        ctx, {"x0": x0_identity}, build_eps, x0, schedule, iterations=plan["train_iterations"],
        batch_size=int(m.train.batch_size), lr=float(m.train.lr), seed=int(m.train.seed), t_max=plan["t_max"])
    model = trained.model.to(device)

    count = plan["num_samples"]

    def draw(n: int, offset: int):
        return sample(model, schedule, (n, 1, SIDE, SIDE), t_start=plan["t_start"], calls=plan["model_calls"],
                      generator=ctx.generator(offset), device=device, **sample_options(m.sample))

    batch, batch_seconds = common.timed(lambda: draw(count, 10), device)
    _, one_seconds = common.timed(lambda: draw(1, 11), device)
    samples = batch.samples
    scores = psnr_torch_batched(clean.expand_as(samples), samples).cpu().numpy()
    quality = common.digit_quality_columns(ctx, samples, cfg.data.get("root"), int(m.quality_reference))
    metrics.update(
        psnr_mean=float(np.mean(scores)), psnr_std=float(np.std(scores, ddof=1)),
        psnr_min=float(np.min(scores)), psnr_max=float(np.max(scores)),
        **quality,
        sample_seconds=one_seconds, batch_seconds=batch_seconds,
        ms_per_step=1000.0 * one_seconds / batch.model_calls,
        model_calls=batch.model_calls, t_start=plan["t_start"], num_samples=count,
        num_timesteps=schedule.num_timesteps, t_max=plan["t_max"],
        ddpm_trained_now=trained.trained_now, train_iterations=plan["train_iterations"],
        train_loss_final=trained.info.get("loss_final"), train_seconds=trained.info.get("train_seconds"),
        wall_seconds=time.perf_counter() - started,
    )

    out = ctx.run_dir
    common.save_sample_grid(out / "samples.png", samples)
    save_image_atomic(out / "clean.png", clean[0].cpu().numpy().transpose(1, 2, 0))
    save_image_atomic(out / "noisy.png", noisy[0].cpu().numpy().transpose(1, 2, 0))
    save_image_atomic(out / "x0.png", x0.clamp(0, 1)[0].cpu().numpy().transpose(1, 2, 0))
    return metrics
