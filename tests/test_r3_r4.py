"""Reports R3 (ddpm_single) and R4 (ddpm_dipnoise): every experiment as a smoke sweep,
checkpoint reuse across jobs, reverse-chain model calls, passes=0 == plain DDPM, config errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import composed
from omegaconf import OmegaConf
from torch import nn

from dipddpm.diffusion import chain_timesteps, sample, sample_options
from dipddpm.diffusion.schedule import linear_schedule
from dipddpm.errors import ConfigError
from dipddpm.methods import diffusion_common as common
from dipddpm.methods import ddpm_dipnoise, ddpm_single
from dipddpm.profile import apply_profile
from dipddpm.sweep import config_dir

# Reverse chains are shortened 100x under smoke (conf/profile/smoke.yaml's sample_step_scale;
# every other profile keeps the real lengths).
CHAIN_SCALE = float(OmegaConf.load(config_dir() / "profile" / "smoke.yaml").sample_step_scale)
SMOKE = ["profile=smoke", "seeds=1", "threads=1"]

# experiment -> (sweep overrides that trim its grid, jobs, DDPM trainings in the sweep). Each
# job costs about a second of Hydra composition, so the grids are cut to a few jobs each.
# Under smoke, epochs 5..20 all give the 2-iteration floor: one training config, one training.
EXPERIMENTS = {
    "truncated/dip_vs_clean": ([], 2, 2),
    "truncated/schedule_length": ([], 2, 2),
    "dipnoise/time_vs_steps": (["method.steps=100"], 3, 1),  # 3 rows; 100 and 1000 in test_t41_ddim_rows_load_*
    "dipnoise/passes_steps": (["method.dip_passes=0,50", "method.steps=900"], 2, 1),
    "dipnoise/ddpm_epochs": (["method.train.epochs=5,20"], 2, 1),
    "dipnoise/dip_in_training": (["method.dip_passes=2"], 2, 2),
}


@pytest.fixture(scope="session")
def classifier_files(tmp_path_factory):
    """The digit classifier's cache files (its real cache key), trained for 2 seconds only:
    the sweeps below need the quality columns to be computed, not to be good."""
    from dipddpm import digit_metrics

    train = digit_metrics.train_digit_classifier
    folder = tmp_path_factory.mktemp("classifier")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(digit_metrics, "train_digit_classifier", lambda *a, **k: train(*a, **k | {"max_seconds": 2.0}))
        digit_metrics.get_digit_classifier(folder, "cpu")
    return sorted(folder.iterdir())


def fresh_cache(tmp_path, classifier_files) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    for file in classifier_files:
        shutil.copy(file, cache / file.name)
    return cache


def run_sweep(experiment, tmp_path, cache, extra=()):
    command = [sys.executable, "-c", "from dipddpm.train import cli; cli()", "-m", f"experiment={experiment}",
               *SMOKE, f"output_root={tmp_path}", f"cache_dir={cache}", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep = tmp_path / "sweeps" / experiment / "smoke"
    return sweep, [json.loads(p.read_text()) | {"dir": p.parent} for p in sorted(sweep.rglob("result.json"))]


def expected_calls(result) -> int:
    config = result["config"]
    if result["method"] == "ddpm_single":
        t_start = min(config["method.sample.t_start"], config["scheduler.num_timesteps"] - 1)
        return max(1, round((t_start + 1) * CHAIN_SCALE))
    return max(1, round(config["method.steps"] * CHAIN_SCALE))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_experiment_smoke_sweep(experiment, tmp_path, classifier_files):
    trim, jobs, trainings = EXPERIMENTS[experiment]
    sweep, results = run_sweep(experiment, tmp_path, fresh_cache(tmp_path, classifier_files), trim)
    assert len(results) == jobs
    for result in results:
        assert result["status"] == "ok", result["error"]
        assert result["experiment"] == experiment
        metrics = result["metrics"]
        for value in result["table"]["values"]:
            if value == "dip_psnr" and result["config"]["method.x0_source"] == "clean":
                assert value not in metrics
                continue
            assert isinstance(metrics[value], (int, float)) and math.isfinite(metrics[value]), value
        assert metrics["model_calls"] == expected_calls(result)
        assert 0.0 <= metrics["confidence"] <= 1.0 and metrics["frechet"] >= 0.0
        assert metrics["sample_seconds"] > 0
        assert (result["dir"] / "samples.png").is_file()
    assert sum(r["metrics"]["ddpm_trained_now"] for r in results) == trainings
    assert sum(not r["metrics"]["ddpm_trained_now"] for r in results) == jobs - trainings
    table = (sweep / "table.md").read_text()
    spec = results[0]["table"]
    shown = [entry[v] for entry in spec["report"] for v in spec["values"] if v in entry]
    assert shown and all((format(v, ".6g") if isinstance(v, float) else str(v)) in table for v in shown)


class CountingEps(nn.Module):
    """eps = 0.1 x, counting its calls."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.1))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.weight * x


