"""Report R5: the wide UNet, the 32x32 colour sets, the DIP-in-DDPM hooks and the experiment sweep."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import composed
from fixtures import write_cifar_batch
from omegaconf import OmegaConf, open_dict
from torch import nn

from dipddpm.data import cifar
from dipddpm.diffusion import chain_timesteps, sample, train_eps
from dipddpm.diffusion.schedule import linear_schedule
from dipddpm.dip import make_code
from dipddpm.errors import ConfigError
from dipddpm.methods import ddpm_dataset
from dipddpm.methods.dip_noise import DipNoise
from dipddpm.models import build_backbone, size_requirement, unet_wide
from dipddpm.profile import apply_profile, preset_merged
from dipddpm.sweep import config_dir

CONF = config_dir()
TINY_UNET = {"name": "unet_wide", "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [16], "dropout": 0.0}
TINY_SKIP = {"name": "skip", "num_channels_down": [4, 4], "num_channels_up": [4, 4], "num_channels_skip": [0, 2]}


# ---------------------------------------------------------------- unet_wide


def test_unet_wide_shapes_and_time_conditioning():
    torch.manual_seed(0)
    net = build_backbone(OmegaConf.create(TINY_UNET), 3, 3).eval()
    assert net.attention_levels == [1]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = net(x, torch.tensor([0, 500]))
        early = net(x, torch.tensor([3, 3]))
        late = net(x, torch.tensor([900, 900]))
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert (early - late).abs().mean() > 1e-3
    assert torch.allclose(net(x[:1], torch.tensor(3)), early[:1], atol=1e-5)
    assert size_requirement(OmegaConf.create(TINY_UNET)) == (2, 2)


def test_unet_wide_config_defaults_groups_and_profiles():
    cfg = OmegaConf.load(CONF / "eps_net" / "unet_wide.yaml")
    assert {k: cfg[k] for k in unet_wide.DEFAULTS} == unet_wide.DEFAULTS
    assert size_requirement(cfg) == (16, 16)
    assert unet_wide.group_count(128, 32) == 32 and unet_wide.group_count(256, 32) == 32
    assert unet_wide.group_count(8, 32) == 2 and unet_wide.group_count(48, 32) == 12
    assert unet_wide.group_count(3, 32) == 1 and unet_wide.group_count(64, 4) == 4
    standard = preset_merged(OmegaConf.to_container(cfg), "eps_net", "standard")
    quick = preset_merged(OmegaConf.to_container(cfg), "eps_net", "quick")
    assert (standard["base_channels"], quick["base_channels"]) == (16, 8) and "at_profile" not in quick
    assert preset_merged(OmegaConf.to_container(cfg), "eps_net", "faithful")["base_channels"] == 128
    with pytest.raises(ConfigError):
        preset_merged(OmegaConf.to_container(cfg) | {"at_profile": {"quick": {"width": 3}}}, "eps_net", "quick")
    for key, value in (("attention_heads", 3), ("dropout", 1.0), ("channel_mults", []), ("num_res_blocks", 0)):
        with pytest.raises(ConfigError) as error:
            unet_wide.build(OmegaConf.create({**TINY_UNET, key: value}), 3, 3)
        assert error.value.key == f"backbone.{key}"


# ---------------------------------------------------------------- data


def test_cifar_loader_reads_python_batches(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    train = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    write_cifar_batch(folder / "data_batch_1", train[:3], [0, 1, 2])
    write_cifar_batch(folder / "data_batch_2", train[3:], [3, 9])
    write_cifar_batch(folder / "test_batch", test, [4, 5, 6])
    for root in (tmp_path, folder):
        cfg = OmegaConf.create({"name": "cifar10", "root": str(root), "limit": None})
        loaded = cifar.load_dataset(cfg, "train")
        assert loaded.images.shape == (5, 3, 32, 32) and loaded.labels.tolist() == [0, 1, 2, 3, 9]
        expected = torch.from_numpy(train.astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
        assert torch.allclose(loaded.images, expected)
        assert cifar.load_dataset(cfg, "test").labels.tolist() == [4, 5, 6]
    limited = cifar.load_dataset(OmegaConf.create({"name": "cifar10", "root": str(folder), "limit": 2}), "train")
    assert len(limited) == 2
    for root in (None, str(tmp_path / "nowhere")):
        with pytest.raises(ConfigError) as error:
            cifar.load_dataset(OmegaConf.create({"name": "cifar10", "root": root, "limit": None}))
        assert error.value.key == "data.root" and "cifar-10-batches-py" in str(error.value)


def test_patches32_is_deterministic_in_range_and_split():
    cfg = OmegaConf.create({"name": "patches32", "images": ["coffee", "astronaut"], "sides": [48, 64], "stride": 16,
                            "holdout_fraction": 0.2, "limit": None})
    first = cifar.load_dataset(cfg, "train")
    cifar._patch_arrays.cache_clear()
    cifar._resized.cache_clear()
    again = cifar.load_dataset(cfg, "train")
    held = cifar.load_dataset(cfg, "test")
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert first.images.shape[1:] == (3, 32, 32) and first.images.dtype == torch.float32
    assert first.images.min() >= -1 and first.images.max() <= 1 and first.images.std() > 0.1
    assert set(first.labels.tolist()) == set(held.labels.tolist()) == {0, 1}
    train_bytes = {p.tobytes() for p in cifar.patch_split(["coffee"], [64], 1, 0.2, "train")[0]}
    held_bytes = {p.tobytes() for p in cifar.patch_split(["coffee"], [64], 1, 0.2, "test")[0]}
    assert train_bytes and held_bytes and not train_bytes & held_bytes
    width = cifar._resized("coffee", 64).shape[1]
    assert len(held_bytes) <= (64 - 31) * (max(32, round(0.2 * width)) - 31)
    assert len(cifar.load_dataset(OmegaConf.merge(cfg, {"limit": 5}), "train")) == 5
    with pytest.raises(ConfigError):
        cifar.load_dataset(OmegaConf.merge(cfg, {"images": ["moon"]}))


# ---------------------------------------------------------------- where the DIP output goes


@pytest.fixture(scope="module")
def dip_noise():
    torch.manual_seed(0)
    net = build_backbone(OmegaConf.create(TINY_SKIP), 4, 3)
    return DipNoise(net, 4, "uniform", 0.1, "bank", 6, "standardize", torch.Generator().manual_seed(1), "cpu")


def in_bank(noise, bank):
    return all(any(torch.equal(row, b) for b in bank) for row in noise)


class ZeroEps(nn.Module):
    """eps = 0 (so the loss is mean(target^2)); records every x_t and t it sees."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x, t):
        self.seen.append((x.detach().clone(), t.clone()))
        return torch.zeros_like(x) + 0 * self.weight


