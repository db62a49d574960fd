"""Profiles are applied in one place (dipddpm.profile.apply_profile), once per job, before validation.

PROFILE_CHANGES lists every config value each profile changes for each experiment (at the
experiment's own composition; faithful changes nothing), checked by hand against the profile
files and presets. standard and quick scale nothing (step_scale, train_scale, sample_step_scale
1, min_steps 1): they cap image sides (standard 64, quick 32; the skip nets' minimum is 64, R2's
UNet keeps 128, SegNet's preset caps it at 32) and merge presets: R3 scores 8 samples under
standard, and R5 trains on 256 images with a base-16 eps-net and no grids during training under
standard (quick: 128 images, base 8, lr 2e-3). smoke (step_scale 0.005, max_size 32,
min_steps 2, train_scale 0.002, sample_step_scale 0.01): R1 1000 steps x 0.005 = 5; 200 x 0.005 = 1
-> min_steps 2; R1 increasing [500, 1000, 1500] x 0.005 = [2.5, 5, 7.5] -> round half to even
[2, 5, 8]; R2 softmax total 2000 x 0.005 = 10; R3 DIP 2000 steps -> 10, iterations 3000 -> 6, chain
from t = 500 -> 501 x 0.01 = 5 calls, so t_start 4; R4 DIP 200 -> 1 -> 2, epochs 20 -> 0.04, chain
1000 -> 10 (500 -> 5); R5 epochs 100 -> 0.2, chain T = 1000 -> 5 (R5 shortens its chain by
step_scale). Sizes that depend on the data (iterations = epochs x ceil(N / batch)) are computed by
the method from the scaled epochs; test_diffusion_plans_at_every_sweep_point checks them against the
unscaled formulas.
"""

import functools
import itertools
import math

import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from conftest import composed
from dipddpm.errors import ConfigError
from dipddpm.methods import diffusion_common as common
from dipddpm.methods import ddpm_dipnoise, ddpm_single, get_method
from dipddpm.profile import apply_profile, preset_merged
from dipddpm.sweep import config_dir

EXPERIMENTS = sorted(p.relative_to(config_dir() / "experiment").with_suffix("").as_posix()
                     for p in (config_dir() / "experiment").rglob("*.yaml"))

R5_NET = {"eps_net.channel_mults": [1, 2, 2], "eps_net.num_res_blocks": 1, "eps_net.attention_resolutions": [8],
          "eps_net.dropout": 0.0}
R1 = {"standard": {"data.size": 64}, "quick": {"data.size": 32}}  # R1's CNNs take any side
SKIP_NET = {"standard": {"data.size": 64}, "quick": {"data.size": 64}}  # the skip nets' minimum side is 64

