import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dipddpm.diffusion.schedule import build_schedule, cosine_schedule, linear_schedule
from dipddpm.errors import ConfigError
from dipddpm.plans import (
    StagePlan,
    build_plan,
    describe_plan,
    softmax_beta_steps,
    stage_images,
    time_steps,
)

CONF = Path(__file__).resolve().parents[1] / "conf"

# numpy.linspace(500, 40, 20) truncated; the step is -460/19 = -24.2105...
R2_TIMES = [500, 475, 451, 427, 403, 378, 354, 330, 306, 282,
            257, 233, 209, 185, 161, 136, 112, 88, 64, 40]
R2_COSINE_STEPS = [49, 54, 58, 63, 68, 73, 79, 84, 89, 94,
                   100, 106, 112, 118, 124, 130, 137, 144, 151, 167]
R2_LINEAR_STEPS = [25, 28, 32, 36, 40, 46, 52, 58, 66, 74,
                   84, 95, 107, 120, 136, 154, 174, 196, 220, 257]


def load(group, name, **extra):
    cfg = OmegaConf.load(CONF / group / f"{name}.yaml")
    if extra:
        cfg = OmegaConf.merge(extra, cfg)
    return cfg


def test_time_steps_match_r2():
    assert time_steps(20, 500, 40) == R2_TIMES
    step = (40 - 500) / 19
    assert time_steps(20, 500, 40) == [int(500 + i * step) for i in range(20)]
    assert time_steps(6, 500, 0) == [500, 400, 300, 200, 100, 0]


def test_softmax_beta_split_by_hand():
    betas = [0.02, 0.01, 0.0]
    weights = [math.exp(-100 * b) for b in betas]
    first = [int(10 * w / sum(weights)) for w in weights[:2]]
    assert softmax_beta_steps(betas, 10, 100) == first + [10 - sum(first)]


def softmax_epoch(scheduler: str):
    """epoch_plan/softmax_beta.yaml with c resolved as it is when composed with ``scheduler``."""
    epoch = load("epoch_plan", "softmax_beta")
    epoch.c = epoch.c_by_schedule[scheduler]
    return epoch


def test_softmax_c_lives_in_the_epoch_plan_with_r2s_default_per_schedule():
    from conftest import composed

    assert composed("epoch_plan=softmax_beta", "noise_plan=ddpm").epoch_plan.c == 250
    assert composed("epoch_plan=softmax_beta", "noise_plan=ddpm", "scheduler=cosine").epoch_plan.c == 400
    assert composed("epoch_plan=softmax_beta", "epoch_plan.c=100").epoch_plan.c == 100
    for name in ("linear", "cosine"):
        assert "softmax_c" not in load("scheduler", name)


def test_softmax_beta_cosine_reproduces_r2():
    plan = build_plan(load("noise_plan", "ddpm"), softmax_epoch("cosine"),
                      schedule=build_schedule(load("scheduler", "cosine")))
    assert [s.t for s in plan] == R2_TIMES
    assert [s.steps for s in plan] == R2_COSINE_STEPS
    assert sum(s.steps for s in plan) == 2000
    r2_clipped = cosine_schedule(1000, min_beta=1e-4)
    betas = [r2_clipped.betas[t].item() for t in R2_TIMES]
    assert softmax_beta_steps(betas, 2000, 400) == R2_COSINE_STEPS


def test_softmax_beta_linear_reproduces_r2():
    epoch = OmegaConf.merge(load("epoch_plan", "softmax_beta"), {"c": 250})
    plan = build_plan(load("noise_plan", "ddpm"), epoch,
                      schedule=build_schedule(load("scheduler", "linear")))
    assert [s.steps for s in plan] == R2_LINEAR_STEPS
    hand_betas = [1e-4 + t * (0.02 - 1e-4) / 999 for t in R2_TIMES]
    assert softmax_beta_steps(hand_betas, 2000, 250) == R2_LINEAR_STEPS


def test_softmax_beta_floor_and_requirements():
    schedule = linear_schedule(1000, 1e-4, 0.02)
    epoch = OmegaConf.merge(softmax_epoch("linear"), {"total": 20, "min_steps": 2})
    plan = build_plan(load("noise_plan", "ddpm"), epoch, schedule=schedule)
    betas = [schedule.betas[t].item() for t in R2_TIMES]
    expected = [max(2, n) for n in softmax_beta_steps(betas, 20, 250)]
    assert [s.steps for s in plan] == expected and min(expected) == 2
    with pytest.raises(ConfigError) as info:
        build_plan(load("noise_plan", "ddpm"), OmegaConf.merge(epoch, {"c": None}), schedule=schedule)
    assert info.value.key == "epoch_plan.c"
    with pytest.raises(ConfigError) as info:
        build_plan(load("noise_plan", "gradual"), epoch, schedule=schedule)
    assert info.value.key == "epoch_plan.name" and "ddpm" in info.value.allowed