def spy_training(mode, dip_noise):
    """Train two iterations with spies on both hooks; returns what each hook and the model saw."""
    forward_noise, loss_target = ddpm_dataset.training_hooks(mode, dip_noise, torch.Generator().manual_seed(5))
    record = {"x0": [], "noise": [], "target": []}

    def noise_spy(x0):
        record["x0"].append(x0.clone())
        record["noise"].append(forward_noise(x0))
        return record["noise"][-1]

    def target_spy(noise, x0):
        record["target"].append(loss_target(noise, x0))
        return record["target"][-1]

    model = ZeroEps()
    schedule = linear_schedule(10, 0.1, 0.2)
    data = torch.linspace(-1, 1, 4 * 3 * 32 * 32).reshape(4, 3, 32, 32)
    result = train_eps(model, schedule, data, iterations=2, batch_size=4, lr=1e-3, seed=0, forward_noise=noise_spy,
                       loss_target=target_spy if loss_target is not None else None)
    record.update(seen=model.seen, losses=result.losses, schedule=schedule, has_target=loss_target is not None)
    return record


def test_dip_modes_change_exactly_their_parts(dip_noise):
    bank = dip_noise.bank
    assert bank.shape == (6, 3, 32, 32)
    assert torch.allclose(bank.flatten(1).mean(1), torch.zeros(6), atol=1e-5)
    assert torch.allclose(bank.flatten(1).std(1), torch.ones(6), atol=1e-5)
    runs = {mode: spy_training(mode, dip_noise) for mode in ddpm_dataset.DIP_MODES}
    for mode, run in runs.items():
        for (x_t, t), x0, noise in zip(run["seen"], run["x0"], run["noise"]):
            assert torch.allclose(x_t, run["schedule"].q_sample(x0, t, noise), atol=1e-6)
        targets = run["target"] if run["has_target"] else run["noise"]
        assert run["losses"] == pytest.approx([float(torch.mean(y**2)) for y in targets], rel=1e-5)
    pure, idea1, idea2 = runs["none"], runs["replace_noise"], runs["target"]
    assert not pure["has_target"] and not idea1["has_target"] and idea2["has_target"]
    assert not any(in_bank(n, bank) for n in pure["noise"])
    assert all(in_bank(n, bank) for n in idea1["noise"])
    for a, b in zip(pure["noise"], idea2["noise"]):
        assert torch.equal(a, b)
    for (xa, ta), (xb, tb) in zip(pure["seen"], idea2["seen"]):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    assert all(in_bank(y, bank) for y in idea2["target"])