# experiment: {profile: {key: value apply_profile changes}}
PROFILE_CHANGES = {
    '(default)': {**SKIP_NET, 'smoke': {'data.size': 64, 'epoch_plan.steps': 5}},
    'baselines/cset': {**SKIP_NET, 'smoke': {'data.size': 64}},
    'denoise/zero_shot': {**SKIP_NET, 'smoke': {'data.size': 64, 'epoch_plan.steps': 5}},
    'dip_in_ddpm/ideas': {
        'standard': {'data.limit': 256, 'eps_net.base_channels': 16, **R5_NET, 'method.eval.grid_every_epochs': None},
        'quick': {'data.limit': 128, 'eps_net.base_channels': 8, **R5_NET, 'method.train.lr': 0.002,
                  'method.eval.grid_every_epochs': None},
        'smoke': {'eps_net.base_channels': 8, 'eps_net.channel_mults': [1, 2], 'eps_net.num_res_blocks': 1,
                  'eps_net.attention_resolutions': [], 'eps_net.dropout': 0.0, 'method.train.lr': 0.002,
                  'method.train.epochs': 0.2, 'method.sample.calls': 5}},
    'dipnoise/ddpm_epochs': {'smoke': {'method.steps': 5, 'method.dip.steps': 2, 'method.train.epochs': 0.04}},
    'dipnoise/dip_in_training': {'smoke': {'method.steps': 10, 'method.dip.steps': 2, 'method.train.epochs': 0.04}},
    'dipnoise/passes_steps': {'smoke': {'method.steps': 10, 'method.dip.steps': 2, 'method.train.epochs': 0.04}},
    'dipnoise/time_vs_steps': {'smoke': {'method.steps': 10, 'method.dip.steps': 2, 'method.train.epochs': 0.04}},
    'guided/backbone_scheduler': {
        'smoke': {'data.size': 32, 'backbone.channels': [8, 16, 16], 'backbone.skip_channels': [0, 4],
                  'epoch_plan.total': 10, 'epoch_plan.min_steps': 2}},
    'staged/depth_staged': {**R1, 'smoke': {'data.size': 32, 'epoch_plan.steps': 5}},
    'staged/depth_traditional': {**R1, 'smoke': {'data.size': 32, 'epoch_plan.steps': 15}},
    'staged/fast_epochs': {**R1, 'smoke': {'data.size': 32, 'epoch_plan.steps': 5}},
    'staged/levels_1000': {**R1, 'smoke': {'data.size': 32, 'epoch_plan.steps': 5}},
    'staged/levels_200': {**R1, 'smoke': {'data.size': 32, 'epoch_plan.steps': 2}},
    'staged/levels_increasing': {**R1, 'smoke': {'data.size': 32, 'epoch_plan.steps': [2, 5, 8]}},
    'staged/traditional_vs_staged': {**R1, 'smoke': {'data.size': 32, 'epoch_plan.steps': 5}},
    'truncated/dip_vs_clean': {
        'standard': {'method.num_samples': 8},
        'smoke': {'method.dip.steps': 10, 'method.train.iterations': 6, 'method.sample.t_start': 4}},
    'truncated/schedule_length': {
        'standard': {'method.num_samples': 8},
        'smoke': {'method.dip.steps': 10, 'method.train.iterations': 6, 'method.sample.t_start': 4}},
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


def test_standard_runs_segnet_at_32_px_and_r3_on_8_samples():
    sides = {profile: apply_profile(composed("experiment=guided/backbone_scheduler", "backbone=segnet_r2",
                                             f"profile={profile}")).data.size
             for profile in ("faithful", "standard", "quick")}
    assert sides == {"faithful": 128, "standard": 32, "quick": 32}
    assert apply_profile(composed("experiment=guided/backbone_scheduler", "backbone=unet",
                                  "profile=standard")).data.size == 128
    assert apply_profile(composed("backbone=segnet", "data.size=256", "profile=faithful",
                                  "backbone.max_side=64")).data.size == 64
    with pytest.raises(ConfigError, match="backbone.max_side"):
        apply_profile(composed("backbone=segnet", "profile=standard", "backbone.at_profile.standard.max_side=0"))
    samples = {profile: ddpm_single._plan(apply_profile(composed("experiment=truncated/dip_vs_clean",
                                                                 f"profile={profile}")))["num_samples"]
               for profile in ("faithful", "standard", "quick")}
    assert samples == {"faithful": 64, "standard": 8, "quick": 32}


def test_every_experiment_is_listed():
    assert set(PROFILE_CHANGES) == {"(default)", *EXPERIMENTS}


@pytest.mark.parametrize("name", sorted(PROFILE_CHANGES))
def test_what_each_profile_changes(name):
    experiment = [] if name == "(default)" else [f"experiment={name}"]
    assert changes(*experiment, "profile=faithful") == {}
    for profile in ("standard", "quick", "smoke"):
        assert changes(*experiment, f"profile={profile}") == PROFILE_CHANGES[name].get(profile, {}), profile


# A key names a step count, a chain, a training length or a stop rule when one of its parts holds
# one of these words (epoch_plan.*, early_stop.*, method.dip.steps, method.train.iterations, ...).
STEP_WORDS = ("step", "iteration", "epoch", "calls", "t_start", "total", "patience", "stop", "timesteps")
GRID_CADENCE = "method.eval.grid_every_epochs"  # when R5 draws its sample grids, not how long anything trains
# every group file that can carry at_profile presets, composed alone beside the experiments
PRESET_GROUPS = [f"{group}={p.stem}" for group in ("backbone", "eps_net", "method")
                 for p in sorted((config_dir() / group).glob("*.yaml"))]


@functools.cache
def composed_once(*overrides):
    """composed(*overrides), composed once per test session (callers copy it before changing it)."""
    return composed(*overrides)


def step_values(cfg) -> dict:
    """The step, chain, training-length and stop-rule values of a config after apply_profile."""
    return {key: value for key, value in flat(cfg).items()
            if not key.startswith(("profile.", "table.", "report."))
            and any(word in part for part in key.split(".") for word in STEP_WORDS)}


def under_profile(cfg, profile: str):
    """apply_profile of ``cfg`` with its profile node replaced by conf/profile/<profile>.yaml."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.profile = OmegaConf.load(config_dir() / "profile" / f"{profile}.yaml")
    return apply_profile(cfg)


@pytest.mark.parametrize("overrides", [[], *([f"experiment={name}"] for name in EXPERIMENTS),
                                       *([group] for group in PRESET_GROUPS)], ids=str)
def test_quick_and_standard_scale_no_step_count_or_stop_rule(overrides):
    """Issue 14: only smoke changes step counts and stop rules. quick has standard's values for every
    such key, and standard faithful's (R5's grid cadence aside; R5's iterations per epoch follow its
    preset training-set size, tests/test_r5.py)."""
    base = composed_once(*overrides)
    values = {profile: step_values(under_profile(base, profile)) for profile in ("faithful", "standard", "quick")}
    assert values["quick"] == values["standard"]
    for profile in ("faithful", "standard"):
        values[profile].pop(GRID_CADENCE, None)
    assert values["standard"] == values["faithful"]


def test_step_values_see_every_key_smoke_scales():
    """The filter above is not blind: it finds every key kind smoke scales in some experiment or preset."""
    scaled = set()
    for overrides in [[f"experiment={name}"] for name in EXPERIMENTS] + [[group] for group in PRESET_GROUPS]:
        base = composed_once(*overrides)
        faithful, smoke = step_values(under_profile(base, "faithful")), step_values(under_profile(base, "smoke"))
        scaled |= {key for key in smoke if smoke[key] != faithful.get(key)}
    assert scaled >= {"epoch_plan.steps", "epoch_plan.total", "epoch_plan.min_steps", "method.dip.steps",
                      "method.train.iterations", "method.train.epochs", "method.sample.calls", "method.sample.t_start",
                      "method.steps", "method.max_steps", "method.patience", "method.lr_step"}


def test_methods_see_the_scaled_plan_and_the_profile_applies_once():
    cfg = apply_profile(composed("experiment=staged/levels_increasing", "profile=smoke"))
    text, plan = get_method("dip").describe(cfg)
    assert [stage["steps"] for stage in plan["stages"]] == [2, 5, 8] and plan["total_steps"] == 15
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
    cfg = apply_profile(composed("method.steps=-5", "profile=smoke"))
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


# ---------------------------------------------------------------- the diffusion methods

DIFFUSION_EXPERIMENTS = [name for name in EXPERIMENTS if name.split("/")[0] in ("truncated", "dipnoise", "dip_in_ddpm")]
PROFILES = ("faithful", "standard", "quick", "smoke")
# points beside the sweeps that take the other branches: R3 with sample.calls set or a lower
# start, given iterations; R4 a one-step chain, other batch sizes; R5 given calls and DIP steps
EXTRA_POINTS = {
    "truncated/dip_vs_clean": [{"method.sample.calls": 50}, {"method.sample.calls": 7, "method.sample.t_start": 20},
                               {"method.sample.t_start": 20}, {"method.train.iterations": 1},
                               {"method.train.iterations": 1000, "method.x0_source": "clean"}],
    "dipnoise/time_vs_steps": [{"r4_row": "ddpm", "method.steps": 1}, {"r4_row": "ddpm", "method.train.batch_size": 7},
                               {"r4_row": "ddim", "method.train.epochs": 3}],
    "dip_in_ddpm/ideas": [{"method.dip_mode": mode, **extra} for mode in ("replace_noise", "target") for extra in
                          ({"method.sample.calls": 100}, {"method.dip.steps": 3}, {"method.dip.steps": 2000},
                           {"method.dip.min_steps": 50}, {"method.train.batch_size": 100})],
}


def sweep_points(experiment: str) -> list[dict]:
    """The experiment's hydra.sweeper.params (seed left out) as {key: value} points; a group
    (r4_row) is kept as an override."""
    raw = OmegaConf.load(config_dir() / "experiment" / f"{experiment}.yaml")
    params = OmegaConf.to_container(raw.hydra.sweeper.params)
    axes = []
    for key, spec in params.items():
        if key != "seed":
            spec = str(spec)
            values = (list(range(*map(int, spec[len("range("):-1].split(",")))) if spec.startswith("range(")
                      else [yaml.safe_load(v) for v in spec.split(",")])
            axes.append([(key, v) for v in values])
    return [dict(point) for point in itertools.product(*axes)]


def unscaled_plan(method: str, cfg, count: int) -> dict:
    """Each diffusion method's sizes from the config before apply_profile, by the formulas the
    methods applied themselves before the profile moved to apply_profile (old float order)."""
    p, m = cfg.profile, cfg.method
    s, floor, r, c = p.step_scale, p.min_steps, p.train_scale, p.get("sample_step_scale") or 1.0
    T = cfg.scheduler.num_timesteps
    per_epoch = math.ceil(count / m.train.batch_size)
    steps = lambda n: max(floor, 1, round(n * s))  # noqa: E731
    iterations = lambda: max(m.train.min_iterations, 1, round(m.train.epochs * per_epoch * r))  # noqa: E731
    if method == "ddpm_single":
        top = min(m.sample.t_start, T - 1)
        base = m.train.iterations or {"dip": 3000, "clean": 5000}[m.x0_source]
        if m.sample.calls is None:
            calls = min(max(1, round((top + 1) * c)), top + 1)
            top = calls - 1
        else:
            calls = min(max(1, round(m.sample.calls * c)), top + 1)
        return {"dip_steps": steps(m.dip.steps) if m.x0_source == "dip" else 0, "t_start": top, "model_calls": calls,
                "train_iterations": max(m.train.min_iterations, 1, round(base * r))}
    if method == "ddpm_dipnoise":
        chain = min(max(1, round(m.steps * c)), m.steps)
        uses_dip = m.dip_passes > 0 or m.train_dip_passes > 0
        return {"dip_steps": steps(m.dip.steps) if uses_dip else 0, "train_iterations": iterations(),
                "chain_steps": chain, "t_start": chain - 1 if m.sample.t_start is None else m.sample.t_start}
    n = m.dip.steps or {"none": 0, "replace_noise": 5, "target": 1000}[m.dip_mode]
    return {"dip_steps": 0 if m.dip_mode == "none" else min(n, max(steps(n), m.dip.min_steps)),
            "train_iterations": iterations(), "chain_steps": m.sample.calls or min(T, steps(T))}


def diffusion_plan(module, cfg, count: int) -> dict:
    """The method's plan; R4's and R5's for a training set of ``count`` images (not loaded here)."""
    if module is ddpm_single:
        return module.describe(cfg)[1]
    return module._plan(cfg, count) if module is ddpm_dipnoise else module.plan(cfg, count)


