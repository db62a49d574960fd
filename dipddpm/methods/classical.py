"""Classical denoisers (NLM, TV, wavelet, BM3D): a method, and baseline rows beside DIP sweeps.

As a method (``method=classical``) it denoises the same observation a DIP run with the
same ``data`` group sees, or, with ``method.images``, every image of a set (one result
item per image). As baselines (``+baselines=true``, docs/BASELINES.md) the end of a sweep
runs each algorithm once per distinct observation of the sweep's jobs.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from dipddpm.data.images import folder_images, load_observation, resolve_source, validate_image_config
from dipddpm.errors import ConfigError, require, require_choice
from dipddpm.io import read_json, save_image_atomic
from dipddpm.methods.dip import effective_size
from dipddpm.metrics import psnr, psnr_uint8, ssim
from dipddpm.sweep import Callback, nested_config, record_job

log = logging.getLogger("dipddpm")

DATA_KINDS = ("image",)  # data groups this method accepts (checked by methods.require_data_kind)
DIP_ONLY_GROUPS = ("optim", "noise_plan", "epoch_plan", "early_stop")  # not in a classical config (method yaml)
ALGORITHMS = ("nlm", "tv", "wavelet", "bm3d")
SIGMA_SOURCES = ("known", "estimated")
INSTALL_HINT = "install it with pip install 'dipddpm[baselines]'"
NOT_INSTALLED_NOTE = "not installed (pip install 'dipddpm[baselines]')"   # a run's note when if_missing=note
IF_MISSING = ("error", "note")
ZERO_SHOT_BASELINES = ("zsn2n", "noise2fast")   # methods that also run as baselines, each with its own config
PACKAGE_NEEDED = {"bm3d": ("bm3d", "bm3d"), "wavelet": ("pywt", "PyWavelets")}
BASELINE_PREFIX = "baseline="
BM3D_PROFILES = ("np", "refilter", "vn", "high", "deb")


# ---------------------------------------------------------------- algorithms


def package_missing(algorithm: str) -> str | None:
    """The pip name of the optional package ``algorithm`` needs when it cannot be imported, else None."""
    if algorithm not in PACKAGE_NEEDED:
        return None
    module, pip_name = PACKAGE_NEEDED[algorithm]
    try:
        importlib.import_module(module)
    except ImportError:
        return pip_name
    return None


def available_algorithms() -> list[str]:
    """The algorithms whose packages are installed, in ALGORITHMS order."""
    return [name for name in ALGORITHMS if package_missing(name) is None]


def require_algorithm(algorithm: str) -> None:
    """ConfigError for an unknown algorithm or one whose optional package is missing."""
    require_choice("method.algorithm", algorithm, ALGORITHMS)
    missing = package_missing(algorithm)
    if missing:
        raise ConfigError("method.algorithm", algorithm, f"the {missing} package is not installed; {INSTALL_HINT}")


def noise_sigma(noisy: np.ndarray, known_sigma: float, source: str) -> float:
    """The sigma handed to the denoiser: the data's own, or estimated from the noisy image alone."""
    if source == "known":
        return float(known_sigma)
    from skimage.restoration import estimate_sigma

    channel_axis = -1 if noisy.shape[-1] > 1 else None
    image = noisy if channel_axis is not None else noisy[..., 0]
    return float(estimate_sigma(image, channel_axis=channel_axis, average_sigmas=True))


def parameter_rules(method) -> dict:
    """The algorithm's settings as written in the config, sigma-dependent ones as formulas."""
    algorithm = method.algorithm
    if algorithm == "nlm":
        p = method.nlm
        return {"h": f"{p.h_factor} * sigma", "sigma": "sigma", "patch_size": p.patch_size,
                "patch_distance": p.patch_distance, "fast_mode": p.fast_mode}
    if algorithm == "tv":
        p = method.tv
        return {"weight": f"{p.weight_factor} * sigma", "max_num_iter": p.max_num_iter}
    if algorithm == "wavelet":
        p = method.wavelet
        return {"sigma": "sigma", "wavelet": p.wavelet, "method": p.method, "mode": p.mode,
                "rescale_sigma": p.rescale_sigma, "convert2ycbcr": f"{p.convert2ycbcr} (colour images)"}
    return {"sigma_psd": "sigma", "profile": method.bm3d.profile}


