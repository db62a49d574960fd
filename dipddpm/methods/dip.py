"""Deep Image Prior denoising through a plan of stages (reports R1 and R2).

The noise plan says what each stage's image is (the observation, a cleaner or noisier
copy, or a diffusion-forward x_t); the method says whether the network sees a fixed
code or that image and whether it is pulled towards that image or the clean one.

With ``method.replicas`` = K the job trains K runs (seeds seed..seed+K-1) and keeps one item of
metrics and files per run (``items``, ``replica_<k>/``). ``method.replica_output`` says what the
job returns: ``each``, the K runs scored separately (top-level metrics are their means, files
are replica 0's); ``mean``, one image, the pixel-wise mean of the runs' returned images
(``replicas.average_outputs``: collapsed runs left out while one learned), which is final.png
and what psnr_final, ssim_final and psnr_final_vs_noisy score.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from dipddpm.data.images import load_observation, to_image, to_tensor, validate_image_config
from dipddpm.diffusion.schedule import build_schedule
from dipddpm.dip import FINAL_FROM, SCORE_PASSES, DipSettings, Stage, fit_dip, make_code
from dipddpm.replicas import average_outputs, fit_dip_replicas, replica_seeds
from dipddpm.early_stop import build_early_stop, validate_early_stop
from dipddpm.errors import require, require_choice
from dipddpm.io import save_figure_atomic, save_image_atomic, write_csv_atomic
from dipddpm.metrics import QUANTISERS, psnr, psnr_uint8, ssim
from dipddpm.models import build_backbone, check_size
from dipddpm.plans import build_plan, describe_plan, stage_images
from dipddpm.runtime import seed_everything

DATA_KINDS = ("image",)  # data groups this method accepts (checked by methods.require_data_kind)
CURVE_FIELDS = ("step", "stage", "stage_step", "loss", "psnr", "ssim", "psnr_noisy", "nr_stat")
REPLICA_OUTPUTS = ("each", "mean")  # method.replica_output: K runs scored each | one image, their mean


def effective_size(cfg) -> int | None:
    """data.size (null: the image's own side; a profile's cap is already applied by
    dipddpm.profile.apply_profile), checked against what the backbone accepts."""
    size = cfg.data.get("size")
    if size is not None:
        check_size(cfg.backbone, int(size))
    return size


def _schedule_for(cfg):
    needs = cfg.noise_plan.name == "ddpm" or cfg.noise_plan.get("t") is not None
    return build_schedule(cfg.scheduler) if needs else None


def stage_plan(cfg):
    """The run's list of StagePlan (step counts as the profile left them)."""
    return build_plan(cfg.noise_plan, cfg.epoch_plan, _schedule_for(cfg), observation_sigma=float(cfg.data.sigma))


def validate(cfg) -> None:
    m = cfg.method
    require_choice("method.input", m.input, ("code", "noisy"))
    require_choice("method.target", m.target, ("noisy", "clean", "observation"))
    require_choice("method.code_kind", m.code_kind, ("uniform", "gaussian"))
    require_choice("method.psnr_metric", m.psnr_metric, ("float", "uint8"))
    require_choice("method.uint8_quantise", m.get("uint8_quantise", "round"), QUANTISERS)
    require_choice("method.score_pass", m.get("score_pass", "step_output"), SCORE_PASSES)
    require_choice("method.final_from", m.get("final_from", "last_output"), FINAL_FROM)
    require(m.get("score_pass", "step_output") != "eval_forward" or float(m.ema) == 0.0, "method.ema", m.ema,
            "0 when method.score_pass=eval_forward (one forward pass is scored, there is no average)")
    require(isinstance(m.steps, int) and m.steps >= 1, "method.steps", m.steps, "an integer >= 1")
    require(isinstance(m.code_channels, int) and m.code_channels >= 1, "method.code_channels", m.code_channels, "an integer >= 1")
    require(0.0 <= float(m.ema) < 1.0, "method.ema", m.ema, "a number in [0, 1)")
    require(float(m.reg_noise_std) >= 0.0, "method.reg_noise_std", m.reg_noise_std, "a number >= 0")
    require(float(cfg.optim.lr) > 0.0, "optim.lr", cfg.optim.lr, "a number > 0")
    replicas = m.get("replicas", 1)
    require(isinstance(replicas, int) and not isinstance(replicas, bool) and replicas >= 1,
            "method.replicas", replicas, "an integer >= 1")
    require_choice("method.replica_mode", m.get("replica_mode", "auto"), ("auto", "vmap", "loop"))
    require_choice("method.replica_output", m.get("replica_output", "each"), REPLICA_OUTPUTS)
    for key in ("compile", "channels_last"):
        require_choice(f"method.{key}", m.get(key, False), ("auto", True, False))
    require(m.get("channels_last", False) is not True or replicas == 1, "method.channels_last", True,
            "auto or false when method.replicas > 1")
    require_choice("method.autocast", m.get("autocast", "none"), ("none", "bf16", None))
    require_choice("method.cudnn_benchmark", m.get("cudnn_benchmark", False), (True, False))
    require(isinstance(cfg.eval_every, int) and cfg.eval_every >= 1, "eval_every", cfg.eval_every, "an integer >= 1")
    validate_image_config(cfg.data)
    validate_early_stop(cfg.early_stop)
    effective_size(cfg)
    stage_plan(cfg)