def tiny_dip():
    """A 1-level skip net with BatchNorm: (N, 1, 8, 8) -> (N, 1, 8, 8) in [0, 1]."""
    from omegaconf import OmegaConf

    from dipddpm.models import build_backbone

    cfg = OmegaConf.create({"name": "skip", "num_channels_down": [4], "num_channels_up": [4],
                            "num_channels_skip": [2], "pad": "zero"})
    torch.manual_seed(0)
    return build_backbone(cfg, 1, 1)


@pytest.mark.parametrize("passes", [0, 3])
def test_chain_of_s_steps_makes_s_model_calls(passes):
    schedule = linear_schedule(50, 1e-4, 0.02)
    for steps in (1, 7, 50):
        model = CountingEps()
        result = ddpm_dipnoise.sample_with_dip(model, schedule, 2, steps, dip=tiny_dip(), passes=passes, dip_size=8,
                                               side=4, generator=torch.Generator().manual_seed(0))
        assert model.calls == result.model_calls == steps
        assert result.samples.shape == (2, 1, 4, 4)
        assert (result.starts is None) == (passes == 0)


def test_zero_passes_is_plain_ddpm_with_the_same_generator():
    schedule = linear_schedule(30, 1e-4, 0.02)
    model = CountingEps()
    ours = ddpm_dipnoise.sample_with_dip(model, schedule, 3, 20, dip=tiny_dip(), passes=0, dip_size=8, side=4,
                                         generator=torch.Generator().manual_seed(5))
    plain = sample(model, schedule, (3, 1, 4, 4), t_start=19, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ours.samples, plain.samples)
    with_dip = ddpm_dipnoise.sample_with_dip(model, schedule, 3, 20, dip=tiny_dip(), passes=2, dip_size=8, side=4,
                                             generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(with_dip.samples, plain.samples)
    assert with_dip.starts.min() >= 0 and with_dip.starts.max() <= 1


def test_dip_inside_the_eps_model_is_frozen_and_keeps_its_batchnorm_mode():
    dip = tiny_dip()
    wrapped = ddpm_dipnoise.DipThenEps(dip, CountingEps(), passes=2, dip_size=8, side=4, bn_mode="train")
    wrapped.eval()
    assert dip.training and not wrapped.eps_net.training
    wrapped(torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long)).sum().backward()
    assert all(p.grad is None for p in dip.parameters())
    assert wrapped.eps_net.weight.grad is not None
    assert wrapped.eps_net.calls == 1


def test_iterations_of_whole_and_fractional_epochs():
    """epochs * ceil(N / batch), rounded, at least ``minimum`` (5000 images in batches of 128: 40 per epoch)."""
    assert common.epoch_iterations(20, 5000, 128) == 800
    assert common.epoch_iterations(2, 5000, 128) == 80
    assert common.epoch_iterations(0.04, 5000, 128, minimum=2) == 2
    assert common.epoch_iterations(0.3, 5000, 128) == 12
    assert common.epoch_iterations(0.01, 5000, 128) == 1  # 0.4 rounds to 0, then the floor of 1