def test_levels_presets_and_constant_plan():
    expected = {"levels": [0.1], "gradual": [0.1, 0.05, 0.025], "fast": [0.1, 0.01, 0.001],
                "slow": [0.1, 0.09, 0.08], "slow_075": [0.1, 0.075, 0.05]}
    epoch = load("epoch_plan", "constant", method={"steps": 300})
    for name, sigmas in expected.items():
        noise = load("noise_plan", name)
        assert noise.name == "levels" and noise.clip is True
        plan = build_plan(noise, epoch)
        assert [s.sigma for s in plan] == sigmas
        assert [s.steps for s in plan] == [300] * len(sigmas)
        assert [s.index for s in plan] == list(range(len(sigmas)))


def test_list_plan_length_mismatch_names_key():
    noise = load("noise_plan", "gradual")
    epoch = OmegaConf.merge(load("epoch_plan", "list"), {"steps": [200, 200]})
    with pytest.raises(ConfigError) as info:
        build_plan(noise, epoch)
    assert "epoch_plan.steps" in str(info.value)
    assert "3 step counts" in str(info.value) and "noise_plan=levels" in str(info.value)


@pytest.mark.parametrize("noise, key", [
    ({"name": "levels", "sigmas": [0.1, 1.5]}, "noise_plan.sigmas"),
    ({"name": "levels", "sigmas": []}, "noise_plan.sigmas"),
    ({"name": "staged"}, "noise_plan.name"),
    ({"name": "ddpm", "count": 3, "start_t": 1000, "end_t": 40}, "noise_plan.start_t"),
    ({"name": "ddpm", "count": 3, "start_t": 40, "end_t": 500}, "noise_plan.end_t"),
    ({"name": "ddpm", "count": 3, "start_t": 50, "end_t": 5, "noise": "uniform"},
     "noise_plan.noise"),
])
def test_bad_noise_plans_raise(noise, key):
    with pytest.raises(ConfigError) as info:
        build_plan(noise, {"name": "constant", "steps": 5}, schedule=linear_schedule(1000, 1e-4, 0.02))
    assert info.value.key == key


def test_single_plan_with_and_without_t():
    epoch = load("epoch_plan", "constant", method={"steps": 2000})
    plan = build_plan(load("noise_plan", "single"), epoch)
    assert plan == [StagePlan(index=0, steps=2000)]
    with_t = OmegaConf.merge(load("noise_plan", "single"), {"t": 40})
    plan = build_plan(with_t, epoch, schedule=linear_schedule(1000, 1e-4, 0.02))
    assert plan[0].as_dict() == {"index": 0, "steps": 2000, "sigma": None, "t": 40}


def test_stage_images_levels_clip_and_reproducible_draws():
    clean = torch.full((1, 3, 4, 5), 0.95)
    observed = clean.clone()
    noise = load("noise_plan", "fast")
    plan = build_plan(noise, {"name": "constant", "steps": 3})
    images = stage_images(plan, clean, observed, noise, None, torch.Generator().manual_seed(3))
    again = stage_images(plan, clean, observed, noise, None, torch.Generator().manual_seed(3))
    assert len(images) == 3
    for image, repeat in zip(images, again):
        assert image.shape == (1, 3, 4, 5) and image.dtype == torch.float32
        assert torch.equal(image, repeat)
        assert image.min() >= 0 and image.max() <= 1
    assert images[0].max() == 1.0
    generator = torch.Generator().manual_seed(3)
    draws = [torch.randn((1, 3, 4, 5), generator=generator) for _ in range(3)]
    for image, sigma, draw in zip(images, (0.1, 0.01, 0.001), draws):
        assert torch.allclose(image, (clean + sigma * draw).clamp(0, 1))
    assert not torch.allclose(draws[1], draws[2])


def test_stage_images_ddpm_and_single():
    schedule = linear_schedule(1000, 1e-4, 0.02)
    clean = torch.rand((1, 1, 3, 3), generator=torch.Generator().manual_seed(0))
    observed = torch.rand((1, 1, 3, 3), generator=torch.Generator().manual_seed(1))
    noise = {"name": "ddpm", "count": 2, "start_t": 500, "end_t": 40, "noise": "shifted",
             "clip": False}
    plan = build_plan(noise, {"name": "list", "steps": [1, 1]}, schedule=schedule)
    images = stage_images(plan, clean, observed, noise, schedule, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    for image, t in zip(images, (500, 40)):
        eps = 0.5 + 0.5 * torch.randn((1, 1, 3, 3), generator=generator)
        abar = math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(t + 1))
        hand = math.sqrt(abar) * clean + math.sqrt(1 - abar) * eps
        assert image.dtype == torch.float32 and torch.allclose(image, hand, atol=1e-5)

    single = load("noise_plan", "single")
    plan = build_plan(single, {"name": "constant", "steps": 4})
    (image,) = stage_images(plan, clean, observed, single, None, None)
    assert torch.equal(image, observed)


def test_describe_plan_table():
    plan = [StagePlan(0, 49, t=500), StagePlan(1, 151, t=40), StagePlan(2, 10, sigma=0.05)]
    lines = describe_plan(plan).splitlines()
    assert len(lines) == 4
    assert lines[1].split() == ["0", "500", "-", "49", "49"]
    assert lines[2].split() == ["1", "40", "-", "151", "200"]
    assert lines[3].split() == ["2", "-", "0.05", "10", "210"]
    assert len({len(line) for line in lines}) == 1