def clean_image_uses(cfg) -> list[str]:
    """Where the clean image steers the run. Stage images drawn from the observation
    (noise_plan.stage_source observation; for R2 plans the observation is x_{end_t}) do not count."""
    uses = []
    if cfg.method.target == "clean":
        uses.append("training target")
    if cfg.early_stop.name == "psnr_patience":
        uses.append("early stopping")
    synthesised = cfg.noise_plan.name != "single" or cfg.noise_plan.get("t") is not None
    if synthesised and cfg.noise_plan.get("stage_source", "clean") == "clean":
        uses.append("stage images synthesised from it")
    return uses


def describe(cfg):
    plan = stage_plan(cfg)
    text = describe_plan(plan)
    return text, {"stages": [s.as_dict() for s in plan], "total_steps": sum(s.steps for s in plan)}


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


def execution_options(cfg, device) -> dict:
    """DipSettings fields for compile, channels-last, autocast and cuDNN autotuning.

    ``auto`` turns compile and channels-last on for CUDA only (on this project's CPUs
    both made the DIP step slower; see docs/PERFORMANCE.md); channels-last stays off
    with replicas.
    """
    m = cfg.method
    on_cuda = torch.device(device).type == "cuda"

    def resolve(key: str, allowed: bool) -> bool:
        value = m.get(key, False)
        return bool(on_cuda and allowed) if value == "auto" else bool(value)

    autocast = m.get("autocast", "none")
    return {
        "compile": resolve("compile", True),
        "channels_last": resolve("channels_last", int(m.get("replicas", 1)) == 1),
        "autocast": None if autocast in (None, "none") else str(autocast),
        "cudnn_benchmark": bool(m.get("cudnn_benchmark", False)),
    }


def _settings(cfg, ctx) -> DipSettings:
    m = cfg.method
    return DipSettings(
        lr=float(cfg.optim.lr), betas=tuple(cfg.optim.betas), weight_decay=float(cfg.optim.get("weight_decay", 0.0)),
        reg_noise_std=float(m.reg_noise_std), ema=float(m.ema), eval_every=int(cfg.eval_every),
        reset_optimizer_per_stage=bool(m.reset_optimizer_per_stage),
        restore_best=bool(cfg.early_stop.get("restore_best", False)),
        psnr_metric=str(m.psnr_metric), uint8_quantise=str(m.get("uint8_quantise", "round")),
        score_pass=str(m.get("score_pass", "step_output")), final_from=str(m.get("final_from", "last_output")),
        progress=ctx.progress, description=f"dip {cfg.backbone.name}",
        **execution_options(cfg, ctx.device),
    )


def _prepare(cfg, ctx, plan, images, clean, observed):
    """Network, stages, early-stopping rule and jitter generator of one run (seed ctx.seed).

    The order of random draws is the run's contract: the generator (seeded from ctx.seed)
    draws the code(s) and then the jitter; torch's global generator initialises the net.
    """
    m = cfg.method
    channels = clean.shape[1]
    generator = ctx.generator()
    in_channels = m.code_channels if m.input == "code" else channels
    net = build_backbone(cfg.backbone, in_channels, channels).to(ctx.device)
    size = tuple(clean.shape[-2:])
    code = make_code(m.code_channels, size, m.code_kind, m.code_scale, generator, ctx.device)
    stages = []
    for plan_stage, image in zip(plan, images):
        if m.input == "code" and m.resample_code_per_stage and plan_stage.index > 0:
            code = make_code(m.code_channels, size, m.code_kind, m.code_scale, generator, ctx.device)
        stages.append(Stage(
            index=plan_stage.index, steps=plan_stage.steps,
            net_input=code if m.input == "code" else image,
            target={"clean": clean, "observation": observed}.get(m.target, image),
            info=plan_stage.as_dict(),
        ))
    early_stop = build_early_stop(cfg.early_stop, carry_best=bool(m.carry_best_across_stages),
                                  observation=observed, data_sigma=float(cfg.data.sigma))
    return net, stages, early_stop, generator


def _score(cfg):
    """The run's PSNR against the clean image: float, or uint8 levels (method.psnr_metric)."""
    quantise = str(cfg.method.get("uint8_quantise", "round"))
    return (lambda a, b: psnr_uint8(a, b, quantise)) if cfg.method.psnr_metric == "uint8" else psnr


def _final_metrics(cfg, obs, final_np) -> dict:
    """psnr_final, ssim_final (against the clean image) and psnr_final_vs_noisy of the returned image."""
    return {"psnr_final": _score(cfg)(obs.clean, final_np), "ssim_final": ssim(obs.clean, final_np),
            "psnr_final_vs_noisy": psnr(obs.noisy, final_np)}