def test_sample_grid_layout():
    images = torch.stack([torch.full((1, 3, 2), i / 4) for i in range(5)])
    grid = common.sample_grid(images, columns=2, pad=1)
    assert grid.shape == (3 * 4 + 1, 2 * 3 + 1, 1)
    assert grid[1, 1, 0] == 0.0 and grid[1 + 4, 1, 0] == 0.5 and grid[1 + 8, 1 + 3, 0] == 1.0


@pytest.mark.parametrize("module,overrides,key", [
    (ddpm_single, ["experiment=truncated/dip_vs_clean", "eps_net.name=skip"], "eps_net.name"),
    (ddpm_single, ["method=ddpm_single", "data=digit"], "eps_net"),
    (ddpm_single, ["experiment=truncated/dip_vs_clean", "method.sample.noise_until=-1"], "method.sample.noise_until"),
    (ddpm_single, ["experiment=truncated/dip_vs_clean", "method.sample.calls=502"], "method.sample.calls"),
    (ddpm_dipnoise, ["experiment=dipnoise/time_vs_steps", "method.sample.sampler=plms"], "method.sample.sampler"),
    (ddpm_dipnoise, ["experiment=dipnoise/time_vs_steps", "r4_row=ddim", "method.sample.clip_x0=yes"], "method.sample.clip_x0"),
    (ddpm_dipnoise, ["experiment=dipnoise/time_vs_steps", "method.steps=500", "method.sample.t_start=400"],
     "method.sample.t_start"),
    (ddpm_single, ["experiment=truncated/dip_vs_clean", "data=mnist"], "data"),
    (ddpm_dipnoise, ["experiment=dipnoise/time_vs_steps", "data=digit"], "data"),
    (ddpm_single, ["experiment=truncated/dip_vs_clean", "method.x0_source=noisy"], "method.x0_source"),
    (ddpm_single, ["experiment=truncated/dip_vs_clean", "method.train.t_max=0"], "method.train.t_max"),
    (ddpm_single, ["experiment=truncated/dip_vs_clean", "profile.num_samples=1"], "profile.num_samples"),
    (ddpm_dipnoise, ["experiment=dipnoise/time_vs_steps", "eps_net.image_size=32"], "eps_net.image_size"),
    (ddpm_dipnoise, ["experiment=dipnoise/time_vs_steps", "method.steps=1001"], "method.steps"),
    (ddpm_dipnoise, ["experiment=dipnoise/time_vs_steps", "method.dip_bn_mode=frozen"], "method.dip_bn_mode"),
    (ddpm_dipnoise, ["experiment=dipnoise/time_vs_steps", "method.dip.size=30"], "method.dip.size"),
    (ddpm_dipnoise, ["experiment=dipnoise/time_vs_steps", "method.dip_passes=-1"], "method.dip_passes"),
])
def test_bad_config_is_a_config_error_before_training(module, overrides, key):
    with pytest.raises(ConfigError) as error:
        module.validate(composed(*overrides))
    assert error.value.key == key


def test_experiment_configs_are_valid_and_describe_their_plan():
    """The plans of configs after apply_profile (quick: steps, iterations and chains as written, 32 samples)."""
    cfg = apply_profile(composed("experiment=truncated/schedule_length", "scheduler.num_timesteps=501",
                                 "profile=quick"))
    ddpm_single.validate(cfg)
    _, plan = ddpm_single.describe(cfg)
    assert plan == {"x0_source": "dip", "dip_steps": 2000, "train_iterations": 3000, "t_max": 500,
                    "num_timesteps": 501, "t_start": 500, "model_calls": 501, "num_samples": 32}
    assert cfg.backbone.hidden == [64, 64, 1] and cfg.eps_net.name == "unet_res"
    cfg = apply_profile(composed("experiment=dipnoise/time_vs_steps", "profile=quick", "method.steps=300"))
    ddpm_dipnoise.validate(cfg)
    _, plan = ddpm_dipnoise.describe(cfg)
    # R4's 20 epochs of ceil(5000 / 128) = 40 iterations on the bundled digits; its 200-step DIP
    assert plan["chain_steps"] == 300 and plan["train_iterations"] == 20 * 40 and plan["dip_steps"] == 200
    assert ddpm_single.clean_image_uses(composed("experiment=truncated/dip_vs_clean", "method.x0_source=clean"))
    assert not ddpm_single.clean_image_uses(composed("experiment=truncated/dip_vs_clean"))


