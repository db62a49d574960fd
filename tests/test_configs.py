"""Every option of every config group composes, and every experiment is a well-formed table.

The groups and options are found by listing conf/, so a new file is covered without
editing this test.
"""

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import composed
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dipddpm.compare import TOP_LEVEL_FIELDS

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
# fields a method writes into its per-item results (metrics["items"], e.g. the classical baselines)
ITEM_FIELDS = {"image"}


def _primary_groups() -> set[str]:
    """Groups named in train.yaml's defaults list (the others are added with '+')."""
    defaults = yaml.safe_load((CONF / "train.yaml").read_text())["defaults"]
    return {next(iter(entry)) for entry in defaults if isinstance(entry, dict)}


def _options() -> list[tuple[str, str]]:
    found = []
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        for file in sorted(group.rglob("*.yaml")):
            found.append((group.name, file.relative_to(group).with_suffix("").as_posix()))
    return found


OPTIONS = _options()
EXPERIMENTS = [option for group, option in OPTIONS if group == "experiment"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_groups_are_listed_from_conf():
    groups = {group for group, _ in OPTIONS}
    assert {"backbone", "method", "noise_plan", "profile", "launcher", "experiment", "variant", "curriculum"} <= groups
    assert len(EXPERIMENTS) >= 8


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    prefix = "" if group in _primary_groups() else "+"
    cfg = _compose([f"{prefix}{group}={option}"])
    assert cfg.hydra.runtime.choices[group] == option
    OmegaConf.to_container(cfg, resolve=False)
    if group != "launcher":
        # everything outside hydra.* resolves (launcher files may set hydra-only interpolations)
        OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def _field_exists(cfg, field: str, sweep_keys: set[str]) -> bool:
    if field in TOP_LEVEL_FIELDS or field in ITEM_FIELDS or field in sweep_keys or field in cfg.hydra.runtime.choices:
        return True
    return OmegaConf.select(cfg, field, default=None, throw_on_missing=False) is not None


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_is_a_table_with_a_seed_sweep(name):
    cfg = _compose([f"experiment={name}"])
    assert cfg.experiment_name == name
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=False)
    assert params.get("seed") == "range(0,${seeds})"
    sweep_keys = {key.lstrip("+~") for key in params}
    for key in sweep_keys - {"seed"}:
        assert _field_exists(cfg, key, set()), f"sweep axis {key} is neither a group nor a config key"

    table = OmegaConf.to_container(cfg.table, resolve=True)
    report = table.pop("report", None) or OmegaConf.to_container(cfg.report, resolve=True)
    assert table.get("title") and table.get("values"), "the table needs a title and values"
    values = [str(v) for v in table["values"]]
    fields = [str(f) for f in (table.get("rows") or []) + (table.get("columns") or [])]
    for field in fields:
        assert _field_exists(cfg, field, sweep_keys), f"table field {field!r} does not exist"
    for name_ in table.get("format") or {}:
        assert str(name_) in values, f"format for {name_!r}, which is not a table value"
    # without rows, compare picks the varying sweep axes as rows
    row_like = set(fields) if table.get("rows") else set(fields) | sweep_keys
    for entry in report:
        assert any(key in values for key in entry), f"report entry {entry} gives none of the table's values"
        for key in set(entry) - set(values):
            assert key in row_like, f"report entry key {key!r} is neither a table value nor a row/column field"


# ---------------------------------------------------------------- every config instantiated

# a companion command line for each data kind (the experiment that uses it), so a method or
# data option is validated together with what it needs
DATA_COMPANIONS = {
    "image": [],
    "digit": ["experiment=truncated/dip_vs_clean"],
    "mnist": ["experiment=dipnoise/time_vs_steps"],
    "patches32": ["experiment=dip_in_ddpm/ideas"],
    "cifar10": ["experiment=dip_in_ddpm/ideas", "data=cifar10"],
}
EPS_NET_COMPANIONS = {"unet_res": "digit", "unet_ln": "mnist", "unet_wide": "patches32"}
PLAN_COMPANIONS = {("epoch_plan", "softmax_beta"): ["noise_plan=ddpm"], ("epoch_plan", "list"): ["noise_plan=gradual"]}


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    from fixtures import write_cifar_batch

    root = tmp_path_factory.mktemp("cifar")
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(root / "data_batch_1", images, [0, 1, 2, 3])
    write_cifar_batch(root / "test_batch", images[:2], [4, 5])
    return root


def _companions(group: str, option: str, cifar_root) -> list[str]:
    if group == "data":
        kind = OmegaConf.load(CONF / "data" / f"{option}.yaml").name
    elif group == "method":
        from dipddpm.methods import get_method

        kind = get_method(composed(f"method={option}").method.name).DATA_KINDS[0]
    elif group == "eps_net":
        kind = EPS_NET_COMPANIONS[option]
    else:
        return list(PLAN_COMPANIONS.get((group, option), []))
    extra = [f"data.root={cifar_root}"] if kind == "cifar10" else []
    return DATA_COMPANIONS[kind] + extra


def instantiate(overrides: list[str]):
    """What a job does before training: the method's data kinds, the profile, validation;
    then the networks the config names are built."""
    import torch

    from dipddpm.models import build_backbone
    from dipddpm.train import prepare_job

    method, cfg, _ = prepare_job(composed(*overrides, "device=cpu"))
    for group in ("backbone", "eps_net"):
        if cfg.get(group) is not None:
            assert isinstance(build_backbone(cfg[group], 3, 3), torch.nn.Module)
    return method, cfg


@pytest.mark.parametrize("group,option", [o for o in OPTIONS if o[0] != "experiment"],
                         ids=[f"{g}={o}" for g, o in OPTIONS if g != "experiment"])
def test_every_option_instantiates(group, option, cifar_root):
    prefix = "" if group in _primary_groups() else "+"
    profile = [] if group == "profile" else ["profile=smoke"]
    overrides = _companions(group, option, cifar_root) + [f"{prefix}{group}={option}"] + profile
    method, cfg = instantiate(overrides)
    assert cfg.profile.applied and cfg.data.name in method.DATA_KINDS


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("profile", ["smoke", "faithful"])
def test_every_experiment_instantiates(name, profile):
    method, cfg = instantiate([f"experiment={name}", f"profile={profile}"])
    assert cfg.experiment_name == name


@pytest.mark.parametrize("name", ["classical", "ddpm_single", "ddpm_dipnoise", "ddpm_dataset"])
def test_dip_only_groups_stay_out_of_other_methods(name):
    from dipddpm.methods.classical import DIP_ONLY_GROUPS

    kind = __import__(f"dipddpm.methods.{name}", fromlist=["DATA_KINDS"]).DATA_KINDS[0]
    cfg = composed(*DATA_COMPANIONS[kind], f"method={name}")
    assert not set(DIP_ONLY_GROUPS) & set(cfg)
    if name != "ddpm_dipnoise":  # its method.steps is the chain length, not a placeholder
        assert "steps" not in cfg.method
    assert set(DIP_ONLY_GROUPS) <= set(composed("method=dip"))
