"""Issue 14: honest rows (no clean image for targets, stopping or stage images) and runs
that collapse to a constant image, recorded as such."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import composed, run_train
from omegaconf import OmegaConf

from dipddpm.diffusion.schedule import build_schedule
from dipddpm.dip import DipSettings, Stage, fit_dip, is_collapsed
from dipddpm.errors import ConfigError
from dipddpm.methods import dip
from dipddpm.models import build_backbone
from dipddpm.plans import build_plan, stage_images

CONF = Path(__file__).resolve().parents[1] / "conf"
R1_EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment" / "staged").glob("*.yaml"))
R1_MULTI_STAGE = [name for name in R1_EXPERIMENTS if name != "depth_traditional"]


def _observation(sigma: float, side: int = 64, seed: int = 0):
    """A mid-grey clean image (no clipping anywhere near) and its noisy observation."""
    generator = torch.Generator().manual_seed(seed)
    clean = torch.full((1, 3, side, side), 0.5)
    return clean, clean + sigma * torch.randn(clean.shape, generator=generator)


# ---------------------------------------------------------------- honest R1 stages

def test_honest_levels_add_the_missing_noise_on_top_of_the_observation():
    s_obs = 0.1
    clean, observed = _observation(s_obs)
    noise = OmegaConf.merge(OmegaConf.load(CONF / "noise_plan" / "gradual.yaml"),
                            {"stage_source": "observation", "clip": False})
    plan = build_plan(noise, {"name": "constant", "steps": 5}, observation_sigma=s_obs)
    assert [stage.sigma for stage in plan] == pytest.approx([0.4, 0.2, 0.1])
    images = stage_images(plan, clean, observed, noise, None, torch.Generator().manual_seed(1),
                          observation_sigma=s_obs)
    # 3 * 64 * 64 draws: the sample std is within about 0.6% (one sigma) of the true one
    for image, total in zip(images[:2], (0.4, 0.2)):
        added = float((image - observed).std())
        assert added == pytest.approx(math.sqrt(total**2 - s_obs**2), rel=0.03)
        assert float((image - clean).std()) == pytest.approx(total, rel=0.03)
    assert torch.equal(images[2], observed)
    # nothing is drawn from the clean image: another clean image gives the same stages
    again = stage_images(plan, torch.rand(clean.shape), observed, noise, None, torch.Generator().manual_seed(1),
                         observation_sigma=s_obs)
    assert all(torch.equal(a, b) for a, b in zip(images, again))


def test_honest_levels_are_clipped_like_the_reports_and_validated():
    clean, observed = _observation(0.1, side=8)
    noise = OmegaConf.merge(OmegaConf.load(CONF / "noise_plan" / "fast.yaml"), {"stage_source": "observation"})
    plan = build_plan(noise, {"name": "constant", "steps": 1}, observation_sigma=0.1)
    images = stage_images(plan, clean, observed.clamp(0, 1), noise, None, torch.Generator().manual_seed(0),
                          observation_sigma=0.1)
    assert images[0].min() == 0 and images[0].max() == 1  # sigma 0.9 around 0.5: clipped on both sides
    with pytest.raises(ConfigError, match="noise_plan.observation_factors"):
        build_plan(OmegaConf.merge(noise, {"observation_factors": [2, 0.5]}), {"name": "constant", "steps": 1},
                   observation_sigma=0.1)
    with pytest.raises(ConfigError, match="noise_plan.stage_source"):
        build_plan(OmegaConf.merge(noise, {"stage_source": "photo"}), {"name": "constant", "steps": 1})
    with pytest.raises(ConfigError, match="data.sigma"):
        build_plan(noise, {"name": "constant", "steps": 1})


# ---------------------------------------------------------------- honest R2 stages

def test_honest_ddpm_stages_diffuse_the_observation_further():
    cfg = composed("experiment=guided/backbone_scheduler", "curriculum=r2_guided_linear_honest",
                   "noise_plan.count=3")
    schedule = build_schedule(cfg.scheduler)
    plan = build_plan(cfg.noise_plan, {"name": "constant", "steps": 1}, schedule)
    assert [stage.t for stage in plan] == [500, 270, 40]
    clean = torch.rand((1, 3, 4, 4), generator=torch.Generator().manual_seed(2))
    images = stage_images(plan, clean, clean, cfg.noise_plan, schedule, torch.Generator().manual_seed(9))

    # independent: numpy's linear betas and abar = cumprod(1 - beta); R2's shifted eps 0.5 + 0.5 N(0, 1)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    generator = torch.Generator().manual_seed(9)
    eps = [(0.5 + 0.5 * torch.randn((1, 3, 4, 4), generator=generator)).double().numpy() for _ in range(3)]
    x0 = clean.double().numpy()
    y = math.sqrt(abar[40]) * x0 + math.sqrt(1 - abar[40]) * eps[0]
    for image, t, e in zip(images[:2], (500, 270), eps[1:]):
        expected = math.sqrt(abar[t] / abar[40]) * y + math.sqrt(1 - abar[t] / abar[40]) * e
        np.testing.assert_allclose(image.double().numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(images[2].double().numpy(), y, atol=1e-5)


def test_honest_guided_cosine_ends_on_r2s_dip_target():
    clean = torch.rand((1, 3, 8, 8), generator=torch.Generator().manual_seed(4))
    last = {}
    for curriculum in ("r2_dip", "r2_guided_cosine_honest"):
        cfg = composed("experiment=guided/backbone_scheduler", f"curriculum={curriculum}")
        schedule = build_schedule(cfg.scheduler)
        plan = build_plan(cfg.noise_plan, cfg.epoch_plan, schedule)
        images = stage_images(plan, clean, clean, cfg.noise_plan, schedule, torch.Generator().manual_seed(0))
        last[curriculum] = images[-1]
    assert torch.equal(last["r2_dip"], last["r2_guided_cosine_honest"])


# ---------------------------------------------------------------- uses_clean_image

@pytest.mark.parametrize("name", R1_MULTI_STAGE)
def test_r1_honest_rows_use_no_clean_image(name):
    cfg = composed(f"experiment=staged/{name}", "variant=honest")
    assert cfg.noise_plan.stage_source == "observation"
    assert dip.clean_image_uses(cfg) == []
    plan = dip.stage_plan(cfg)
    assert plan[-1].sigma == cfg.data.sigma and all(stage.sigma >= cfg.data.sigma for stage in plan)
    classic = composed(f"experiment=staged/{name}", "variant=classic")
    assert dip.clean_image_uses(classic) == ["stage images synthesised from it"]


def test_r1_honest_rows_feed_the_stage_image_in_and_fit_the_observation():
    """R1's network sees each stage's noisy image; the honest row keeps that input and trains
    towards the observation, the only image a user has (a random code into R1's plain CNN
    cannot represent an image: 11-12 dB measured at T1.6's size)."""
    cfg = composed("experiment=staged/levels_200", "variant=honest", "noise_plan=gradual")
    clean, observed = _observation(0.1, side=8)
    plan = dip.stage_plan(cfg)
    images = stage_images(plan, clean, observed, cfg.noise_plan, None, torch.Generator().manual_seed(0),
                          observation_sigma=0.1)
    ctx = SimpleNamespace(seed=0, device="cpu", generator=lambda: torch.Generator().manual_seed(0))
    _, stages, _, _ = dip._prepare(cfg, ctx, plan, images, torch.rand(clean.shape), observed)
    assert [s.net_input is image for s, image in zip(stages, images)] == [True] * 3
    assert all(s.target is observed for s in stages)
    assert not torch.equal(stages[0].net_input, observed) and torch.equal(stages[-1].net_input, observed)


@pytest.mark.parametrize("curriculum", ["r2_dip", "r2_guided_linear_honest", "r2_guided_cosine_honest"])
def test_r2_honest_rows_use_no_clean_image(curriculum):
    cfg = composed("experiment=guided/backbone_scheduler", f"curriculum={curriculum}")
    assert dip.clean_image_uses(cfg) == []
    guided = composed("experiment=guided/backbone_scheduler", "curriculum=r2_guided_cosine")
    assert dip.clean_image_uses(guided) == ["stage images synthesised from it"]


def _sweep(name: str) -> dict:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
    return cfg, OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=False)


