"""dipddpm-train: the Hydra app that runs one job (or, with -m, a sweep of jobs).

Each job: validate the config (one-line error, nothing trained), skip it if its
result.json is complete for the same config (resume), run the method, and write
result.json atomically with status ok | collapsed | diverged | failed. A failing job never stops
its sweep; the exit status of a sweep is the number of jobs that failed.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dipddpm import sweep
from dipddpm.errors import ConfigError
from dipddpm.io import read_json, write_json_atomic
from dipddpm.progress import progress_enabled

log = logging.getLogger("dipddpm")

CONF_DIR = sweep.config_dir()
sweep.register_resolvers()

OUTCOME = {"exit_code": 0}


def _table_spec(cfg: DictConfig) -> dict:
    """The experiment's table spec; report numbers under `table.report` win over top-level `report`."""
    spec = OmegaConf.to_container(cfg.table, resolve=True)
    spec.setdefault("report", OmegaConf.to_container(cfg.report, resolve=True))
    return spec


def _result_header(cfg: DictConfig, hydra_cfg) -> dict:
    choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra/") and v is not None}
    overrides = sweep.overrides_dict(hydra_cfg.overrides.task)
    return {
        "experiment": cfg.experiment_name,
        "method": cfg.method.name,
        "seed": int(cfg.seed),
        "overrides": overrides,
        "choices": choices,
        "config": sweep.flat_config(cfg),
        "config_hash": sweep.config_hash(cfg),
        "table": _table_spec(cfg),
    }


def prepare_job(cfg: DictConfig):
    """Validate a composed job config before anything runs: (method module, the config with its
    profile applied, device). Raises ConfigError naming the first unusable key."""
    from dipddpm.methods import get_method, require_data_kind
    from dipddpm.profile import apply_profile
    from dipddpm.runtime import apply_threads, resolve_device

    method = get_method(cfg.method.name)
    require_data_kind(method, cfg)
    cfg = apply_profile(cfg)
    apply_threads(cfg.threads)
    device = resolve_device(cfg.device)
    method.validate(cfg)
    return method, cfg, device


def _execute(run_dir: Path, prepared):
    """Run a prepared job: the result's fields, or "dry_run" after writing plan.json."""
    from dipddpm.runtime import RunContext, seed_everything

    method, cfg, device = prepared
    if cfg.dry_run:
        text, plan = method.describe(cfg)
        print(text)
        write_json_atomic(run_dir / "plan.json", plan)
        log.info("plan written to %s", run_dir / "plan.json")
        return "dry_run"
    seed_everything(int(cfg.seed))
    ctx = RunContext(cfg=cfg, run_dir=run_dir, device=device, seed=int(cfg.seed),
                     progress=progress_enabled(), cache_dir=Path(cfg.cache_dir).absolute())
    uses = method.clean_image_uses(cfg)
    began = time.perf_counter()
    metrics = method.run(ctx)
    return {"device": str(device), "uses_clean_image": bool(uses), "clean_image_uses": uses, "metrics": metrics,
            "job_seconds": time.perf_counter() - began}


def run_job(cfg: DictConfig) -> str:
    """Run one job in Hydra's output folder; return its status.

    The result header (config, config_hash) holds the composed config before the profile is
    applied: what was asked for, so resuming a sweep does not depend on how a profile scales it.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    header = _result_header(cfg, hydra_cfg)
    prepare = functools.partial(prepare_job, cfg)
    if hydra_cfg.mode != RunMode.MULTIRUN:  # a single run's config error is printed, not recorded
        try:
            prepared = prepare_job(cfg)
        except ConfigError as error:
            print(f"dipddpm-train: error: {error}", file=sys.stderr)
            return "config_error"
        prepare = lambda: prepared  # noqa: E731
    status = sweep.record_job(run_dir, header, prepare, functools.partial(_execute, run_dir),
                              force=bool(cfg.force or cfg.dry_run))
    if status in ("dry_run", "running"):
        return status
    result = read_json(run_dir / "result.json")
    metrics = result["metrics"]
    if status in ("ok", "collapsed"):
        summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in ("psnr_noisy_input", "psnr_final", "psnr_best", "psnr_stop",
                                                              "psnr_mean", "frechet", "wall_seconds")
                            if isinstance(metrics.get(k), (int, float)))
        log.info("done%s: %s", " (collapsed: the output is constant over the image)" * (status == "collapsed"),
                 summary)
    elif result.get("error"):
        log.error("%s: %s", result["status"], result["error"]["message"])
    log.info("results: %s", run_dir.absolute())
    return status


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    status = run_job(cfg)
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        OUTCOME["exit_code"] = {"ok": 0, "collapsed": 0, "dry_run": 0, "running": 0, "config_error": 2}.get(status, 1)


def cli(argv: list[str] | None = None) -> None:
    """Console entry point: check group choices first, run Hydra, exit with the outcome."""
    argv = sys.argv[1:] if argv is None else argv
    problem = sweep.check_group_choices(argv) or sweep.check_composition(argv)
    if problem:
        print(f"dipddpm-train: error: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0]] + list(argv)
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
    failed = sweep.LAST_SWEEP.get("failed")
    sys.exit(min(int(failed), 100) if failed is not None else OUTCOME["exit_code"])


if __name__ == "__main__":
    cli()
