import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dipddpm.diffusion.schedule import NoiseSchedule, build_schedule, cosine_schedule, linear_schedule
from dipddpm.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "scheduler"


def cosine_abar_by_hand(t_index: int, total: int, s: float = 0.008) -> float:
    """abar after step t_index (0-based) of an unclipped cosine schedule."""
    def f(step):
        return math.cos(((step / total + s) / (1 + s)) * math.pi / 2) ** 2
    return f(t_index + 1) / f(0)


def test_linear_endpoints_length_and_dtype():
    schedule = linear_schedule(10, 1e-4, 0.02)
    assert schedule.num_timesteps == 10 and len(schedule.betas) == 10
    assert schedule.betas.dtype == torch.float64
    assert schedule.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert schedule.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert schedule.betas[1].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / 9, rel=1e-12)
    expected_abar2 = (1 - 1e-4) * (1 - schedule.betas[1].item()) * (1 - schedule.betas[2].item())
    assert schedule.alphas_cumprod[2].item() == pytest.approx(expected_abar2, rel=1e-12)
    assert schedule.alphas_cumprod_prev[0].item() == 1.0
    assert schedule.alphas_cumprod_prev[3].item() == schedule.alphas_cumprod[2].item()


def test_cosine_alphas_cumprod_matches_formula():
    total = 1000
    schedule = cosine_schedule(total)
    for t in (0, 1, 250, 500, 900):
        assert schedule.alphas_cumprod[t].item() == pytest.approx(
            cosine_abar_by_hand(t, total), rel=1e-9)
    assert schedule.betas.max().item() == pytest.approx(0.999)
    first_beta = 1 - cosine_abar_by_hand(0, total)
    assert schedule.betas[0].item() == pytest.approx(first_beta, rel=1e-9)


def test_cosine_min_beta_clips_small_betas():
    total = 1000
    unclipped = cosine_schedule(total)
    clipped = cosine_schedule(total, min_beta=1e-4)
    small = unclipped.betas < 1e-4
    assert small.any()
    assert torch.all(clipped.betas >= 1e-4)
    assert torch.all(clipped.betas[small] == 1e-4)
    assert torch.equal(clipped.betas[~small], unclipped.betas[~small])
    recomputed = torch.cumprod(1 - clipped.betas, 0)
    assert torch.allclose(clipped.alphas_cumprod, recomputed, rtol=0, atol=0)


def test_q_sample_three_step_schedule():
    schedule = NoiseSchedule(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    abar = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7]
    x0 = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float32).reshape(1, 1, 2, 2)
    noise = torch.tensor([1.0, -1.0, 0.5, 0.0]).reshape(1, 1, 2, 2)
    out = schedule.q_sample(x0, 2, noise)
    expected = math.sqrt(abar[2]) * x0 + math.sqrt(1 - abar[2]) * noise
    assert out.dtype == torch.float32 and out.shape == x0.shape
    assert torch.allclose(out, expected, atol=1e-7)

    batch = torch.cat([x0, x0], 0)
    noises = torch.cat([noise, noise], 0)
    out = schedule.q_sample(batch, torch.tensor([0, 1]), noises)
    for row, t in enumerate((0, 1)):
        hand = math.sqrt(abar[t]) * x0[0] + math.sqrt(1 - abar[t]) * noise[0]
        assert torch.allclose(out[row], hand, atol=1e-7)

    variance_t1 = 0.2 * (1 - 0.9) / (1 - 0.72)
    assert schedule.posterior_variance[1].item() == pytest.approx(variance_t1, rel=1e-12)
    assert schedule.posterior_variance[0].item() == 0.0


def test_q_sample_rejects_out_of_range_t():
    schedule = NoiseSchedule(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    with pytest.raises(IndexError):
        schedule.q_sample(torch.zeros(1, 1, 2, 2), 3, torch.zeros(1, 1, 2, 2))


def test_build_schedule_from_yaml_files():
    linear = build_schedule(OmegaConf.load(CONF / "linear.yaml"))
    assert linear.num_timesteps == 1000
    assert linear.betas[-1].item() == pytest.approx(0.02)
    cosine = build_schedule(OmegaConf.load(CONF / "cosine.yaml"))
    assert cosine.alphas_cumprod[499].item() == pytest.approx(
        cosine_abar_by_hand(499, 1000), rel=1e-9)


@pytest.mark.parametrize("override, key", [
    ({"name": "sigmoid"}, "scheduler.name"),
    ({"num_timesteps": 0}, "scheduler.num_timesteps"),
    ({"beta_start": 0.0}, "scheduler.beta_start"),
    ({"beta_start": 0.03}, "scheduler.beta_end"),
    ({"beta_end": 1.0}, "scheduler.beta_end"),
])
def test_build_schedule_rejects_bad_values(override, key):
    cfg = {"name": "linear", "num_timesteps": 10, "beta_start": 1e-4, "beta_end": 0.02}
    cfg.update(override)
    with pytest.raises(ConfigError) as info:
        build_schedule(cfg)
    assert info.value.key == key and key in str(info.value)


def test_to_keeps_values():
    schedule = linear_schedule(4, 0.1, 0.4).to("cpu")
    assert schedule.num_timesteps == 4
    assert torch.allclose(schedule.betas, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