def algorithm_arguments(method, sigma: float, channels: int) -> dict:
    """The keyword arguments the algorithm's function gets for this sigma and channel count."""
    algorithm = method.algorithm
    if algorithm == "nlm":
        p = method.nlm
        return {"h": float(p.h_factor) * sigma, "sigma": sigma, "patch_size": int(p.patch_size),
                "patch_distance": int(p.patch_distance), "fast_mode": bool(p.fast_mode)}
    if algorithm == "tv":
        p = method.tv
        return {"weight": float(p.weight_factor) * sigma, "max_num_iter": int(p.max_num_iter)}
    if algorithm == "wavelet":
        p = method.wavelet
        return {"sigma": sigma, "wavelet": str(p.wavelet), "method": str(p.method), "mode": str(p.mode),
                "rescale_sigma": bool(p.rescale_sigma), "convert2ycbcr": bool(p.convert2ycbcr) and channels == 3}
    return {"sigma_psd": sigma, "profile": str(method.bm3d.profile)}


def denoise(noisy: np.ndarray, method, sigma: float) -> np.ndarray:
    """Denoise an HxWxC image in [0, 1] with method.algorithm; the result has the same shape, clipped to [0, 1]."""
    algorithm = method.algorithm
    require_algorithm(algorithm)
    channels = noisy.shape[-1]
    kwargs = algorithm_arguments(method, sigma, channels)
    image = noisy.astype(np.float64)
    if algorithm == "bm3d":
        bm3d = importlib.import_module("bm3d")
        output = bm3d.bm3d_rgb(image, **kwargs) if channels == 3 else bm3d.bm3d(image[..., 0], **kwargs)
    else:
        from skimage import restoration

        function = {"nlm": restoration.denoise_nl_means, "tv": restoration.denoise_tv_chambolle,
                    "wavelet": restoration.denoise_wavelet}[algorithm]
        output = function(image, channel_axis=-1, **kwargs)
    return np.clip(np.asarray(output, dtype=np.float32).reshape(noisy.shape), 0.0, 1.0)


# ---------------------------------------------------------------- the method


def image_names(cfg) -> list[str] | None:
    """The images of a set run (method.images), or None for the data group's one image."""
    images = cfg.method.get("images")
    if images is None:
        return None
    if images == "all":
        folder = cfg.data.get("folder")
        if folder:
            return [path.stem for path in folder_images(folder)]
        return [str(name) for name in cfg.method.image_set]
    return [str(name) for name in images]


def _image_data(cfg, name: str | None):
    """The data group for one image of the set (the group itself when name is None)."""
    if name is None:
        return cfg.data
    return OmegaConf.merge(cfg.data, {"image": name, "path": None})


def validate(cfg) -> None:
    m = cfg.method
    require_choice("method.if_missing", m.get("if_missing", "error"), IF_MISSING)
    if m.get("if_missing", "error") == "error":
        require_algorithm(m.algorithm)
    require_choice("method.algorithm", m.algorithm, ALGORITHMS)
    require_choice("method.sigma", m.sigma, SIGMA_SOURCES)
    if m.sigma == "estimated" and package_missing("wavelet"):
        raise ConfigError("method.sigma", m.sigma, "estimate_sigma needs the PyWavelets package, which is not "
                                                   f"installed; {INSTALL_HINT}")
    require_choice("method.psnr_metric", m.psnr_metric, ("float", "uint8"))
    require(float(m.nlm.h_factor) > 0, "method.nlm.h_factor", m.nlm.h_factor, "a number > 0")
    require(isinstance(m.nlm.patch_size, int) and m.nlm.patch_size >= 1, "method.nlm.patch_size",
            m.nlm.patch_size, "an integer >= 1")
    require(isinstance(m.nlm.patch_distance, int) and m.nlm.patch_distance >= 1, "method.nlm.patch_distance",
            m.nlm.patch_distance, "an integer >= 1")
    require(float(m.tv.weight_factor) > 0, "method.tv.weight_factor", m.tv.weight_factor, "a number > 0")
    require(isinstance(m.tv.max_num_iter, int) and m.tv.max_num_iter >= 1, "method.tv.max_num_iter",
            m.tv.max_num_iter, "an integer >= 1")
    require_choice("method.wavelet.method", m.wavelet.method, ("BayesShrink", "VisuShrink"))
    require_choice("method.wavelet.mode", m.wavelet.mode, ("soft", "hard"))
    require_choice("method.bm3d.profile", m.bm3d.profile, BM3D_PROFILES)
    images = m.get("images")
    listed = OmegaConf.is_list(images) and len(images) > 0 and all(isinstance(n, str) for n in images)
    require(images is None or images == "all" or listed, "method.images", images,
            "null, all, or a non-empty list of image names")
    if images is not None:
        require(not cfg.data.get("path"), "data.path", cfg.data.get("path"), "null when method.images is set")
        if images == "all" and not cfg.data.get("folder"):
            require(OmegaConf.is_list(m.image_set) and len(m.image_set) > 0, "method.image_set", m.image_set,
                    "a non-empty list of image names")
        for name in image_names(cfg):
            resolve_source(name, None, cfg.data.get("folder"))
        validate_image_config(_image_data(cfg, image_names(cfg)[0]))
    else:
        validate_image_config(cfg.data)
    effective_size(cfg)