def test_only_replace_noise_changes_sampling_noise(dip_noise):
    schedule = linear_schedule(6, 0.1, 0.2)
    assert ddpm_dataset.sampling_noise_fn("none", dip_noise, torch.Generator()) is None
    assert ddpm_dataset.sampling_noise_fn("target", dip_noise, torch.Generator()) is None
    noise_fn = ddpm_dataset.sampling_noise_fn("replace_noise", dip_noise, torch.Generator().manual_seed(2))
    draws = []
    starts = []

    def spy(shape):
        draws.append(noise_fn(shape))
        return draws[-1]

    sample(ZeroEps(), schedule, (3, 3, 32, 32), noise_fn=spy,
                     callback=lambda t, x, x0: starts.append(x.clone()) if t == 5 else None)
    assert len(draws) == 6 and all(d.shape == (3, 3, 32, 32) and in_bank(d, dip_noise.bank) for d in draws)
    assert torch.equal(starts[0], draws[0])


def test_per_batch_draw_shares_one_fresh_output(dip_noise):
    per_batch = DipNoise(dip_noise.net, 4, "uniform", 0.1, "per_batch", 0, "raw", torch.Generator(), "cpu")
    generator = torch.Generator().manual_seed(0)
    first, second = per_batch.draw(3, generator), per_batch.draw(3, generator)
    assert torch.equal(first[0], first[2]) and not torch.equal(first[0], second[0])
    assert first.min() >= 0 and first.max() <= 1


def test_r5_experiment_feeds_idea_1_the_raw_dip_output_for_a_fresh_code_per_call(dip_noise):
    """R5's idea 1 used DIP(z) as it is (in [0, 1], non-zero mean) for a fresh z per call: the
    experiment sets that for replace_noise; idea 2 and the method's default keep the standardised bank."""
    configs = {mode: composed("experiment=dip_in_ddpm/ideas", "profile=smoke", f"method.dip_mode={mode}",
                              "method.dip.code_channels=4") for mode in ("replace_noise", "target")}
    assert composed("method=ddpm_dataset").method.noise.output_map == "standardize"
    idea1 = DipNoise.from_config(dip_noise.net, configs["replace_noise"].method.dip,
                                 configs["replace_noise"].method.noise, torch.Generator(), "cpu")
    assert idea1.bank is None
    generator = torch.Generator().manual_seed(7)
    first = idea1.draw(3, generator)
    second = idea1.draw(3, generator)
    replay = torch.Generator().manual_seed(7)
    with torch.no_grad():
        expected = [dip_noise.net.train()(make_code(4, 32, "uniform", 0.1, replay, "cpu")) for _ in range(2)]
    assert torch.equal(first, expected[0].expand(3, -1, -1, -1))
    assert torch.equal(second, expected[1].expand(3, -1, -1, -1))
    assert first.min() >= 0 and first.max() <= 1 and float(first.mean()) > 0.1
    idea2 = DipNoise.from_config(dip_noise.net, configs["target"].method.dip, configs["target"].method.noise,
                                 torch.Generator().manual_seed(1), "cpu")
    assert idea2.bank.shape[0] == configs["target"].method.noise.bank_size
    assert torch.allclose(idea2.bank.flatten(1).mean(1), torch.zeros(len(idea2.bank)), atol=1e-4)