@pytest.mark.parametrize("experiment", DIFFUSION_EXPERIMENTS)
def test_diffusion_plans_at_every_sweep_point(experiment):
    """At every profile and sweep point, the method's plan from apply_profile's output equals its
    sizes computed from the unscaled config by the formulas the methods used before (their float
    order included), and does not change when the profile's scales are then set to 1: the method
    reads already-scaled values."""
    full = {"ddpm_dipnoise": 5000, "ddpm_dataset": 2043, "ddpm_single": 0}  # bundled digits, patches32's train split
    points = sweep_points(experiment) + EXTRA_POINTS.get(experiment, [])
    rows = sorted({point.get("r4_row") for point in points}, key=str)
    for profile, row in itertools.product(PROFILES, rows):
        base = composed(f"experiment={experiment}", f"profile={profile}", *([f"r4_row={row}"] if row else []))
        module = get_method(base.method.name)
        for point in (p for p in points if p.get("r4_row") == row):
            cfg = base.copy()
            for key, value in point.items():
                if key != "r4_row":
                    OmegaConf.update(cfg, key, value)
            unscaled = OmegaConf.create({k: OmegaConf.to_container(cfg[k], resolve=True)
                                         for k in ("profile", "method", "scheduler")})
            scaled = apply_profile(cfg)
            count = min(full[base.method.name], scaled.data.get("limit") or full[base.method.name])  # R5's presets
            plan = diffusion_plan(module, scaled, count)
            expected = unscaled_plan(base.method.name, unscaled, count)
            assert {k: plan[k] for k in expected} == expected, (profile, point)
            with open_dict(scaled):
                scaled.profile.update(step_scale=1.0, min_steps=1, train_scale=1.0, sample_step_scale=1.0)
            assert diffusion_plan(module, scaled, count) == plan