def clean_image_uses(cfg) -> list[str]:
    """Nothing: the clean image only scores the output (a known sigma is recorded as sigma_source)."""
    return []


def describe(cfg):
    m = cfg.method
    rules = parameter_rules(m)
    names = image_names(cfg) or [resolve_source(cfg.data.get("image"), cfg.data.get("path"),
                                                cfg.data.get("folder"))[0]]
    sigma = f"data.sigma = {float(cfg.data.sigma):.6g}" if m.sigma == "known" else "estimated from each noisy image"
    settings = ", ".join(f"{key}={value}" for key, value in rules.items())
    size = effective_size(cfg)
    text = (f"classical {m.algorithm}: {settings}\nsigma: {sigma}\n"
            f"images ({len(names)}, side {size if size is not None else 'original'}): {', '.join(names)}")
    plan = {"algorithm": m.algorithm, "parameters": rules, "sigma": m.sigma, "data_sigma": float(cfg.data.sigma),
            "images": names, "image_size": size}
    return text, plan


def _score_image(cfg, data_cfg, size, out_dir: Path) -> dict:
    """Denoise one observation, write clean/noisy/final PNGs into out_dir, return its metrics."""
    m = cfg.method
    score = psnr_uint8 if m.psnr_metric == "uint8" else psnr
    obs = load_observation(data_cfg, size=size)
    sigma = noise_sigma(obs.noisy, obs.sigma, m.sigma)
    began = time.perf_counter()
    final = denoise(obs.noisy, m, sigma)
    seconds = time.perf_counter() - began
    save_image_atomic(out_dir / "clean.png", obs.clean)
    save_image_atomic(out_dir / "noisy.png", obs.noisy)
    save_image_atomic(out_dir / "final.png", final)
    metrics = {
        "psnr_final": score(obs.clean, final), "ssim_final": ssim(obs.clean, final),
        "psnr_noisy_input": score(obs.clean, obs.noisy), "psnr_final_vs_noisy": psnr(obs.noisy, final),
        "wall_seconds": seconds, "sigma_used": sigma, "sigma_source": str(m.sigma), "data_sigma": obs.sigma,
        "image": obs.name, "image_size": int(obs.clean.shape[0]),
        "parameters": algorithm_arguments(m, sigma, obs.noisy.shape[-1]),
    }
    log.info("%s %s: psnr %.2f -> %.2f (sigma %.4g %s, %.2fs)", m.algorithm, obs.name, metrics["psnr_noisy_input"],
             metrics["psnr_final"], sigma, m.sigma, seconds)
    return metrics


def _not_installed(cfg, names: list[str] | None) -> dict:
    """The metrics of a run whose algorithm's package is missing (method.if_missing=note): the
    note, per image for a set run, so its table cells read it instead of a failed job."""
    note = {"algorithm": cfg.method.algorithm, "note": NOT_INSTALLED_NOTE,
            "not_installed": package_missing(cfg.method.algorithm)}
    log.info("%s: %s", cfg.method.algorithm, NOT_INSTALLED_NOTE)
    return note if names is None else note | {"items": [{"image": name, "note": NOT_INSTALLED_NOTE} for name in names]}


