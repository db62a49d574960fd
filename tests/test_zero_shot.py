"""Zero-shot denoisers (ZS-N2N, Noise2Fast), the bm3d-missing path and dip_best's config."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from skimage import data, io

from conftest import REPO, composed, run_method
from dipddpm.data.images import Observation
from dipddpm.errors import ConfigError
from dipddpm.methods import classical, noise2fast, zero_shot, zsn2n

SQUARES = torch.tensor([[(4 * i + j) ** 2 for j in range(4)] for i in range(4)], dtype=torch.float32)
RAMP = torch.arange(16, dtype=torch.float32).reshape(4, 4)


def test_zsn2n_downsampler_matches_hand_computed_values():
    first, second = zsn2n.pair_downsample(SQUARES[None, None])
    # D1 = (y[2i, 2j] + y[2i+1, 2j+1]) / 2: (0 + 25)/2, (4 + 49)/2, (64 + 169)/2, (100 + 225)/2
    assert first[0, 0].tolist() == [[12.5, 26.5], [116.5, 162.5]]
    # D2 = (y[2i, 2j+1] + y[2i+1, 2j]) / 2: (1 + 16)/2, (9 + 36)/2, (81 + 144)/2, (121 + 196)/2
    assert second[0, 0].tolist() == [[8.5, 22.5], [112.5, 158.5]]


def test_zsn2n_downsampler_is_the_papers_strided_filters_per_channel():
    image = torch.rand(2, 3, 9, 10, generator=torch.Generator().manual_seed(0))
    first, second = zsn2n.pair_downsample(image)
    filters = torch.tensor([[[[0.5, 0.0], [0.0, 0.5]]], [[[0.0, 0.5], [0.5, 0.0]]]])
    for channel in range(3):
        expected = F.conv2d(image[:, channel:channel + 1], filters, stride=2)   # an odd last row is dropped
        assert torch.allclose(first[:, channel], expected[:, 0]) and torch.allclose(second[:, channel], expected[:, 1])
    assert first.shape == (2, 3, 4, 5)


def test_zsn2n_loss_is_residual_plus_consistency():
    torch.manual_seed(0)
    net = zsn2n.NoisePredictor(1, 4)
    noisy = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        d1, d2 = zsn2n.pair_downsample(noisy)
        p1, p2 = d1 - net(d1), d2 - net(d2)
        e1, e2 = zsn2n.pair_downsample(noisy - net(noisy))
    mse = lambda a, b: float(((a - b) ** 2).mean())  # noqa: E731
    expected = 0.5 * (mse(p1, d2) + mse(p2, d1)) + 0.5 * (mse(p1, e1) + mse(p2, e2))
    assert float(zsn2n.zsn2n_loss(net, noisy).detach()) == pytest.approx(expected, rel=1e-6)


def test_zsn2n_step_decay():
    method = composed("method=zsn2n").method
    assert [zsn2n.lr_at(step, method) for step in (0, 1499, 1500, 1999)] == [1e-3, 1e-3, 5e-4, 5e-4]


def test_noise2fast_checkerboard_split_matches_hand_computed_values():
    split = noise2fast.checkerboard_split(RAMP[None, None])
    values = {name: tensor[0, 0].tolist() for name, tensor in split.items()}
    assert values["rows_even"] == [[0, 5, 2, 7], [8, 13, 10, 15]]     # y[2i + j % 2, j]
    assert values["rows_odd"] == [[4, 1, 6, 3], [12, 9, 14, 11]]      # y[2i + 1 - j % 2, j]
    assert values["cols_even"] == [[0, 2], [5, 7], [8, 10], [13, 15]]  # y[i, 2j + i % 2]
    assert values["cols_odd"] == [[1, 3], [4, 6], [9, 11], [12, 14]]   # y[i, 2j + 1 - i % 2]


def test_noise2fast_holds_out_one_pair_and_its_net_has_eight_convolutions():
    split = noise2fast.checkerboard_split(torch.rand(1, 3, 7, 6))  # the odd row is dropped
    pairs, held = noise2fast.training_pairs(split)
    assert len(pairs) == 3 and held[0] is split["cols_odd"] and held[1] is split["cols_even"]
    assert all(held is not pair and held[0] is not pair[0] for pair in pairs)
    assert split["rows_even"].shape == (1, 3, 3, 6) and split["cols_even"].shape == (1, 3, 6, 3)
    convolutions = [m for m in noise2fast.CheckerboardNet(3).modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convolutions] == [(3, 3)] * 8 + [(1, 1)]
    assert [c.out_channels for c in convolutions] == [64] * 8 + [3]


TINY = ("backbone=cnn", "data.size=32", "data.image=camera", "data.sigma=0.1", "device=cpu")


@pytest.mark.parametrize("method, overrides", [
    (zsn2n, ("method=zsn2n", "method.steps=150", "method.lr_step=100")),
    (noise2fast, ("method=noise2fast", "method.width=16", "method.patience=20", "method.max_steps=150")),
])
def test_each_zero_shot_method_improves_psnr_on_a_tiny_noisy_image(tmp_path, method, overrides):
    cfg = composed(*TINY, *overrides)
    metrics = run_method(method, cfg, tmp_path)
    assert metrics["psnr_final"] > metrics["psnr_noisy_input"] + 1.0
    assert {"psnr_final", "ssim_final", "psnr_noisy_input", "wall_seconds", "steps"} <= set(metrics)
    assert all((tmp_path / name).is_file() for name in ("clean.png", "noisy.png", "final.png"))
    assert method.clean_image_uses(cfg) == []


@pytest.mark.parametrize("method, overrides", [
    (zsn2n, ("method=zsn2n", "method.steps=5")),
    (noise2fast, ("method=noise2fast", "method.width=8", "method.patience=3", "method.max_steps=6")),
])
def test_the_clean_image_only_scores_the_output(tmp_path, monkeypatch, method, overrides):
    """Two runs whose clean images differ but whose noisy images agree return the same image."""
    cfg = composed(*TINY, *overrides)
    real = zero_shot.load_observation

    def with_clean(scale):
        def load(data_cfg, size=None):
            obs = real(data_cfg, size=size)
            return Observation(obs.name, obs.clean * scale, obs.noisy, obs.sigma)
        return load

    finals = []
    for scale in (1.0, 0.5):
        monkeypatch.setattr(zero_shot, "load_observation", with_clean(scale))
        run_method(method, cfg, tmp_path / str(scale))
        finals.append(io.imread(tmp_path / str(scale) / "final.png"))
    assert np.array_equal(finals[0], finals[1])


def test_noise2fast_stops_on_the_held_out_loss(tmp_path):
    cfg = composed(*TINY, "method=noise2fast", "method.width=8", "method.patience=5", "method.max_steps=400")
    metrics = run_method(noise2fast, cfg, tmp_path)
    assert metrics["stopped_early"] and metrics["steps"] == metrics["best_step"] + 1 + 5 < 400


def test_zero_shot_methods_validate_their_keys():
    with pytest.raises(ConfigError, match="method.steps=0 is not allowed"):
        zsn2n.validate(composed(*TINY, "method=zsn2n", "method.steps=0"))
    with pytest.raises(ConfigError, match="method.patience"):
        noise2fast.validate(composed(*TINY, "method=noise2fast", "method.patience=-1"))


def test_grey_images_work(tmp_path):
    cfg = composed(*TINY, "data.grayscale=true", "method=zsn2n", "method.steps=3")
    metrics = run_method(zsn2n, cfg, tmp_path)
    assert np.isfinite(metrics["psnr_final"])


# ---------------------------------------------------------------- bm3d not installed


def test_missing_bm3d_is_a_note_when_asked(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bm3d", None)           # import bm3d now raises ImportError
    cfg = composed(*TINY, "method=classical", "method.algorithm=bm3d", "method.if_missing=note")
    metrics = run_method(classical, cfg, tmp_path)
    assert metrics["note"] == "not installed (pip install 'dipddpm[baselines]')"
    assert "psnr_final" not in metrics
    with pytest.raises(ConfigError, match="bm3d package is not installed"):
        classical.validate(composed(*TINY, "method=classical", "method.algorithm=bm3d"))


def test_cset_sweep_without_bm3d_has_no_failed_job(tmp_path):
    blocker = tmp_path / "blocked"            # first on the path: `import bm3d` raises ImportError
    blocker.mkdir()
    (blocker / "bm3d.py").write_text("raise ImportError('bm3d is blocked for this test')\n")
    images = tmp_path / "images"
    images.mkdir()
    io.imsave(images / "cam.png", data.camera()[100:164, 200:264], check_contrast=False)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(REPO)]), PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-m", "dipddpm.train", "-m", "experiment=baselines/cset", "profile=smoke", "seeds=1",
         f"data.folder={images}", "method.algorithm=bm3d,tv", f"output_root={tmp_path / 'out'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("result.json")]
    by_algorithm = {r["config"]["method.algorithm"]: r for r in results}
    assert {r["status"] for r in results} == {"ok"}
    assert by_algorithm["bm3d"]["metrics"]["note"] == "not installed (pip install 'dipddpm[baselines]')"
    assert "psnr_final" in by_algorithm["tv"]["metrics"]


def test_zero_shot_methods_and_a_missing_bm3d_join_the_baseline_rows(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bm3d", None)
    job = tmp_path / "seed=0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(composed(*TINY, "profile=smoke")))
    statuses = classical.run_baselines(tmp_path, ["zsn2n", "noise2fast", "bm3d"])
    assert set(statuses.values()) == {"ok"}
    results = {path.parent.name.split(",")[0]: json.loads(path.read_text())
               for path in tmp_path.glob("baseline=*/result.json")}
    assert [results[f"baseline={name}"]["method"] for name in ("zsn2n", "noise2fast", "bm3d")] == \
        ["zsn2n", "noise2fast", "classical"]
    assert results["baseline=bm3d"]["metrics"]["note"] == "not installed (pip install 'dipddpm[baselines]')"
    assert all("psnr_final" in results[f"baseline={name}"]["metrics"] for name in ("zsn2n", "noise2fast"))
    noisy = {path.read_bytes() for path in tmp_path.glob("baseline=*/noisy.png")}
    assert len(noisy) == 1


def test_zero_shot_experiment_runs_every_method_on_every_image_of_the_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, crop in (("cam", data.camera()[100:164, 200:264]), ("cof", data.coffee()[:64, :64])):
        io.imsave(images / f"{name}.png", crop, check_contrast=False)
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-m", "dipddpm.train", "-m", "experiment=denoise/zero_shot", f"data.folder={images}",
         "seeds=1", "data.size=64", "dry_run=true", f"output_root={tmp_path / 'out'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = sorted(path.parent.name.split(",", 1)[1] for path in (tmp_path / "out").rglob("plan.json"))
    assert jobs == sorted(f"data.image={image},data.size=64,method={method},seed=0" for image in ("cam", "cof")
                          for method in ("bm3d", "nlm", "zsn2n", "noise2fast", "dip", "dip_best"))


def test_dip_best_is_one_choice_without_the_clean_image_and_runs_on_grey_images(tmp_path):
    from dipddpm.methods import dip

    cfg = composed(*TINY, "method=dip_best", "data.grayscale=true", "method.steps=12", "early_stop.every=2")
    assert (cfg.method.name, cfg.method.replicas, cfg.method.ema, cfg.early_stop.name, cfg.early_stop.factor) == \
        ("dip", 2, 0.99, "discrepancy", 0.94)
    assert dip.clean_image_uses(cfg) == []
    metrics = run_method(dip, cfg, tmp_path)
    assert metrics["replicas"] == 2 and np.isfinite(metrics["psnr_final"])
