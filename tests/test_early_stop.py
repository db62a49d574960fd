import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dipddpm.early_stop import (Discrepancy, PsnrPatience, WindowedVariance, build_early_stop, clipped_noise_variance,
                                 noise_sigma, validate_early_stop)
from dipddpm.errors import ConfigError


def stop_index(rule, sequence):
    """Feed psnr values at checks 0, 1, 2, ...; return the check index where the rule stops."""
    rule.start_stage(0)
    for index, value in enumerate(sequence):
        if rule.check(index, value):
            return index
    return None


def expected_stop(sequence, patience, min_delta, reset):
    """Independent statement of report R1's rule."""
    best, count = -math.inf, 0
    for index, value in enumerate(sequence):
        if value - best >= min_delta:
            best = value
            if reset:
                count = 0
        else:
            count += 1
        if count >= patience:
            return index
    return None


def test_r1_rule_cumulative_counter_stops_at_patience_non_improvements():
    # improves at checks 0..4, flat after: with a cumulative counter and patience 3 the
    # 3rd non-improvement (check 7) stops.
    seq = [10, 11, 12, 13, 14, 14, 14, 14, 14, 14]
    rule = PsnrPatience(every=10, patience=3, min_delta=0.001, reset_on_improve=False, carry_best=True)
    assert stop_index(rule, seq) == 7 == expected_stop(seq, 3, 0.001, False)


def test_r1_rule_reset_vs_cumulative_differ():
    # alternating flat/improving: the cumulative counter reaches 3 early, the reset one never does
    seq = [10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15]
    cumulative = PsnrPatience(1, 3, 0.001, reset_on_improve=False, carry_best=True)
    resetting = PsnrPatience(1, 3, 0.001, reset_on_improve=True, carry_best=True)
    assert stop_index(cumulative, seq) == 5 == expected_stop(seq, 3, 0.001, False)
    assert stop_index(resetting, seq) is None
    assert expected_stop(seq, 3, 0.001, True) is None


def test_r1_rule_min_delta_counts_tiny_gains_as_no_improvement():
    seq = [10, 10.0005, 10.0009, 10.0012]
    rule = PsnrPatience(1, 2, 0.001, reset_on_improve=True, carry_best=True)
    assert stop_index(rule, seq) == 2


def test_best_carries_across_stages_but_counter_restarts():
    rule = PsnrPatience(1, 2, 0.001, reset_on_improve=False, carry_best=True)
    assert stop_index(rule, [20, 19]) is None  # one miss
    rule.start_stage(1)
    assert rule.count == 0 and rule.best == 20
    assert not rule.check(0, 19.5)  # below the carried best: a miss
    assert rule.check(1, 19.6)
    fresh = PsnrPatience(1, 2, 0.001, reset_on_improve=False, carry_best=False)
    stop_index(fresh, [20])
    fresh.start_stage(1)
    assert fresh.best == -math.inf


def test_wmv_stops_patience_steps_after_the_variance_minimum():
    # outputs: noisy (high variance), then a calm stretch (steps 20..39), then noisy again
    torch.manual_seed(0)
    rule = WindowedVariance(window=5, patience=10)
    stopped_at = None
    for step in range(80):
        amplitude = 0.001 if 20 <= step < 40 else 0.3
        output = torch.full((1, 1, 4, 4), 0.5) + amplitude * torch.randn(1, 1, 4, 4)
        rule.observe(step, output)
        if rule.check(step):
            stopped_at = step
            break
    min_step, _ = rule.minimum()
    # the window [min_step-4, min_step] is inside the calm stretch
    assert 24 <= min_step <= 39
    assert stopped_at == min_step + 10
    assert rule.chosen_output() is not None


def test_wmv_variance_equals_direct_computation():
    rule = WindowedVariance(window=3, patience=100)
    frames = [torch.rand(1, 2, 3, 3) for _ in range(5)]
    for step, frame in enumerate(frames):
        rule.observe(step, frame)
    window = torch.stack([f.double() for f in frames[-3:]])
    expected = window.var(dim=0, unbiased=False).mean().item()
    assert abs(rule.last_variance() - expected) < 1e-12


def test_build_early_stop_validates():
    with pytest.raises(ConfigError, match="early_stop.name"):
        build_early_stop(OmegaConf.create({"name": "sometimes"}))
    with pytest.raises(ConfigError, match="early_stop.window"):
        build_early_stop(OmegaConf.create({"name": "wmv", "window": 1, "patience": 5}))


# --- discrepancy: stop once the returned image is within factor * sigma^2 of the observation -----