def run(ctx) -> dict:
    cfg = ctx.cfg
    size = effective_size(cfg)
    names = image_names(cfg)
    if package_missing(cfg.method.algorithm):
        return _not_installed(cfg, names)
    if names is None:
        metrics = _score_image(cfg, cfg.data, size, ctx.run_dir)
        metrics["algorithm"] = cfg.method.algorithm
        return metrics
    items = [_score_image(cfg, _image_data(cfg, name), size, ctx.run_dir / name) for name in names]
    metrics = {key: float(np.mean([item[key] for item in items]))
               for key in ("psnr_final", "ssim_final", "psnr_noisy_input", "psnr_final_vs_noisy", "sigma_used")}
    metrics.update(wall_seconds=float(sum(item["wall_seconds"] for item in items)), image_count=len(items),
                   sigma_source=str(cfg.method.sigma), algorithm=cfg.method.algorithm, items=items)
    return metrics


# ---------------------------------------------------------------- baselines beside a sweep


@dataclass
class ObservationGroup:
    """Sweep jobs that see the same noisy image: one baseline run per algorithm serves them all."""

    key: str
    config: dict
    experiment: str | None
    choices: dict
    table: dict
    jobs: list[str] = field(default_factory=list)


def _job_description(job_dir: Path) -> dict | None:
    """A sweep job's resolved config, experiment, choices and table spec (None if unreadable)."""
    result = {}
    if (job_dir / "result.json").is_file():
        try:
            result = read_json(job_dir / "result.json")
        except (OSError, ValueError):
            result = {}
    config = None
    hydra_config = job_dir / ".hydra" / "config.yaml"
    if hydra_config.is_file():
        try:
            config = OmegaConf.to_container(OmegaConf.load(hydra_config), resolve=True)
        except Exception:  # an unresolvable file falls back to result.json
            config = None
    if config is None and isinstance(result.get("config"), dict):
        config = nested_config(result["config"])
    if not isinstance(config, dict):
        return None
    choices = result.get("choices")
    if choices is None and (job_dir / ".hydra" / "hydra.yaml").is_file():
        try:
            choices = OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices)
            choices = {k: v for k, v in choices.items() if not k.startswith("hydra/") and v is not None}
        except Exception:  # choices only label the result; go on without them
            choices = None
    table = result.get("table")
    if table is None:
        table = dict(config.get("table") or {}) | {"report": config.get("report") or []}
    return {"config": config, "experiment": result.get("experiment") or config.get("experiment_name"),
            "choices": choices or {}, "table": table}


def observation_key(config: dict) -> str | None:
    """A short hash of what fixes a job's observation and its scoring: data group, image side
    (after the job's profile), PSNR kind."""
    from dipddpm.profile import apply_profile
    from dipddpm.sweep import config_hash

    cfg = OmegaConf.create(config)
    if cfg.get("data") is None or cfg.data.get("name") != "image":
        return None
    method = cfg.get("method") or {}
    if method.get("name") == "classical":
        return None
    try:
        size = effective_size(apply_profile(cfg))
    except (ConfigError, KeyError, AttributeError, ValueError):
        return None
    identity = OmegaConf.create({"data": cfg.data, "size": size, "psnr_metric": method.get("psnr_metric", "float")})
    return config_hash(identity)[:8]


def observation_groups(sweep_dir: Path) -> list[ObservationGroup]:
    """The sweep's jobs grouped by observation_key, in job order (baseline folders left out)."""
    from dipddpm.compare import find_jobs

    groups: dict[str, ObservationGroup] = {}
    for job_dir, _ in find_jobs([sweep_dir]):
        if job_dir.name.startswith(BASELINE_PREFIX) or job_dir == sweep_dir:
            continue
        description = _job_description(job_dir)
        if description is None:
            continue
        key = observation_key(description["config"])
        if key is None:
            continue
        if key not in groups:
            groups[key] = ObservationGroup(key, description["config"], description["experiment"],
                                           description["choices"], description["table"])
        groups[key].jobs.append(job_dir.relative_to(sweep_dir).as_posix())
    return list(groups.values())