@pytest.mark.parametrize("name", R1_EXPERIMENTS)
def test_r1_tables_have_five_seeds_honest_rows_and_the_lr_deviation(name):
    cfg, params = _sweep(f"staged/{name}")
    assert cfg.seeds == 5
    assert params["optim.lr"] == "0.005,0.001"
    assert cfg.table.labels["optim.lr"][0.001] == "lr 0.001 (deviation)"
    assert "optim.lr" in cfg.table.rows
    variants = params["variant"].split(",")
    assert ("honest" in variants) == (name in R1_MULTI_STAGE)


def test_r2_table_has_the_honest_rows():
    cfg, params = _sweep("guided/backbone_scheduler")
    assert {"r2_guided_linear_honest", "r2_guided_cosine_honest"} <= set(params["curriculum"].split(","))
    assert "honest" in cfg.table.labels.curriculum.r2_guided_cosine_honest


# ---------------------------------------------------------------- collapse

def test_is_collapsed_ignores_the_padding_border_and_saturated_good_outputs():
    target = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    constant = torch.full((1, 3, 16, 16), 0.45)
    constant[..., 0, :] = 0.3  # the border a dead net's padding leaves
    loss = float(((constant - target) ** 2).mean())
    assert is_collapsed(constant, loss, target)
    learned = target + 0.01 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    assert not is_collapsed(learned.clamp(0, 1), 1e-4, target)
    white = torch.ones((1, 3, 16, 16))
    white[..., :4, :4] = 0.0  # a mostly white page, denoised well: MAD 0, loss tiny
    assert not is_collapsed(white, 1e-4, white)


