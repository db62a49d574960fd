"""Deep Image Prior denoising through a plan of stages (reports R1 and R2).

The noise plan says what each stage's image is (the observation, a cleaner or noisier
copy, or a diffusion-forward x_t); the method says whether the network sees a fixed
code or that image and whether it is pulled towards that image or the clean one.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import torch

from dipddpm.data.images import load_observation, to_image, to_tensor, validate_image_config
from dipddpm.dip import DipSettings, Stage, fit_dip
from dipddpm.early_stop import build_early_stop, validate_early_stop
from dipddpm.errors import ConfigError, require, require_choice
from dipddpm.io import save_figure_atomic, save_image_atomic, write_text_atomic
from dipddpm.metrics import psnr, psnr_uint8, ssim
from dipddpm.models import build_backbone, check_size, size_requirement
from dipddpm.plans import build_plan, describe_plan, stage_images
from dipddpm.schedulers import build_schedule

CURVE_FIELDS = ("step", "stage", "stage_step", "loss", "psnr", "ssim", "psnr_noisy", "nr_stat")


def effective_size(cfg) -> int | None:
    """The image side after the profile's cap, raised to what the backbone needs.

    An explicit data.size that the backbone cannot take is an error; a size the profile
    shrank is moved to the nearest size the backbone accepts.
    """
    size = cfg.data.get("size")
    max_size = cfg.profile.get("max_size")
    multiple, minimum = size_requirement(cfg.backbone)
    if max_size is not None and (size is None or size > max_size):
        capped = max(minimum, (int(max_size) // multiple) * multiple)
        return capped if size is None else min(size, capped) if min(size, capped) >= minimum else minimum
    if size is not None:
        check_size(cfg.backbone, int(size))
    return size


def _schedule_for(cfg):
    needs = cfg.noise_plan.name == "ddpm" or cfg.noise_plan.get("t") is not None
    return build_schedule(cfg.scheduler) if needs else None


def stage_plan(cfg):
    """The run's list of StagePlan with the profile's scaling applied."""
    return build_plan(
        cfg.noise_plan, cfg.epoch_plan, _schedule_for(cfg),
        step_scale=float(cfg.profile.get("step_scale", 1.0)),
        min_steps=int(cfg.profile.get("min_steps", 1)),
        softmax_c=cfg.scheduler.get("softmax_c"),
    )


def validate(cfg) -> None:
    m = cfg.method
    require_choice("method.input", m.input, ("code", "noisy"))
    require_choice("method.target", m.target, ("noisy", "clean"))
    require_choice("method.code_kind", m.code_kind, ("uniform", "gaussian"))
    require_choice("method.psnr_metric", m.psnr_metric, ("float", "uint8"))
    require(isinstance(m.steps, int) and m.steps >= 1, "method.steps", m.steps, "an integer >= 1")
    require(isinstance(m.code_channels, int) and m.code_channels >= 1, "method.code_channels", m.code_channels, "an integer >= 1")
    require(0.0 <= float(m.ema) < 1.0, "method.ema", m.ema, "a number in [0, 1)")
    require(float(m.reg_noise_std) >= 0.0, "method.reg_noise_std", m.reg_noise_std, "a number >= 0")
    require(float(cfg.optim.lr) > 0.0, "optim.lr", cfg.optim.lr, "a number > 0")
    require(isinstance(cfg.eval_every, int) and cfg.eval_every >= 1, "eval_every", cfg.eval_every, "an integer >= 1")
    validate_image_config(cfg.data)
    validate_early_stop(cfg.early_stop)
    effective_size(cfg)
    stage_plan(cfg)


def clean_image_uses(cfg) -> list[str]:
    uses = []
    if cfg.method.target == "clean":
        uses.append("training target")
    if cfg.early_stop.name == "psnr_patience":
        uses.append("early stopping")
    if cfg.noise_plan.name != "single" or cfg.noise_plan.get("t") is not None:
        uses.append("stage images synthesised from it")
    return uses


def describe(cfg):
    plan = stage_plan(cfg)
    text = describe_plan(plan)
    return text, {"stages": [s.as_dict() for s in plan], "total_steps": sum(s.steps for s in plan)}


def make_code(channels: int, size: tuple[int, int], kind: str, scale: float, generator: torch.Generator, device):
    """The fixed network input z: (1, channels, H, W)."""
    shape = (1, channels) + tuple(size)
    if kind == "uniform":
        code = torch.rand(shape, generator=generator, device=device)
    else:
        code = torch.randn(shape, generator=generator, device=device)
    return code * scale


def _curve_csv(rows) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CURVE_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CURVE_FIELDS})
    return buffer.getvalue()


def write_curve_plot(path, rows, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ax_psnr, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    if any(r["psnr"] is not None for r in rows):
        ax_psnr.plot(steps, [r["psnr"] for r in rows], label="PSNR vs clean")
    ax_psnr.plot(steps, [r["psnr_noisy"] for r in rows], label="PSNR vs target", alpha=0.7)
    ax_loss.semilogy(steps, [max(r["loss"], 1e-12) for r in rows])
    boundaries = [r["step"] for prev, r in zip(rows, rows[1:]) if r["stage"] != prev["stage"]]
    for axis in (ax_psnr, ax_loss):
        for b in boundaries:
            axis.axvline(b, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel("step")
    ax_psnr.set_ylabel("dB")
    ax_psnr.legend()
    ax_loss.set_ylabel("loss (MSE)")
    figure.suptitle(title)
    save_figure_atomic(path, figure)


def run(ctx) -> dict:
    cfg, device = ctx.cfg, ctx.device
    m = cfg.method
    plan = stage_plan(cfg)
    obs = load_observation(cfg.data, size=effective_size(cfg))
    clean = to_tensor(obs.clean).to(device)
    observed = to_tensor(obs.noisy).to(device)
    channels = clean.shape[1]
    noise_generator = torch.Generator().manual_seed(int(cfg.data.get("noise_seed", 0)))
    images = [img.to(device) for img in stage_images(
        plan, clean.cpu(), observed.cpu(), cfg.noise_plan, _schedule_for(cfg), noise_generator)]
    generator = ctx.generator()
    in_channels = m.code_channels if m.input == "code" else channels
    net = build_backbone(cfg.backbone, in_channels, channels).to(device)
    size = tuple(clean.shape[-2:])
    code = make_code(m.code_channels, size, m.code_kind, m.code_scale, generator, device)
    stages = []
    for plan_stage, image in zip(plan, images):
        if m.input == "code" and m.resample_code_per_stage and plan_stage.index > 0:
            code = make_code(m.code_channels, size, m.code_kind, m.code_scale, generator, device)
        stages.append(Stage(
            index=plan_stage.index, steps=plan_stage.steps,
            net_input=code if m.input == "code" else image,
            target=clean if m.target == "clean" else image,
            info=plan_stage.as_dict(),
        ))
    early_stop = build_early_stop(cfg.early_stop, carry_best=bool(m.carry_best_across_stages))
    settings = DipSettings(
        lr=float(cfg.optim.lr), betas=tuple(cfg.optim.betas), weight_decay=float(cfg.optim.get("weight_decay", 0.0)),
        reg_noise_std=float(m.reg_noise_std), ema=float(m.ema), eval_every=int(cfg.eval_every),
        reset_optimizer_per_stage=bool(m.reset_optimizer_per_stage),
        restore_best=bool(cfg.early_stop.get("restore_best", False)),
        psnr_metric=str(m.psnr_metric), progress=ctx.progress, description=f"dip {cfg.backbone.name}",
    )
    result = fit_dip(net, stages, settings, early_stop=early_stop, clean=clean, generator=generator)

    score = psnr_uint8 if m.psnr_metric == "uint8" else psnr
    clean_np, noisy_np = obs.clean, obs.noisy
    final_np, stopped_np = to_image(result.final), to_image(result.stopped)
    best_np = to_image(result.best) if result.best is not None else final_np
    stop_step = sum(s.steps_run for s in result.stages) - 1
    metrics = {
        "psnr_final": score(clean_np, final_np), "ssim_final": ssim(clean_np, final_np),
        "psnr_best": score(clean_np, best_np), "ssim_best": ssim(clean_np, best_np), "best_step": result.best_step,
        "psnr_stop": score(clean_np, stopped_np), "ssim_stop": ssim(clean_np, stopped_np), "stop_step": stop_step,
        "psnr_noisy_input": score(clean_np, noisy_np),
        "psnr_final_vs_noisy": psnr(noisy_np, final_np),
        "loss_final": result.loss_final, "wall_seconds": result.seconds, "steps": result.steps_run,
        "steps_per_second": result.steps_run / max(result.seconds, 1e-9),
        "image_size": int(clean.shape[-1]), "image": obs.name,
        "stage_psnr_best": [s.psnr_best for s in result.stages],
        "stage_ssim_best": [s.ssim_best for s in result.stages],
        "stage_stop_step": [s.stop_step for s in result.stages],
        "stage_stopped_early": [s.stopped_early for s in result.stages],
    }
    stage_psnr = [v for v in metrics["stage_psnr_best"] if v is not None]
    stage_ssim = [v for v in metrics["stage_ssim_best"] if v is not None]
    metrics["stage_psnr_mean"] = float(np.mean(stage_psnr)) if stage_psnr else None
    metrics["stage_ssim_mean"] = float(np.mean(stage_ssim)) if stage_ssim else None
    if cfg.early_stop.name == "wmv":
        metrics["wmv_min_step"], metrics["wmv_min_variance"] = early_stop.minimum()

    out = ctx.run_dir
    save_image_atomic(out / "clean.png", clean_np)
    save_image_atomic(out / "noisy.png", noisy_np)
    save_image_atomic(out / "final.png", final_np)
    save_image_atomic(out / "best.png", best_np)
    save_image_atomic(out / "stopped.png", stopped_np)
    write_text_atomic(out / "curve.csv", _curve_csv(result.curve))
    write_curve_plot(out / "curves.png", result.curve, f"{obs.name}: {cfg.backbone.name}, {cfg.noise_plan.name}")
    return metrics