def baseline_config(job_config: dict, algorithm: str) -> DictConfig:
    """A sweep job's config with its method replaced by method=classical running ``algorithm``
    (a missing package gives a note, not a failure), or by ``method=<algorithm>`` for a zero-shot one."""
    from dipddpm.sweep import config_dir

    name = algorithm if algorithm in ZERO_SHOT_BASELINES else "classical"
    method = OmegaConf.load(config_dir() / "method" / f"{name}.yaml")
    method.pop("defaults", None)  # Hydra's defaults list of the file, not a method key
    if name == "classical":
        method.algorithm = algorithm
        method.if_missing = "note"
    method.psnr_metric = (job_config.get("method") or {}).get("psnr_metric", "float")
    config = OmegaConf.create({key: value for key, value in job_config.items()
                               if key != "method" and key not in DIP_ONLY_GROUPS})
    config.method = method
    config.seed = 0
    return config


def _baseline_header(cfg: DictConfig, group: ObservationGroup, algorithm: str) -> dict:
    from dipddpm.sweep import config_hash, flat_config

    return {"experiment": group.experiment, "method": cfg.method.name, "seed": 0, "baseline": algorithm,
            "baseline_of": group.jobs, "observation": group.key, "overrides": {},
            "choices": group.choices | {"method": cfg.method.name}, "config": flat_config(cfg),
            "config_hash": config_hash(cfg), "table": group.table}


def run_baseline(sweep_dir: Path, group: ObservationGroup, algorithm: str, force: bool = False) -> str:
    """Run one algorithm for one observation group into sweep_dir/baseline=<algorithm>,data=<key>; its status."""
    import torch

    from dipddpm.methods import get_method
    from dipddpm.profile import apply_profile
    from dipddpm.runtime import RunContext, resolve_device, seed_everything

    run_dir = Path(sweep_dir) / f"{BASELINE_PREFIX}{algorithm},data={group.key}"
    cfg = baseline_config(group.config, algorithm)
    method = get_method(cfg.method.name)
    device = torch.device("cpu") if method.__name__ == __name__ else resolve_device("auto")

    def prepare():
        scaled = apply_profile(cfg)
        method.validate(scaled)
        return scaled

    def execute(scaled):
        seed_everything(0)
        ctx = RunContext(cfg=scaled, run_dir=run_dir, device=device, seed=0, progress=False,
                         cache_dir=Path(str(scaled.get("cache_dir") or "outputs/cache")).absolute())
        return {"device": str(device), "uses_clean_image": False, "clean_image_uses": [], "metrics": method.run(ctx)}

    return record_job(run_dir, _baseline_header(cfg, group, algorithm), prepare, execute, force=force)


def run_baselines(sweep_dir, algorithms=None, force: bool = False) -> dict[str, str]:
    """Run every algorithm once per distinct observation of the sweep's jobs; {folder name: status}.

    ``algorithms`` None means every classical algorithm and the zero-shot methods; one whose
    optional package is missing (bm3d, wavelet) records the not-installed note.
    """
    sweep_dir = Path(sweep_dir)
    chosen = list(algorithms) if algorithms else list(ALGORITHMS) + list(ZERO_SHOT_BASELINES)
    statuses = {}
    for group in observation_groups(sweep_dir):
        for algorithm in chosen:
            name = f"{BASELINE_PREFIX}{algorithm},data={group.key}"
            statuses[name] = run_baseline(sweep_dir, group, algorithm, force=force)
    if statuses:
        log.info("baselines: %s", ", ".join(f"{name} {status}" for name, status in statuses.items()))
    else:
        log.info("baselines: no job in %s denoises an image observation; nothing to run", sweep_dir)
    return statuses


class BaselinesCallback(Callback):
    """At the end of a multirun, before the sweep's table is built: run the classical baselines.

    Hydra calls on_multirun_end in reverse registration order, so this callback (added after
    train.yaml's sweep_table) runs first and the table includes its rows.
    """

    def __init__(self, algorithms=None):
        self.algorithms = list(algorithms) if algorithms else None

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if config.get("dry_run"):
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            run_baselines(sweep_dir, self.algorithms, force=bool(config.get("force")))
        except Exception as error:  # the sweep's own results stay valid without baselines
            log.error("could not run the classical baselines for %s: %s", sweep_dir, error)