def _cnn(seed: int):
    torch.manual_seed(seed)
    return build_backbone(OmegaConf.create({"name": "cnn", "depth": 3}), 3, 3)


def test_a_net_with_dead_relus_is_collapsed_and_a_live_one_is_not():
    clean = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    stage = Stage(index=0, steps=20, net_input=clean, target=clean)
    settings = DipSettings(lr=0.001, eval_every=10)
    dead = _cnn(0)
    with torch.no_grad():
        dead[0].bias.fill_(-100.0)  # every first-layer ReLU is off for inputs in [0, 1]: no gradient reaches it
    assert fit_dip(dead, [stage], settings, clean=clean).collapsed
    assert not fit_dip(_cnn(0), [stage], settings, clean=clean).collapsed


R1_COLLAPSING = ["-m", "experiment=staged/traditional_vs_staged", "curriculum=r1_traditional", "variant=report",
                 "data.size=32", "epoch_plan.steps=60", "eval_every=10", "seed=3", "optim.lr=0.005,0.001", "threads=1"]


def test_r1_setup_that_collapses_is_recorded_as_collapsed_kept_and_resumed(tmp_path):
    """R1's own setup (4-layer CNN, default init, Adam 0.005) collapses for seed 3 at 32 px; lr 0.001 learns.
    A collapsed job keeps its metrics, is not a failure of the sweep, and a rerun skips it."""
    proc = run_train(*R1_COLLAPSING, f"output_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    paths = {json.loads(p.read_text())["config"]["optim.lr"]: p for p in tmp_path.rglob("result.json")}
    collapsed, learned = (json.loads(paths[lr].read_text()) for lr in (0.005, 0.001))
    assert collapsed["status"] == "collapsed" and collapsed["error"] is None
    assert collapsed["metrics"]["collapsed"] is True
    assert collapsed["metrics"]["psnr_final"] < 13 < collapsed["metrics"]["psnr_noisy_input"]
    assert learned["status"] == "ok" and learned["metrics"]["collapsed"] is False
    assert learned["metrics"]["psnr_final"] > 20

    again = run_train(*R1_COLLAPSING, f"output_root={tmp_path}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (again.stdout + again.stderr).count("complete result for this config") == 2
    assert json.loads(paths[0.005].read_text())["finished"] == collapsed["finished"]