def test_discrepancy_stops_at_the_first_check_within_the_noise_level():
    reference = torch.zeros(1, 1, 4, 4)
    rule = Discrepancy(reference, sigma=0.1, factor=0.9, every=5)   # threshold 0.009
    # a returned image at a constant offset c from the observation has mean squared distance c^2
    offsets = {step: 0.2 - 0.002 * step for step in range(60)}       # c^2 <= 0.009 from step 53 on
    stopped_at = None
    for step, offset in offsets.items():
        rule.observe(step, torch.full((1, 1, 4, 4), 5.0), torch.full((1, 1, 4, 4), offset))
        if rule.is_check_step(step) and rule.check(step):
            stopped_at = step
            break
    first_within = min(s for s, c in offsets.items() if c * c <= 0.009)
    assert first_within == 53 and stopped_at == 55, "only every 5th step is checked"
    assert torch.equal(rule.chosen_output(), torch.full((1, 1, 4, 4), offsets[55]))
    assert rule.last_variance() == pytest.approx(offsets[55] ** 2)


def test_discrepancy_keeps_nothing_when_the_fit_never_gets_that_close():
    rule = Discrepancy(torch.zeros(1, 1, 2, 2), sigma=0.1, factor=0.5, every=1)
    for step in range(10):
        rule.observe(step, torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5))
        assert not rule.check(step)
    assert rule.chosen_output() is None


def test_discrepancy_sigma_is_the_config_then_the_observation_then_an_estimate():
    generator = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.5)
    observation = flat + 0.1 * torch.randn(flat.shape, generator=generator)
    rule_cfg = OmegaConf.create({"name": "discrepancy", "every": 1, "factor": 1.0, "sigma": None})
    assert noise_sigma(rule_cfg, observation, 0.2) == 0.2
    assert noise_sigma(OmegaConf.merge(rule_cfg, {"sigma": 0.05}), observation, 0.2) == 0.05
    # unknown noise level (data.sigma 0): the wavelet estimate of a flat image plus N(0, 0.1^2)
    assert noise_sigma(rule_cfg, observation, 0.0) == pytest.approx(0.1, rel=0.05)
    rule = build_early_stop(rule_cfg, observation=observation, data_sigma=0.2)
    assert rule.threshold == pytest.approx(0.04)


def test_clipped_noise_variance_matches_sampled_clipping():
    """E[(clip(x + n, 0, 1) - x)^2] against 400k sampled draws per value, and its limits:
    sigma^2 mid-range, sigma^2 / 2 at 0 and 1 (half the draws are cut to 0)."""
    sigma = 0.1
    x = torch.tensor([0.0, 0.02, 0.1, 0.5, 0.93, 1.0], dtype=torch.float64)
    draws = np.random.default_rng(0).normal(0.0, sigma, size=400_000)
    sampled = [np.mean((np.clip(v + draws, 0.0, 1.0) - v) ** 2) for v in x.numpy()]
    exact = clipped_noise_variance(x, sigma)
    assert exact.numpy() == pytest.approx(sampled, rel=0.01)
    assert float(exact[0]) == pytest.approx(sigma ** 2 / 2, rel=1e-9)
    assert float(exact[3]) == pytest.approx(sigma ** 2, rel=1e-5)   # 5 sigma from each end


def test_clipped_discrepancy_threshold_is_the_clipped_variance_at_the_observation():
    observation = torch.tensor([0.0, 0.0, 0.5, 0.5]).reshape(1, 1, 2, 2)
    # two pixels at 0 (variance 0.01 / 2), two mid-range (0.01): mean 0.0075, times 0.9
    rule = Discrepancy(observation, sigma=0.1, factor=0.9, every=1, clipped=True)
    assert rule.threshold == pytest.approx(0.9 * 0.0075, rel=1e-5)
    assert Discrepancy(observation, sigma=0.1, factor=0.9, every=1).threshold == pytest.approx(0.009)
    cfg = OmegaConf.create({"name": "discrepancy", "every": 1, "factor": 0.9, "sigma": None, "clipped": True})
    assert build_early_stop(cfg, observation=observation, data_sigma=0.1).threshold == pytest.approx(rule.threshold)


def test_discrepancy_is_validated():
    base = {"name": "discrepancy", "every": 10, "factor": 0.94, "sigma": None}
    for key, value in (("factor", 0), ("factor", "big"), ("every", 0), ("sigma", -0.1), ("clipped", "yes")):
        with pytest.raises(ConfigError, match=f"early_stop.{key}"):
            validate_early_stop(OmegaConf.create({**base, key: value}))
    with pytest.raises(ValueError, match="observation"):
        build_early_stop(OmegaConf.create(base))