def test_respaced_chain_keeps_the_marginals():
    schedule = linear_schedule(100, 1e-4, 0.01)
    timesteps = sorted(chain_timesteps(99, 5))
    short = schedule.respaced(timesteps)
    assert timesteps == [0, 25, 50, 74, 99]
    assert torch.allclose(short.alphas_cumprod, schedule.alphas_cumprod[timesteps])
    all_steps = sorted(chain_timesteps(99, 100))
    full = schedule.respaced(all_steps)
    assert all_steps == list(range(100)) and torch.allclose(full.betas, schedule.betas)


def test_sampler_tracks_the_unclipped_x0_on_a_respaced_chain():
    cfg = OmegaConf.create({"method": {"dip_mode": "none", "sample": {"variance": "beta", "clip_x0": True}}})
    schedule = linear_schedule(50, 1e-2, 0.2)
    model = ZeroEps()
    seen = []
    result = ddpm_dataset.sample_chain(model, cfg, schedule, 2, 5, None, torch.Generator().manual_seed(0), "cpu",
                                       callback=lambda t, x, x0: seen.append((t, x, x0)))
    assert [t for t, _, _ in seen] == [49, 37, 24, 12, 0] and result.model_calls == 5
    assert [int(t[0]) for _, t in model.seen] == [49, 37, 24, 12, 0]
    t, x_t, x0 = seen[0]
    assert torch.allclose(x0, x_t / schedule.alphas_cumprod[49].sqrt().float()) and x0.abs().max() > 1


def test_rd_rows_and_nearest_reference():
    images = torch.stack([torch.full((3, 2, 2), v) for v in (-1.0, 0.0, 1.0)])
    samples = torch.stack([torch.full((3, 2, 2), 0.9), torch.full((3, 2, 2), -0.2)])
    assert torch.equal(ddpm_dataset.nearest_images(samples, images), images[[2, 1]])
    x0_preds = torch.stack([samples + 1.0, samples])
    refs = {"train_image": images[0].expand_as(samples), "nearest": images[[2, 1]]}
    rows = ddpm_dataset.rd_rows([9, 0], x0_preds, refs, "nearest")
    assert [r["t"] for r in rows] == [9, 0] and rows[1]["rmse"] == rows[1]["rmse_nearest"]
    assert rows[1]["rmse_nearest"] == pytest.approx((0.1 + 0.2) / 2)
    assert rows[1]["rmse_train_image"] == pytest.approx((1.9 + 0.8) / 2)


@pytest.mark.parametrize("overrides,key", [
    (["method.dip_mode=both"], "method.dip_mode"),
    (["method.dip_mode=target", "method.noise.output_map=clip"], "method.noise.output_map"),
    (["method.dip_mode=target", "method.noise.draw=per_sample"], "method.noise.draw"),
    (["method.eval.reference=mean"], "method.eval.reference"),
    (["method.sample.calls=1001"], "method.sample.calls"),
    (["method.sample.sampler=plms"], "method.sample.sampler"),
    (["method.eval.reference_index=999999"], "method.eval.reference_index"),
    (["data=cifar10"], "data.root"),
    (["eps_net.name=skip"], "eps_net.name"),
])
def test_bad_config_is_a_config_error(overrides, key):
    with pytest.raises(ConfigError) as error:
        ddpm_dataset.validate(apply_profile(composed("experiment=dip_in_ddpm/ideas", "profile=smoke", *overrides)))
    assert error.value.key == key