def _metrics(cfg, obs, clean, result, early_stop) -> dict:
    score = _score(cfg)
    clean_np, noisy_np = obs.clean, obs.noisy
    final_np, stopped_np = to_image(result.final), to_image(result.stopped)
    best_np = to_image(result.best) if result.best is not None else final_np
    stop_step = sum(s.steps_run for s in result.stages) - 1
    metrics = {
        **_final_metrics(cfg, obs, final_np),
        "psnr_best": score(clean_np, best_np), "ssim_best": ssim(clean_np, best_np), "best_step": result.best_step,
        "psnr_stop": score(clean_np, stopped_np), "ssim_stop": ssim(clean_np, stopped_np), "stop_step": stop_step,
        "psnr_noisy_input": score(clean_np, noisy_np),
        "loss_final": result.loss_final, "collapsed": result.collapsed, "wall_seconds": result.seconds, "steps": result.steps_run,
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
    return metrics, (final_np, best_np, stopped_np)


def _write_run_files(out, cfg, obs, result, images) -> None:
    final_np, best_np, stopped_np = images
    save_image_atomic(out / "final.png", final_np)
    save_image_atomic(out / "best.png", best_np)
    save_image_atomic(out / "stopped.png", stopped_np)
    write_csv_atomic(out / "curve.csv", result.curve, CURVE_FIELDS)
    write_curve_plot(out / "curves.png", result.curve, f"{obs.name}: {cfg.backbone.name}, {cfg.noise_plan.name}")


def _mean_value(values):
    """The common value when all agree, else the mean of numbers (elementwise for equal-length lists), else None."""
    if all(v == values[0] for v in values):
        return values[0]
    if all(isinstance(v, (int, float)) for v in values):
        return float(np.mean(values))
    if all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
        return [_mean_value([v[i] for v in values]) for i in range(len(values[0]))]
    return None


def mean_metrics(items: list[dict]) -> dict:
    """Top-level metrics of a replicated run: the mean over the items of every shared key."""
    return {key: _mean_value([item.get(key) for item in items]) for key in items[0]
            if key not in ("seed", "replica")}


def run(ctx) -> dict:
    cfg, device = ctx.cfg, ctx.device
    m = cfg.method
    plan = stage_plan(cfg)
    obs = load_observation(cfg.data, size=effective_size(cfg))
    clean = to_tensor(obs.clean).to(device)
    observed = to_tensor(obs.noisy).to(device)
    noise_generator = torch.Generator().manual_seed(int(cfg.data.get("noise_seed", 0)))
    images = [img.to(device) for img in stage_images(
        plan, clean.cpu(), observed.cpu(), cfg.noise_plan, _schedule_for(cfg), noise_generator,
        observation_sigma=obs.sigma)]
    settings = _settings(cfg, ctx)
    out = ctx.run_dir
    count = int(m.get("replicas", 1))
    if count == 1:
        net, stages, early_stop, generator = _prepare(cfg, ctx, plan, images, clean, observed)
        result = fit_dip(net, stages, settings, early_stop=early_stop, clean=clean, generator=generator)
        metrics, outputs = _metrics(cfg, obs, clean, result, early_stop)
        save_image_atomic(out / "clean.png", obs.clean)
        save_image_atomic(out / "noisy.png", obs.noisy)
        _write_run_files(out, cfg, obs, result, outputs)
        return metrics

    seeds = replica_seeds(ctx.seed, count)
    prepared = []
    for seed in seeds:
        seed_everything(seed)
        prepared.append(_prepare(cfg, dataclasses.replace(ctx, seed=seed), plan, images, clean, observed))
    nets, stage_lists, early_stops, generators = (list(column) for column in zip(*prepared))
    results = fit_dip_replicas(nets, stage_lists, settings, early_stops, clean=clean, generators=generators,
                               mode=str(m.get("replica_mode", "auto")))
    save_image_atomic(out / "clean.png", obs.clean)
    save_image_atomic(out / "noisy.png", obs.noisy)
    items, first_outputs = [], None
    for k, (seed, result, early_stop) in enumerate(zip(seeds, results, early_stops)):
        metrics, outputs = _metrics(cfg, obs, clean, result, early_stop)
        items.append({"seed": seed, "replica": k, **metrics})
        _write_run_files(out / f"replica_{k}", cfg, obs, result, outputs)
        if k == 0:
            first_outputs = outputs
    metrics = mean_metrics(items)
    if m.get("replica_output", "each") == "mean":
        # one returned image: the mean of the replicas' returned images (collapsed ones left out)
        image, kept = average_outputs([r.final for r in results], [r.collapsed for r in results])
        first_outputs = (to_image(image),) + first_outputs[1:]
        metrics.update(_final_metrics(cfg, obs, first_outputs[0]), replicas_averaged=len(kept))
    _write_run_files(out, cfg, obs, results[0], first_outputs)
    metrics["collapsed_replicas"] = sum(bool(item["collapsed"]) for item in items)
    metrics["collapsed"] = metrics["collapsed_replicas"] == count
    metrics["replicas"] = count
    metrics["replica_seeds"] = seeds
    metrics["items"] = items
    return metrics
