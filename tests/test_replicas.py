"""Replicas: K DIP runs trained together equal K separate fit_dip runs, in both modes,
and the DIP method writes one item per replica."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import composed, run_method
from omegaconf import OmegaConf

from dipddpm.dip import DipSettings, Stage, fit_dip
from dipddpm.early_stop import NoStop, PsnrPatience
from dipddpm.errors import ConfigError
from dipddpm.methods import dip as dip_method
from dipddpm.models import build_backbone
from dipddpm.replicas import ReplicaRuns, fit_dip_replicas, replica_seeds, resolve_mode

SIDE, CODE = 16, 4
TINY_SKIP = OmegaConf.create({"name": "skip", "num_channels_down": [4, 8], "num_channels_up": [4, 8],
                              "num_channels_skip": [0, 2]})
SETTINGS = DipSettings(lr=0.01, reg_noise_std=0.03, ema=0.9, eval_every=3, restore_best=True)


def images():
    generator = torch.Generator().manual_seed(123)
    clean = torch.rand((1, 3, SIDE, SIDE), generator=generator)
    noisy = (clean + 0.2 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    return clean, noisy


def replica(seed: int, noisy):
    """Network, two-stage plan and jitter generator of the run with ``seed``."""
    torch.manual_seed(seed)
    net = build_backbone(TINY_SKIP, CODE, 3)
    generator = torch.Generator().manual_seed(1000 + seed)
    code = 0.1 * torch.rand((1, CODE, SIDE, SIDE), generator=generator)
    return net, [Stage(0, 12, code, noisy), Stage(1, 9, code, noisy)], generator


def rule():
    return PsnrPatience(every=2, patience=2, min_delta=0.05, reset_on_improve=True, carry_best=True)


@pytest.fixture(scope="module")
def separate():
    clean, noisy = images()
    runs = []
    for seed in range(3):
        net, stages, generator = replica(seed, noisy)
        runs.append((net, fit_dip(net, stages, SETTINGS, rule(), clean=clean, generator=generator)))
    return runs


def test_loop_replicas_equal_separate_runs_through_early_stops(separate):
    """Two stages, PSNR patience stopping runs at different steps, restore_best: bit-identical."""
    clean, noisy = images()
    nets, stages, generators = zip(*(replica(seed, noisy) for seed in range(3)))
    results = fit_dip_replicas(list(nets), list(stages), SETTINGS, [rule() for _ in range(3)], clean=clean,
                               generators=list(generators), mode="loop")
    assert any(s.stopped_early for _, alone in separate for s in alone.stages), "the plan must exercise early stops"
    assert len({tuple(s.stop_step for s in alone.stages) for _, alone in separate}) > 1
    for (net_alone, alone), together, net in zip(separate, results, nets):
        assert [s.stop_step for s in together.stages] == [s.stop_step for s in alone.stages]
        assert together.steps_run == alone.steps_run and together.best_step == alone.best_step
        assert together.curve == alone.curve
        for name in ("final", "stopped", "best"):
            assert torch.equal(getattr(together, name), getattr(alone, name))
        assert together.loss_final == alone.loss_final
        for (name, mine), (_, theirs) in zip(net.state_dict().items(), net_alone.state_dict().items()):
            assert torch.equal(mine, theirs), name


def test_a_replica_stopped_before_the_others_keeps_its_own_last_output():
    """Replica 0 stops at step 20 of 40 (a learning rate too small to gain 0.001 dB), replica 1
    trains on: the collapse test of replica 0 reads its output at its stop, as when it runs alone
    (an untrained skip net's output is not constant, and its loss is above half the target's
    variance). Loop mode does not evaluate a stopped run: its row of later outputs is zeros."""
    clean, noisy = images()
    settings = DipSettings(lr=1e-9, ema=0.0, eval_every=10, keep_cpu_memory=False)

    def rules():
        return [PsnrPatience(every=10, patience=2, min_delta=0.001, reset_on_improve=False, carry_best=True), NoStop()]

    def one_stage(stages):
        return [Stage(0, 40, stages[0].net_input, noisy)]

    alone = []
    for seed, rule_k in zip(range(2), rules()):
        net, stages, generator = replica(seed, noisy)
        alone.append(fit_dip(net, one_stage(stages), settings, rule_k, clean=clean, generator=generator))
    nets, stages, generators = zip(*(replica(seed, noisy) for seed in range(2)))
    together = fit_dip_replicas(list(nets), [one_stage(s) for s in stages], settings, rules(), clean=clean,
                                generators=list(generators), mode="loop")
    assert [r.stages[0].stop_step for r in alone] == [20, 39]
    assert [r.collapsed for r in alone] == [False, False]
    assert [r.collapsed for r in together] == [False, False]
    assert together[0].loss_final == pytest.approx(alone[0].loss_final, rel=1e-4)


def test_vmap_replicas_match_separate_runs_for_a_few_steps():
    """Grouped convolutions round differently from single ones. Parameters whose gradient
    is zero up to rounding (a bias or BN scale before another BN) get Adam steps of
    +-lr in a direction set by that rounding, so the comparison uses a small lr."""
    clean, noisy = images()
    settings = DipSettings(lr=1e-3, reg_noise_std=0.03, ema=0.9, eval_every=1)

    def four_steps(stages):
        return [Stage(0, 4, stages[0].net_input, noisy)]

    alone = []
    for seed in range(3):
        net, stages, generator = replica(seed, noisy)
        alone.append((net, fit_dip(net, four_steps(stages), settings, clean=clean, generator=generator)))
    nets, stages, generators = zip(*(replica(seed, noisy) for seed in range(3)))
    together = fit_dip_replicas(list(nets), [four_steps(s) for s in stages], settings, clean=clean,
                                generators=list(generators), mode="vmap")
    for (net_alone, one), batched, net in zip(alone, together, nets):
        assert [r["loss"] for r in batched.curve] == pytest.approx([r["loss"] for r in one.curve], abs=1e-4)
        torch.testing.assert_close(batched.final, one.final, atol=1e-4, rtol=0)
        own, reference = dict(net.named_buffers()), dict(net_alone.named_buffers())
        for name in own:
            if name.endswith("running_var") or name.endswith("num_batches_tracked"):
                torch.testing.assert_close(own[name], reference[name], atol=1e-4, rtol=0)


def test_vmap_keeps_batchnorm_statistics_per_replica():
    """One batched forward on different inputs gives each network its own BN output and running stats."""
    nets = []
    for seed in range(2):
        torch.manual_seed(seed)
        nets.append(build_backbone(TINY_SKIP, CODE, 3))
    inputs = torch.rand(2, CODE, SIDE, SIDE)
    inputs[1] *= 5.0
    alone = [copy.deepcopy(net)(inputs[k:k + 1]) for k, net in enumerate(nets)]
    runs = ReplicaRuns(nets, DipSettings(), mode="vmap")
    together = runs.forward(inputs)
    held = runs.hold(1)
    runs.forward(inputs)
    runs.release(1, held)
    runs.finish()
    for k in range(2):
        torch.testing.assert_close(together[k:k + 1], alone[k], atol=1e-5, rtol=0)
    first_bn = next(name for name, _ in nets[0].named_buffers() if name.endswith("running_mean"))
    means = [dict(net.named_buffers())[first_bn] for net in nets]
    assert not torch.allclose(means[0], means[1])
    counts = [int(dict(net.named_buffers())[first_bn.replace("running_mean", "num_batches_tracked")]) for net in nets]
    assert counts == [2, 1], "network 1 was held during the second step"


def test_fit_dip_replicas_checks_its_arguments():
    clean, noisy = images()
    nets, stages, _ = zip(*(replica(seed, noisy) for seed in range(2)))
    with pytest.raises(ValueError, match="stage lists"):
        fit_dip_replicas(list(nets), [stages[0]], SETTINGS)
    shared = rule()
    with pytest.raises(ValueError, match="its own"):
        fit_dip_replicas(list(nets), list(stages), SETTINGS, [shared, shared], clean=clean)
    short = [stages[0], stages[1][:1]]
    with pytest.raises(ValueError, match="same stage plan"):
        fit_dip_replicas(list(nets), short, SETTINGS)
    assert replica_seeds(5, 3) == [5, 6, 7]
    assert resolve_mode("auto", "cpu") == "loop" and resolve_mode("auto", "cuda") == "vmap"


TINY = ["backbone=skip_mnist", "data.size=16", "data.sigma=0.1", "profile=smoke", "method.steps=1000",
        "method.code_channels=4", "eval_every=1"]


def test_method_writes_one_item_per_replica_equal_to_separate_runs(tmp_path):
    together = run_method(dip_method, composed(*TINY, "method.replicas=2"), tmp_path / "together", seed=4)
    assert together["replicas"] == 2 and together["replica_seeds"] == [4, 5]
    assert [item["seed"] for item in together["items"]] == [4, 5]
    for k, seed in enumerate((4, 5)):
        alone = run_method(dip_method, composed(*TINY, f"seed={seed}"), tmp_path / f"alone{seed}", seed=seed)
        item = together["items"][k]
        assert item["replica"] == k
        assert item["psnr_final"] == pytest.approx(alone["psnr_final"], abs=1e-6)
        assert item["loss_final"] == pytest.approx(alone["loss_final"], abs=1e-7)
        assert (tmp_path / "together" / f"replica_{k}" / "curve.csv").is_file()
    mean = (together["items"][0]["psnr_final"] + together["items"][1]["psnr_final"]) / 2
    assert together["psnr_final"] == pytest.approx(mean)
    assert together["steps"] == together["items"][0]["steps"]
    assert (tmp_path / "together" / "final.png").is_file()


@pytest.mark.parametrize("override, key", [
    ("method.replicas=0", "method.replicas"),
    ("method.replica_mode=fast", "method.replica_mode"),
    ("method.autocast=fp8", "method.autocast"),
    ("method.compile=sometimes", "method.compile"),
])
def test_method_validates_execution_keys(override, key):
    with pytest.raises(ConfigError, match=key):
        dip_method.validate(composed(*TINY, override))


def test_execution_options_resolve_auto_per_device():
    cfg = composed(*TINY)
    on_cpu = dip_method.execution_options(cfg, "cpu")
    on_cuda = dip_method.execution_options(cfg, "cuda")
    assert not on_cpu["compile"] and not on_cpu["channels_last"] and on_cpu["autocast"] is None
    assert on_cuda["compile"] and on_cuda["channels_last"]
    replicated = dip_method.execution_options(composed(*TINY, "method.replicas=3"), "cuda")
    assert not replicated["channels_last"]


def test_fit_dip_times_its_evaluation_points():
    clean, noisy = images()
    net, stages, generator = replica(0, noisy)
    result = fit_dip(net, [Stage(0, 7, stages[0].net_input, noisy)], DipSettings(eval_every=3), clean=clean,
                     generator=generator)
    assert result.evaluations == len(result.curve) == 3  # steps 0, 3 and the last, 6
    assert 0 < result.eval_seconds < result.seconds


def test_fit_dip_keeps_its_defaults_for_existing_callers():
    settings = DipSettings()
    assert settings.fused_adam and settings.keep_cpu_memory
    assert not (settings.compile or settings.channels_last or settings.cudnn_benchmark)
    assert settings.autocast is None