# R5 under each profile: (training images, iterations per epoch, grid iterations, samples, lr, eps-net width).
# 100 epochs of batch 128 on 256 | 128 | 2043 images; grids every 5 epochs under faithful only.
R5_PLANS = {
    "standard": (256, 2, [], 64, 2e-4, 16),
    "quick": (128, 1, [], 32, 2e-3, 8),
    "faithful": (2043, 16, list(range(80, 1600, 80)), 64, 2e-4, 128),
}


@pytest.mark.parametrize("profile", sorted(R5_PLANS))
def test_experiment_sets_r5_schedule_per_run(profile):
    """R5's T per run, DIP fits, epochs and chains are the same under faithful, standard and quick; the
    profiles' presets change the training set, the eps-net's width, the grid cadence and quick's lr."""
    images, per_epoch, grids, samples, lr, width = R5_PLANS[profile]
    configs = {mode: apply_profile(composed("experiment=dip_in_ddpm/ideas", f"profile={profile}",
                                            f"method.dip_mode={mode}")) for mode in ddpm_dataset.DIP_MODES}
    plans = {mode: ddpm_dataset.plan(cfg) for mode, cfg in configs.items()}
    assert {m: p["num_timesteps"] for m, p in plans.items()} == {"none": 1000, "replace_noise": 800, "target": 800}
    assert {m: p["chain_steps"] for m, p in plans.items()} == {"none": 1000, "replace_noise": 800, "target": 800}
    assert {m: p["dip_steps"] for m, p in plans.items()} == {"none": 0, "replace_noise": 5, "target": 1000}
    for p in plans.values():
        assert (p["train_images"], p["iterations_per_epoch"], p["epochs"]) == (images, per_epoch, 100)
        assert (p["train_iterations"], p["grid_iterations"]) == (100 * per_epoch, grids)
        assert (p["num_samples"], p["lr"]) == (samples, lr)
    assert configs["none"].eps_net.base_channels == width


@pytest.mark.parametrize("group,preset", [("method", {"train": {"learning_rate": 1.0}}), ("data", {"size": 16})])
def test_presets_name_their_unknown_keys(group, preset):
    faithful = composed("experiment=dip_in_ddpm/ideas", "profile=faithful")
    with open_dict(faithful):
        faithful[group].at_profile = {"faithful": preset}
    with pytest.raises(ConfigError) as error:
        apply_profile(faithful)
    assert error.value.key == f"{group}.at_profile.faithful"


# ---------------------------------------------------------------- the sweep


def test_smoke_sweep_writes_three_runs(tmp_path):
    command = [sys.executable, "-c", "from dipddpm.train import cli; cli()", "-m", "experiment=dip_in_ddpm/ideas",
               "profile=smoke", "seeds=1", f"output_root={tmp_path}", f"cache_dir={tmp_path / 'cache'}", "threads=1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "dip_in_ddpm" / "ideas" / "smoke"
    results = [json.loads(p.read_text()) | {"dir": p.parent} for p in sorted(sweep.rglob("result.json"))]
    assert sorted(r["config"]["method.dip_mode"] for r in results) == ["none", "replace_noise", "target"]
    for result in results:
        metrics = result["metrics"]
        assert result["status"] == "ok", result["error"]
        assert np.isfinite(metrics["final_rmse"]) and np.isfinite(metrics["frechet"]) and metrics["frechet"] >= 0
        lines = (result["dir"] / "rd_curve.csv").read_text().splitlines()
        assert lines[0].startswith("t,step,rmse") and len(lines) == 1 + metrics["chain_steps"]
        assert float(lines[-1].split(",")[2]) == pytest.approx(metrics["final_rmse"])
        assert (result["dir"] / "rd_curve.png").is_file() and (result["dir"] / "samples.png").is_file()
        expected_t = 1000 if result["config"]["method.dip_mode"] == "none" else 800
        assert result["config"]["scheduler.num_timesteps"] == expected_t
    table = (sweep / "table.md").read_text()
    assert "pure DDPM" in table and "idea 1" in table and "idea 2" in table and "about 0.745" in table