def test_r3_experiments_add_no_noise_at_t_1_and_the_default_only_at_t_0():
    """R3's code drew z only for t > 1 (method.sample.noise_until: 1 in truncated/*); the method's
    default is the standard DDPM rule (noise for t > 0)."""
    r3 = {name: composed(f"experiment=truncated/{name}") for name in ("dip_vs_clean", "schedule_length")}
    assert all(sample_options(cfg.method.sample)["noise_until"] == 1 for cfg in r3.values())
    assert composed("method=ddpm_single").method.sample.noise_until == 0
    schedule = linear_schedule(10, 1e-4, 0.02)
    for until in (sample_options(r3["dip_vs_clean"].method.sample)["noise_until"], 0):
        draws = []
        sample(CountingEps(), schedule, (1, 1, 4, 4), t_start=4, noise_until=until,
               noise_fn=lambda shape: draws.append(shape) or torch.zeros(shape))
        assert len(draws) == 1 + 4 - until  # x_T, then one z at each t = 4 .. until + 1
        start = torch.full((2, 1, 4, 4), 0.3)
        last = [sample(CountingEps(), schedule, start, t_start=until, noise_until=until,
                       generator=torch.Generator().manual_seed(seed)).samples for seed in (0, 1)]
        assert torch.equal(last[0], last[1])  # the steps t <= until draw nothing
        one_more = [sample(CountingEps(), schedule, start, t_start=until + 1, noise_until=until,
                           generator=torch.Generator().manual_seed(seed)).samples for seed in (0, 1)]
        assert not torch.equal(one_more[0], one_more[1])


def test_r4_can_run_ddim_over_the_whole_chain_in_its_steps():
    """method.sample.sampler=ddim with t_start=T-1: DDIM at R4's number of network calls."""
    cfg = composed("experiment=dipnoise/time_vs_steps", "profile=quick", "method.steps=100",
                   "method.sample.sampler=ddim", "method.sample.t_start=999")
    ddpm_dipnoise.validate(cfg)
    _, plan = ddpm_dipnoise.describe(cfg)
    assert plan["chain_steps"] == 100 and plan["t_start"] == 999 and plan["sampler"] == "ddim"
    schedule = linear_schedule(50, 1e-4, 0.02)
    model = CountingEps()
    seen = []
    model.forward = lambda x, t, f=model.forward: seen.append(int(t[0])) or f(x, t)
    ours = ddpm_dipnoise.sample_with_dip(model, schedule, 2, 7, passes=0, side=4, t_start=49,
                                         generator=torch.Generator().manual_seed(3), **sample_options(cfg.method.sample))
    assert ours.model_calls == 7 and seen == chain_timesteps(49, 7) == [49, 41, 33, 24, 16, 8, 0]
    plain = sample(CountingEps(), schedule, (2, 1, 4, 4), sampler="ddim", t_start=49, calls=7,
                   generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours.samples, plain.samples)


