"""Profiles are applied in one place (dipddpm.profile.apply_profile), once per job, before validation.

PROFILE_CHANGES lists every config value each profile changes for each experiment (at the
experiment's own composition; faithful changes nothing). The step counts were checked by hand
against the profile files (quick: step_scale 0.05, max_size 48, min_steps 2; smoke: 0.005, 32, 2)
and are the stage steps and image sides the code produced before the profile moved here:
e.g. R1 1000 steps x 0.05 = 50, x 0.005 = 5; 200 x 0.005 = 1 -> min_steps 2; R1 increasing
[500, 1000, 1500] x 0.005 = [2.5, 5, 7.5] -> round half to even [2, 5, 8]; R2 softmax total
2000 x 0.05 = 100. Image sides are capped and raised to the backbone's minimum (skip_light: 64,
R2's UNet: 128 except its smoke preset's 16). The diffusion experiments' sizes that depend on
their data (training iterations, chain lengths) are not config values and are not listed here.
"""

import pytest
from omegaconf import OmegaConf

from conftest import composed
from dipddpm.errors import ConfigError
from dipddpm.methods import get_method
from dipddpm.profile import apply_profile, preset_merged
from dipddpm.sweep import config_dir

EXPERIMENTS = sorted(p.relative_to(config_dir() / "experiment").with_suffix("").as_posix()
                     for p in (config_dir() / "experiment").rglob("*.yaml"))

# experiment: ({key: value under profile=quick}, {key: value under profile=smoke})
PROFILE_CHANGES = {
    '(default)': (
        {'data.size': 64, 'epoch_plan.steps': 50},
        {'data.size': 64, 'epoch_plan.steps': 5}),
    'baselines/cset': (
        {'data.size': 64},
        {'data.size': 64}),
    'denoise/zero_shot': (
        {'data.size': 64, 'epoch_plan.steps': 50},
        {'data.size': 64, 'epoch_plan.steps': 5}),
    'dip_in_ddpm/ideas': (
        {'eps_net.base_channels': 16, 'eps_net.channel_mults': [1, 2, 2], 'eps_net.num_res_blocks': 1,
         'eps_net.attention_resolutions': [8], 'eps_net.dropout': 0.0, 'method.train.lr': 0.002},
        {'eps_net.base_channels': 8, 'eps_net.channel_mults': [1, 2], 'eps_net.num_res_blocks': 1,
         'eps_net.attention_resolutions': [], 'eps_net.dropout': 0.0, 'method.train.lr': 0.002}),
    'dipnoise/ddpm_epochs': ({}, {}),
    'dipnoise/dip_in_training': ({}, {}),
    'dipnoise/passes_steps': ({}, {}),
    'dipnoise/time_vs_steps': ({}, {}),
    'guided/backbone_scheduler': (
        {'epoch_plan.total': 100, 'epoch_plan.min_steps': 2},
        {'data.size': 32, 'backbone.channels': [8, 16, 16], 'backbone.skip_channels': [0, 4],
         'epoch_plan.total': 10, 'epoch_plan.min_steps': 2}),
    'staged/depth_staged': (
        {'data.size': 48, 'epoch_plan.steps': 50},
        {'data.size': 32, 'epoch_plan.steps': 5}),
    'staged/depth_traditional': (
        {'data.size': 48, 'epoch_plan.steps': 150},
        {'data.size': 32, 'epoch_plan.steps': 15}),
    'staged/fast_epochs': (
        {'data.size': 48, 'epoch_plan.steps': 50},
        {'data.size': 32, 'epoch_plan.steps': 5}),
    'staged/levels_1000': (
        {'data.size': 48, 'epoch_plan.steps': 50},
        {'data.size': 32, 'epoch_plan.steps': 5}),
    'staged/levels_200': (
        {'data.size': 48, 'epoch_plan.steps': 10},
        {'data.size': 32, 'epoch_plan.steps': 2}),
    'staged/levels_increasing': (
        {'data.size': 48, 'epoch_plan.steps': [25, 50, 75]},
        {'data.size': 32, 'epoch_plan.steps': [2, 5, 8]}),
    'staged/traditional_vs_staged': (
        {'data.size': 48, 'epoch_plan.steps': 50},
        {'data.size': 32, 'epoch_plan.steps': 5}),
    'truncated/dip_vs_clean': ({}, {}),
    'truncated/schedule_length': ({}, {}),
}