def test_scaled_epochs_round_like_scaled_iterations_for_any_data_size():
    """round(epochs * train_scale * P) (apply_profile, then the method) == round(epochs * P *
    train_scale) (the methods before) for every profile, every epoch count of the R4/R5
    experiments and every P = ceil(N / batch) up to 20000."""
    for profile in PROFILES:
        base = composed("experiment=dipnoise/ddpm_epochs", f"profile={profile}")
        for e in (5, 10, 15, 20, 100):
            cfg = base.copy()
            OmegaConf.update(cfg, "method.train.epochs", e)
            cfg = apply_profile(cfg)
            scaled, r = cfg.method.train.epochs, cfg.profile.train_scale
            assert all(common.epoch_iterations(scaled, p, 1) == max(1, round(e * p * r))
                       for p in range(1, 20001)), (profile, e)


def test_diffusion_values_that_are_not_valid_are_left_for_validation():
    cfg = apply_profile(composed("experiment=dipnoise/time_vs_steps", "profile=smoke", "method.steps=1001",
                                 "method.train.epochs=0"))
    assert cfg.method.steps == 1001 and cfg.method.train.epochs == 0
    with pytest.raises(ConfigError) as info:
        get_method("ddpm_dipnoise").validate(cfg)
    assert (info.value.key, info.value.value) == ("method.steps", 1001)
    cfg = apply_profile(composed("experiment=dipnoise/time_vs_steps", "profile=smoke", "method.steps=500",
                                 "method.sample.t_start=400"))
    with pytest.raises(ConfigError) as info:
        get_method("ddpm_dipnoise").validate(cfg)
    assert info.value.key == "method.sample.t_start" and cfg.method.steps == 500
    cfg = apply_profile(composed("experiment=dipnoise/time_vs_steps", "profile=smoke", "method.train.epochs=2.5"))
    assert cfg.method.train.epochs == 2.5 * 0.002
    cfg = apply_profile(composed("experiment=truncated/dip_vs_clean", "profile=smoke", "method.sample.calls=502"))
    assert cfg.method.sample.calls == 502
    with pytest.raises(ConfigError) as info:
        get_method("ddpm_single").validate(cfg)
    assert info.value.key == "method.sample.calls"
    with pytest.raises(ConfigError) as info:
        apply_profile(composed("experiment=truncated/dip_vs_clean", "profile.sample_step_scale=0"))
    assert info.value.key == "profile.sample_step_scale"