def sweep_jobs(experiment: str, *overrides: str) -> list[dict]:
    """The jobs Hydra's basic sweeper makes from an experiment's hydra.sweeper.params, each as
    {key: value text}."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", *overrides], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    (jobs,) = BasicSweeper.split_arguments(parsed, None)
    return [dict(item.split("=", 1) for item in job) for job in jobs]


R4_ROWS = {  # r4_row -> (DIP passes, sampler, t_start of a chain of s calls, x0 clipped)
    "ddpm": (0, "ancestral", lambda s: s - 1, False),
    "dip_ddpm": (2, "ancestral", lambda s: s - 1, False),
    "ddim": (0, "ddim", lambda s: 999, True),
}


def test_t41_sweeps_ddpm_dip_and_ddim_rows_at_equal_network_calls():
    """Issue 14 item 4: T4.1 has a DDIM row (no DIP, t = 999 .. 0) beside each truncated-chain row,
    with as many network calls as the truncated chain has steps, for every chain length."""
    jobs = sweep_jobs("dipnoise/time_vs_steps", "seeds=2")
    steps = list(range(100, 1001, 100))
    assert sorted((j["seed"], j["r4_row"], int(j["method.steps"])) for j in jobs) == sorted(
        (str(seed), row, s) for seed in range(2) for row in R4_ROWS for s in steps)
    for row, (passes, sampler, t_start, clipped) in R4_ROWS.items():
        for s in (100, 700):
            cfg = composed("experiment=dipnoise/time_vs_steps", "profile=quick", f"r4_row={row}", f"method.steps={s}")
            ddpm_dipnoise.validate(cfg)
            _, plan = ddpm_dipnoise.describe(cfg)
            assert (plan["dip_passes"], plan["sampler"], plan["t_start"], plan["chain_steps"]) == (
                passes, sampler, t_start(s), s)
            assert cfg.method.sample.eta == 0.0 and cfg.method.train.seed == 0
            assert sample_options(cfg.method.sample).get("clip_x0", False) is clipped
    spec = OmegaConf.to_container(composed("experiment=dipnoise/time_vs_steps").table)
    assert spec["rows"] == ["r4_row"] and spec["labels"]["r4_row"]["ddim"] == "DDIM (same calls)"
    assert {"frechet", "confidence", "sample_seconds"} <= set(spec["values"])
    versus_ddim = [c for c in spec["claims"] if c["worse"].get("r4_row") == "ddim"]
    assert {(c["better"]["r4_row"], c["metric"], c["better"]["method.steps"]) for c in versus_ddim} >= {
        ("dip_ddpm", "frechet", 100), ("dip_ddpm", "confidence", 100)}


@pytest.mark.slow
def test_t41_ddim_rows_load_the_ddpm_the_truncated_rows_trained(tmp_path, classifier_files):
    """In a T4.1 sweep the DDPM is trained once; the DDIM jobs load that checkpoint and make as
    many network calls as the truncated chains of the same length."""
    cache = fresh_cache(tmp_path, classifier_files)
    sweep, results = run_sweep("dipnoise/time_vs_steps", tmp_path, cache, ["method.steps=100,1000"])
    by_row = {(r["overrides"]["r4_row"], r["config"]["method.steps"]): r for r in results}
    assert sorted(by_row) == sorted((row, s) for row in R4_ROWS for s in (100, 1000))
    assert all(r["status"] == "ok" for r in results)
    assert sum(r["metrics"]["ddpm_trained_now"] for r in results) == 1
    eps_nets = [p for p in cache.glob("*.json") if json.loads(p.read_text()).get("config", {}).get("kind") == "eps_net"]
    assert len(eps_nets) == 1
    for s in (100, 1000):
        ddim, truncated = by_row["ddim", s], by_row["ddpm", s]
        assert ddim["config"]["method.sample.sampler"] == "ddim" and ddim["config"]["method.sample.t_start"] == 999
        assert ddim["config"]["method.dip_passes"] == 0 and "dip_trained_now" not in ddim["metrics"]
        assert ddim["metrics"]["model_calls"] == truncated["metrics"]["model_calls"] == expected_calls(truncated)
        assert by_row["dip_ddpm", s]["metrics"]["model_calls"] == expected_calls(truncated)
        for row in R4_ROWS:
            metrics = by_row[row, s]["metrics"]
            assert 0.0 <= metrics["confidence"] <= 1.0 and metrics["frechet"] >= 0.0 and metrics["sample_seconds"] > 0
    assert "DDIM (same calls)" in (sweep / "table.md").read_text()