def flat(cfg) -> dict:
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def changes(*overrides) -> dict:
    """The values apply_profile changes in the config composed with ``overrides``."""
    cfg = composed(*overrides)
    before, after = flat(cfg), flat(apply_profile(cfg))
    return {key: value for key, value in after.items() if before.get(key) != value and key != "profile.applied"}


def test_every_experiment_is_listed():
    assert set(PROFILE_CHANGES) == {"(default)", *EXPERIMENTS}


@pytest.mark.parametrize("name", sorted(PROFILE_CHANGES))
def test_what_each_profile_changes(name):
    experiment = [] if name == "(default)" else [f"experiment={name}"]
    quick, smoke = PROFILE_CHANGES[name]
    assert changes(*experiment, "profile=faithful") == {}
    assert changes(*experiment, "profile=quick") == quick
    assert changes(*experiment, "profile=smoke") == smoke


def test_methods_see_the_scaled_plan_and_the_profile_applies_once():
    cfg = apply_profile(composed("experiment=staged/levels_increasing", "profile=quick"))
    text, plan = get_method("dip").describe(cfg)
    assert [stage["steps"] for stage in plan["stages"]] == [25, 50, 75] and plan["total_steps"] == 150
    assert apply_profile(cfg) is cfg
    softmax = apply_profile(composed("noise_plan=ddpm", "epoch_plan=softmax_beta", "profile=smoke"))
    stages = get_method("dip").describe(softmax)[1]["stages"]
    assert softmax.epoch_plan.total == 10 and min(s["steps"] for s in stages) == 2 and len(stages) == 20


def test_step_rounding_and_floors():
    list_plan = ["noise_plan=gradual", "epoch_plan=list", "epoch_plan.steps=[500,1000,1500]"]
    assert changes(*list_plan, "profile.step_scale=0.0123")["epoch_plan.steps"] == [6, 12, 18]
    assert changes(*list_plan, "profile.step_scale=0.001", "profile.min_steps=2")["epoch_plan.steps"] == [2, 2, 2]
    assert changes("method.steps=7", "profile.step_scale=0.5")["epoch_plan.steps"] == 4
    assert changes("method.steps=7", "profile.step_scale=0.01")["epoch_plan.steps"] == 1


def test_invalid_values_are_left_for_validation_to_name():
    cfg = apply_profile(composed("method.steps=-5", "profile=quick"))
    assert cfg.epoch_plan.steps == -5
    with pytest.raises(ConfigError) as info:
        get_method("dip").validate(cfg)
    assert (info.value.key, info.value.value) == ("method.steps", -5)
    with pytest.raises(ConfigError) as info:
        apply_profile(composed("profile.step_scale=0"))
    assert info.value.key == "profile.step_scale"


def test_presets_merge_nested_keys_and_unknown_keys_name_the_preset():
    group = {"name": "x", "train": {"lr": 1.0, "epochs": 3}, "at_profile": {"quick": {"train": {"lr": 2.0}}}}
    assert preset_merged(group, "method", "quick") == {"name": "x", "train": {"lr": 2.0, "epochs": 3}}
    assert preset_merged(group, "method", "faithful") == {"name": "x", "train": {"lr": 1.0, "epochs": 3}}
    group["at_profile"]["smoke"] = {"train": {"learning_rate": 1.0}}
    with pytest.raises(ConfigError) as info:
        preset_merged(group, "method", "smoke")
    assert info.value.key == "method.at_profile.smoke" and info.value.value == ["learning_rate"]
