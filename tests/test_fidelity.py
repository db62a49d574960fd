"""Fidelity of the DIP side to reports R1 and R2: every knob that reproduces a report's
way of scoring or stopping, checked against an independent computation."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from dipddpm.dip import DipSettings, Stage, fit_dip
from dipddpm.early_stop import NoStop, PsnrPatience, WindowedVariance
from dipddpm.errors import ConfigError
from dipddpm.metrics import psnr_uint8, uint8_levels
from dipddpm.models import build_backbone
from dipddpm.replicas import fit_dip_replicas

CONF = Path(__file__).resolve().parents[1] / "conf"
SIDE = 16
TINY_UNET = OmegaConf.create({"name": "unet", "channels": [4, 8, 8], "skip_channels": [0, 2]})


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def images(seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    clean = torch.rand((1, 3, SIDE, SIDE), generator=generator)
    noisy = (clean + 0.2 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    return clean, noisy


def psnr_float(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    mse = float(((reference.double() - estimate.double()) ** 2).mean())
    return 10 * math.log10(1.0 / mse)


# --- item 1: R2 scores a separate eval-mode forward pass after the optimiser step ---------

@pytest.mark.parametrize("score_pass", ["step_output", "eval_forward"])
def test_score_pass_scores_the_image_r2_scored(score_pass):
    clean, noisy = images()
    torch.manual_seed(0)
    net = build_backbone(TINY_UNET, 3, 3)
    twin = copy.deepcopy(net)
    code = torch.randn((1, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(1))
    settings = DipSettings(lr=0.01, ema=0.0, eval_every=1, fused_adam=False, score_pass=score_pass,
                           keep_cpu_memory=False)
    result = fit_dip(net, [Stage(0, 6, code, noisy)], settings, clean=clean)
    # the same run written out by hand
    optimizer = torch.optim.Adam(twin.parameters(), lr=0.01)
    twin.train()
    expected = []
    for _ in range(6):
        optimizer.zero_grad()
        output = twin(code)
        ((output - noisy) ** 2).mean().backward()
        optimizer.step()
        if score_pass == "eval_forward":
            twin.eval()
            with torch.no_grad():
                output = twin(code)
            twin.train()
        expected.append(psnr_float(clean, output.detach().clamp(0, 1)))
    assert [row["psnr"] for row in result.curve] == pytest.approx(expected, abs=1e-9)
    assert net.training
    assert psnr_float(clean, result.final) == pytest.approx(expected[-1], abs=1e-9)


def test_eval_forward_with_an_output_average_is_a_config_error():
    with pytest.raises(ConfigError, match="method.ema"):
        from dipddpm.methods.dip import validate
        validate(composed("method.score_pass=eval_forward", "method.ema=0.9"))


def test_segnet_bn_momentum_default_and_r2_preset():
    def momenta(cfg):
        net = build_backbone(cfg, 3, 3)
        return {m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)}

    tiny = {"blocks": [[4], [8]]}
    assert momenta(OmegaConf.merge(OmegaConf.load(CONF / "backbone" / "segnet.yaml"), tiny)) == {0.1}
    r2 = composed("backbone=segnet_r2").backbone
    assert r2.bn_momentum == 0.5 and list(r2.blocks[0]) == [64, 64]
    assert momenta(OmegaConf.merge(r2, tiny)) == {0.5}
    with pytest.raises(ConfigError, match="backbone.bn_momentum"):
        build_backbone(OmegaConf.merge(r2, tiny, {"bn_momentum": 0}), 3, 3)


def test_r2_experiment_sets_r2_scoring_for_every_row():
    for curriculum in ("r2_dip", "r2_guided_linear", "r2_guided_cosine"):
        cfg = composed("experiment=guided/backbone_scheduler", f"curriculum={curriculum}")
        assert cfg.method.score_pass == "eval_forward" and cfg.method.uint8_quantise == "truncate"
        assert cfg.method.ema == 0.0
    plain = composed()
    assert plain.method.score_pass == "step_output" and plain.method.uint8_quantise == "round"


# --- item 2: R2's DIP baseline target x_40 comes from the cosine schedule -------------------

def test_r2_dip_baseline_uses_the_cosine_schedule_clipped_at_1e4():
    from dipddpm.diffusion.schedule import build_schedule

    cfg = composed("experiment=guided/backbone_scheduler", "curriculum=r2_dip")
    schedule = build_schedule(cfg.scheduler)
    # independent: Nichol & Dhariwal with R2's clip, abar_t = prod_{i<=t} (1 - beta_i)
    t = np.arange(1001) / 1000
    f = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    betas = np.clip(1 - f[1:] / f[:-1], 1e-4, 0.999)
    abar_40 = np.prod(1 - betas[:41])
    assert math.sqrt(1 - float(schedule.alphas_cumprod[40])) == pytest.approx(np.sqrt(1 - abar_40), rel=1e-6)
    assert round(float(np.sqrt(1 - abar_40)), 3) == 0.078
    linear = build_schedule(composed("scheduler=linear").scheduler)
    assert round(math.sqrt(1 - float(linear.alphas_cumprod[40])), 3) == 0.142


# --- item 3: R2's UNet layout -----------------------------------------------------------------

# Parameters of R2's UNet (models/backbone.py), layer by layer, counted by hand:
# conv k x k: k*k*in*out + out; BatchNorm(c): 2c.
R2_UNET_LAYERS = [
    5 * 5 * 3 * 8 + 8, 16,            # d_conv_1, d_bn_1
    5 * 5 * 8 * 16 + 16, 32,          # d_conv_2, d_bn_2
    5 * 5 * 16 * 32 + 32, 64,         # d_conv_3, d_bn_3
    5 * 5 * 32 * 4 + 4,               # s_conv_3
    5 * 5 * 32 * 64 + 64, 128,        # d_conv_4, d_bn_4
    5 * 5 * 64 * 4 + 4,               # s_conv_4
    5 * 5 * 64 * 128 + 128, 256,      # d_conv_5, d_bn_5
    5 * 5 * 128 * 4 + 4,              # s_conv_5
    5 * 5 * 128 * 256 + 256, 512,     # d_conv_6, d_bn_6
    4 * 4 * 256 * 124 + 124, 256,     # u_deconv_5 (256 -> 124), u_bn_5 (124 + 4 = 128)
    4 * 4 * 128 * 60 + 60, 128,       # u_deconv_4 (128 -> 60), u_bn_4 (60 + 4 = 64)
    4 * 4 * 64 * 28 + 28, 64,         # u_deconv_3 (64 -> 28), u_bn_3 (28 + 4 = 32)
    4 * 4 * 32 * 16 + 16, 32,         # u_deconv_2, u_bn_2
    4 * 4 * 16 * 8 + 8, 16,           # u_deconv_1, u_bn_1
    4 * 4 * 8 * 3 + 3, 6,             # out_deconv, out_bn
]


def test_unet_matches_r2_layer_list():
    net = build_backbone(OmegaConf.load(CONF / "backbone" / "unet.yaml"), 3, 3)
    assert sum(p.numel() for p in net.parameters()) == sum(R2_UNET_LAYERS) == 1_786_545
    assert [m.out_channels for m in net.up] == [124, 60, 28, 16, 8]
    assert isinstance(net.out_norm, nn.BatchNorm2d) and net.out_norm.num_features == 3
    net.train()
    y = net(torch.randn(1, 3, 128, 128))
    # BatchNorm before the sigmoid: each output channel's pre-activations have mean 0
    logits = torch.logit(y.double().clamp(1e-12, 1 - 1e-12))
    assert logits.mean(dim=(0, 2, 3)).abs().max() < 1e-3


def test_unet_skip_wider_than_its_level_is_a_config_error():
    cfg = OmegaConf.create({"name": "unet", "channels": [4, 4, 8], "skip_channels": [4, 0]})
    with pytest.raises(ConfigError, match="backbone.skip_channels"):
        build_backbone(cfg, 3, 3)
    build_backbone(OmegaConf.merge(cfg, {"merge_width": "level_plus_skip"}), 3, 3)


# --- item 4: uint8 quantisation by truncation -------------------------------------------------

def test_truncating_uint8_psnr_differs_from_rounding_by_hand():
    reference = np.array([[[0.0], [1.0]], [[0.5], [0.25]]])
    estimate = np.array([[[0.004], [0.998]], [[0.503], [0.2549]]])
    # levels: round -> ref 0 255 128 64, est 1 254 128 65; truncate -> ref 0 255 127 63, est 1 254 128 64
    assert list(uint8_levels(estimate, "truncate").ravel()) == [1, 254, 128, 64]
    assert list(uint8_levels(reference, "truncate").ravel()) == [0, 255, 127, 63]
    rounded = 10 * math.log10(255**2 / ((1 + 1 + 0 + 1) / 4))
    truncated = 10 * math.log10(255**2 / ((1 + 1 + 1 + 1) / 4))
    assert psnr_uint8(reference, estimate, "round") == pytest.approx(rounded, abs=1e-9)
    assert psnr_uint8(reference, estimate, "truncate") == pytest.approx(truncated, abs=1e-9)
    as_tensor = uint8_levels(torch.tensor(estimate), "truncate")
    assert as_tensor.tolist() == uint8_levels(estimate, "truncate").tolist()
    # what R2's pillow2image does: clip, * 255, np.uint8 cast
    r2 = np.array(np.clip(estimate, 0, 1) * 255, np.uint8)
    assert np.array_equal(uint8_levels(estimate, "truncate").astype(np.uint8), r2)


# --- item 5: R1's stop rule fires at its own check steps --------------------------------------

@pytest.mark.parametrize("eval_every", [1, 7, 10])
def test_r1_rule_stops_at_the_same_step_whatever_eval_every(eval_every):
    clean, noisy = images()
    torch.manual_seed(0)
    net = build_backbone(OmegaConf.create({"name": "cnn", "depth": 3}), 3, 3)
    # a learning rate so small that the PSNR never gains 0.001 dB: checks 0 (first value),
    # 10, 20, 30 -> three misses -> stop at stage step 30
    settings = DipSettings(lr=1e-9, ema=0.0, eval_every=eval_every, keep_cpu_memory=False)
    rule = PsnrPatience(every=10, patience=3, min_delta=0.001, reset_on_improve=False, carry_best=True)
    result = fit_dip(net, [Stage(0, 100, noisy, clean)], settings, rule, clean=clean)
    assert result.stages[0].stop_step == 30 and result.stages[0].stopped_early


# --- item 6: R1's two "final"s, and best weights of the step that set the best ----------------

def _two_target_run(settings, stage_count=2):
    """A 3-layer CNN fed the noisy image, pulled towards the clean image for 40 steps and
    then (stage 1) towards its negative 1 - clean: the PSNR peaks near the stage boundary."""
    clean, noisy = images()
    torch.manual_seed(3)
    net = build_backbone(OmegaConf.create({"name": "cnn", "depth": 3}), 3, 3)
    stages = [Stage(0, 40, noisy, clean), Stage(1, 40, noisy, 1 - clean)][:stage_count]
    return net, stages, clean, fit_dip(net, stages, settings, NoStop(), clean=clean)


def test_restored_net_reproduces_the_best_psnr_exactly():
    settings = DipSettings(lr=0.01, ema=0.0, eval_every=1, restore_best=True, keep_cpu_memory=False)
    net, stages, clean, result = _two_target_run(settings)
    assert result.best_step < result.steps_run - 1, "the best must not be the last step"
    best = max(row["psnr"] for row in result.curve)
    with torch.no_grad():
        again = net(stages[-1].net_input).clamp(0, 1)
    assert psnr_float(clean, again) == pytest.approx(best, abs=1e-9)
    assert torch.equal(again, result.best)


def test_final_from_fresh_pass_is_a_forward_with_the_final_weights():
    common = dict(lr=0.01, ema=0.0, eval_every=1, keep_cpu_memory=False)
    net, stages, clean, fresh = _two_target_run(DipSettings(final_from="fresh_pass", **common))
    with torch.no_grad():
        expected = net(stages[-1].net_input).clamp(0, 1)
    assert torch.equal(fresh.final, expected)
    _, _, _, last = _two_target_run(DipSettings(**common))
    assert psnr_float(clean, last.final) == pytest.approx(last.curve[-1]["psnr"], abs=1e-9)
    assert not torch.equal(last.final, fresh.final)  # one optimiser step apart


def test_fresh_pass_uses_final_not_restored_weights():
    common = dict(lr=0.01, ema=0.0, eval_every=1, keep_cpu_memory=False, final_from="fresh_pass")
    _, _, clean, restored = _two_target_run(DipSettings(restore_best=True, **common), stage_count=1)
    _, _, _, plain = _two_target_run(DipSettings(**common), stage_count=1)
    assert torch.equal(restored.final, plain.final)
    assert psnr_float(clean, restored.final) < max(row["psnr"] for row in restored.curve) - 0.1


@pytest.mark.parametrize("curriculum,variant,expected", [
    ("r1_traditional", "report", "fresh_pass"), ("r1_traditional", "classic", "last_output"),
    ("r1_gradual", "report", "last_output"), ("r1_gradual", "classic", "last_output"),
])
def test_r1_rows_report_final_as_their_notebook_did(curriculum, variant, expected):
    cfg = composed("experiment=staged/traditional_vs_staged", f"curriculum={curriculum}", f"variant={variant}")
    assert cfg.method.final_from == expected
    assert composed("experiment=staged/depth_traditional").method.final_from == "fresh_pass"
    assert composed("experiment=staged/levels_1000").method.final_from == "last_output"


# --- item 7: WMV watches the raw outputs --------------------------------------------------------

class Replay(nn.Module):
    """Returns frames[i] on its i-th call (a differentiable no-op parameter keeps Adam happy)."""

    def __init__(self, frames):
        super().__init__()
        self.frames, self.calls = frames, 0
        self.zero = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        frame = self.frames[self.calls]
        self.calls += 1
        return frame + 0 * self.zero


def wmv_by_hand(frames, ema, window, patience, watch):
    """(stop step, returned image) of ES-WMV run over ``frames`` (numpy), independent of the code."""
    averaged, average = [], None
    for frame in frames:
        average = frame.copy() if average is None else ema * average + (1 - ema) * frame
        averaged.append(np.clip(average, 0, 1))
    watched = frames if watch == "raw" else averaged
    best, best_step = np.inf, -1
    for step in range(len(frames)):
        if step >= window - 1:
            stack = np.stack(watched[step - window + 1:step + 1])
            variance = stack.var(axis=0).mean()
            if variance < best:
                best, best_step = variance, step
        if best_step >= 0 and step - best_step >= patience:
            return step, averaged[best_step]
    return len(frames) - 1, averaged[best_step]


def test_wmv_stop_and_image_follow_the_raw_outputs():
    # steps 10..24 flip between 0.4 and 0.6 (raw variance 0.01, small once averaged);
    # steps 25..39 ramp by 0.02 a step (variance 5e-4 raw and averaged); noise elsewhere.
    # The raw minimum lies on the ramp, the averaged one on the flips.
    rng = np.random.default_rng(5)
    steps = 60
    pattern = rng.random((1, 3, 4, 4))
    frames_np = []
    for i in range(steps):
        if 10 <= i < 25:
            frames_np.append(np.full((1, 3, 4, 4), 0.5 + (0.1 if i % 2 else -0.1)))
        elif 25 <= i < 40:
            frames_np.append(np.full((1, 3, 4, 4), 0.3 + 0.02 * (i - 25)))
        else:
            frames_np.append(np.clip(0.5 + 0.3 * rng.standard_normal((1, 3, 4, 4)) * pattern, 0, 1))
    ema, window, patience = 0.8, 4, 8
    outcomes = {}
    for watch in ("raw", "averaged"):
        frames = [torch.tensor(f, dtype=torch.float32) for f in frames_np]
        rule = WindowedVariance(window, patience, watch)
        settings = DipSettings(lr=0.01, ema=ema, eval_every=1, keep_cpu_memory=False)
        result = fit_dip(Replay(frames), [Stage(0, steps, torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 4, 4))],
                         settings, rule)
        stop, image = wmv_by_hand([f.astype(np.float32) for f in frames_np], ema, window, patience, watch)
        assert result.stages[0].stop_step == stop
        assert np.allclose(result.stopped.numpy(), image, atol=1e-5)
        outcomes[watch] = stop
    assert outcomes["raw"] != outcomes["averaged"], "the sequence must tell the two apart"


# --- replicas: every new knob trains K runs as K separate runs ----------------------------------

@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_replicas_with_eval_forward_and_fresh_pass_equal_separate_runs(mode):
    clean, noisy = images()
    settings = DipSettings(lr=1e-3, ema=0.0, eval_every=2, score_pass="eval_forward", final_from="fresh_pass",
                           restore_best=True, keep_cpu_memory=False,
                           fused_adam=False)

    def replica(seed):
        torch.manual_seed(seed)
        net = build_backbone(TINY_UNET, 3, 3)
        code = torch.randn((1, 3, SIDE, SIDE), generator=torch.Generator().manual_seed(10 + seed))
        return net, [Stage(0, 5, code, noisy), Stage(1, 4, code, noisy)]

    alone = [fit_dip(*replica(seed), settings, clean=clean) for seed in range(2)]
    nets, stages = zip(*(replica(seed) for seed in range(2)))
    together = fit_dip_replicas(list(nets), list(stages), settings, clean=clean, mode=mode)
    for mine, theirs in zip(together, alone):
        assert [r["psnr"] for r in mine.curve] == pytest.approx([r["psnr"] for r in theirs.curve], abs=1e-3)
        assert mine.best_step == theirs.best_step
        assert torch.allclose(mine.final, theirs.final, atol=1e-3)
