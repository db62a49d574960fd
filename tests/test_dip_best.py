"""method=dip_best returns one image and scores that image: final_from=stopped (the image early
stopping chose) and replica_output=mean (the pixel-wise mean of the replicas' returned images,
collapsed replicas left out), checked against the replicas' own images and by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import composed, run_method
from omegaconf import OmegaConf
from PIL import Image

from dipddpm.dip import DipSettings, Stage, fit_dip
from dipddpm.early_stop import Discrepancy, NoStop, WindowedVariance
from dipddpm.methods import dip as dip_method
from dipddpm.metrics import ssim
from dipddpm.models import build_backbone
from dipddpm.replicas import average_outputs, fit_dip_replicas

TINY = ("backbone=skip_mnist", "data.size=16", "data.sigma=0.1", "method.code_channels=4", "eval_every=1",
        "device=cpu")
WMV = ("early_stop=wmv", "early_stop.window=4", "early_stop.patience=6")
REPLICATED = (*TINY, *WMV, "method.steps=30", "method.replicas=3", "method.final_from=stopped",
              "method.replica_output=mean")


def psnr_by_hand(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """10 log10(1 / MSE) of two images in [0, 1], in float64."""
    mse = float(((reference.double() - estimate.double()) ** 2).mean())
    return 10 * math.log10(1.0 / mse)


def to_hwc(image: torch.Tensor) -> np.ndarray:
    return image[0].double().numpy().transpose(1, 2, 0)


def png_levels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int64)


@pytest.fixture
def replica_results(monkeypatch):
    """Calls the real fit_dip_replicas from the DIP method and keeps (clean, results) of each call;
    ``mark_collapsed`` (set by a test) flags those replicas as collapsed before the method sees them."""
    calls, mark_collapsed = [], set()

    def spy(*args, **kwargs):
        results = fit_dip_replicas(*args, **kwargs)
        for k in mark_collapsed:
            results[k].collapsed = True
        calls.append((kwargs["clean"], results))
        return results

    monkeypatch.setattr(dip_method, "fit_dip_replicas", spy)
    return calls, mark_collapsed


# --- final_from: stopped ------------------------------------------------------------------------

def test_final_from_stopped_scores_the_image_wmv_chose(tmp_path):
    cfg = (*TINY, *WMV, "method.steps=40")
    last = run_method(dip_method, composed(*cfg), tmp_path / "last", seed=1)
    stopped = run_method(dip_method, composed(*cfg, "method.final_from=stopped"), tmp_path / "stopped", seed=1)
    assert last["steps"] < 40 and last["wmv_min_step"] < last["stop_step"], "WMV must stop after its minimum"
    assert last["psnr_final"] != pytest.approx(last["psnr_stop"], abs=1e-3), "the choice must not be the last image"
    assert stopped["psnr_final"] == stopped["psnr_stop"] == last["psnr_stop"]
    assert stopped["ssim_final"] == stopped["ssim_stop"] == last["ssim_stop"]
    assert stopped["steps"] == last["steps"] and stopped["stop_step"] == last["stop_step"]
    assert (tmp_path / "stopped" / "final.png").read_bytes() == (tmp_path / "stopped" / "stopped.png").read_bytes()


def test_final_from_stopped_without_a_rule_is_the_last_output():
    generator = torch.Generator().manual_seed(3)
    clean = torch.rand((1, 3, 16, 16), generator=generator)
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    net_spec = OmegaConf.create({"name": "cnn", "depth": 3})
    finals = {}
    for final_from in ("last_output", "stopped"):
        torch.manual_seed(0)
        net = build_backbone(net_spec, 3, 3)
        settings = DipSettings(lr=0.01, ema=0.5, eval_every=4, final_from=final_from, keep_cpu_memory=False)
        finals[final_from] = fit_dip(net, [Stage(0, 10, noisy, noisy)], settings, NoStop(), clean=clean)
    assert torch.equal(finals["stopped"].final, finals["last_output"].final)
    assert torch.equal(finals["stopped"].final, finals["stopped"].stopped)


def test_final_from_stopped_is_the_wmv_choice_in_the_loop():
    generator = torch.Generator().manual_seed(4)
    clean = torch.rand((1, 3, 16, 16), generator=generator)
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    torch.manual_seed(0)
    net = build_backbone(OmegaConf.create({"name": "cnn", "depth": 3}), 3, 3)
    settings = DipSettings(lr=0.01, ema=0.9, eval_every=1, final_from="stopped", keep_cpu_memory=False)
    rule = WindowedVariance(window=3, patience=4)
    result = fit_dip(net, [Stage(0, 200, noisy, noisy)], settings, rule, clean=clean)
    best_step, _ = rule.minimum()
    assert result.steps_run < 200, "the rule must stop the run"
    assert torch.equal(result.final, result.stopped)
    # the returned image is the averaged output scored at the variance minimum
    row = next(r for r in result.curve if r["step"] == best_step)
    assert psnr_by_hand(clean, result.final) == pytest.approx(row["psnr"], abs=1e-5)
    assert psnr_by_hand(clean, result.final) != pytest.approx(result.curve[-1]["psnr"], abs=1e-6)


def test_the_discrepancy_rule_stops_the_loop_where_the_fit_reaches_the_noise_level():
    generator = torch.Generator().manual_seed(4)
    clean = torch.rand((1, 3, 16, 16), generator=generator)
    noisy = (clean + 0.1 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    torch.manual_seed(1)   # (seed 0 collapses at lr 0.01: a dead net never gets near the observation)
    net = build_backbone(OmegaConf.create({"name": "cnn", "depth": 3}), 3, 3)
    settings = DipSettings(lr=0.003, ema=0.9, eval_every=1, final_from="stopped", keep_cpu_memory=False)
    rule = Discrepancy(noisy, sigma=0.1, factor=1.0, every=3)
    result = fit_dip(net, [Stage(0, 400, noisy, noisy)], settings, rule, clean=clean)
    # the curve's psnr_noisy is the returned image against the observation: 10 log10(1 / mse)
    mse = {row["step"]: 10 ** (-row["psnr_noisy"] / 10) for row in result.curve}
    expected = min(step for step, value in mse.items() if step % 3 == 0 and value <= 0.01)
    assert result.steps_run == expected + 1 < 400
    assert mse[expected - 3] > 0.01
    assert torch.equal(result.final, result.stopped)
    assert psnr_by_hand(noisy, result.final) == pytest.approx(result.curve[-1]["psnr_noisy"], abs=1e-5)


# --- replica_output: mean ------------------------------------------------------------------------

def test_replica_output_mean_scores_the_mean_of_the_replicas_images(tmp_path, replica_results):
    calls, _ = replica_results
    metrics = run_method(dip_method, composed(*REPLICATED), tmp_path, seed=2)
    (clean, results), = calls
    assert not any(r.collapsed for r in results)
    assert all(torch.equal(r.final, r.stopped) for r in results)
    mean = torch.stack([r.stopped.double() for r in results]).mean(dim=0)
    assert metrics["psnr_final"] == pytest.approx(psnr_by_hand(clean, mean), abs=1e-6)
    assert metrics["ssim_final"] == pytest.approx(ssim(to_hwc(clean), to_hwc(mean)), abs=1e-6)
    assert metrics["replicas_averaged"] == 3 and metrics["collapsed_replicas"] == 0 and not metrics["collapsed"]
    items = metrics["items"]
    assert [item["psnr_final"] for item in items] == pytest.approx([psnr_by_hand(clean, r.stopped) for r in results],
                                                                  abs=1e-6)
    assert metrics["psnr_final"] != pytest.approx(np.mean([item["psnr_final"] for item in items]), abs=1e-3)
    assert metrics["psnr_stop"] == pytest.approx(np.mean([item["psnr_stop"] for item in items]))
    assert metrics["psnr_noisy_input"] == items[0]["psnr_noisy_input"]
    levels = png_levels(tmp_path / "final.png")
    assert np.abs(levels - np.round(to_hwc(mean) * 255)).max() <= 1
    assert not np.array_equal(levels, png_levels(tmp_path / "replica_0" / "final.png"))


def test_a_collapsed_replica_is_left_out_of_the_mean(tmp_path, replica_results):
    calls, mark_collapsed = replica_results
    mark_collapsed.add(1)
    metrics = run_method(dip_method, composed(*REPLICATED), tmp_path, seed=2)
    (clean, results), = calls
    mean = (results[0].final.double() + results[2].final.double()) / 2
    assert metrics["psnr_final"] == pytest.approx(psnr_by_hand(clean, mean), abs=1e-6)
    assert metrics["replicas_averaged"] == 2 and metrics["collapsed_replicas"] == 1 and not metrics["collapsed"]


def test_average_outputs_keeps_every_replica_when_all_or_none_collapsed():
    images = [torch.full((1, 1, 2, 2), value) for value in (0.1, 0.4, 0.7)]
    mean, kept = average_outputs(images, [False, True, False])
    assert kept == [0, 2] and torch.allclose(mean, torch.full((1, 1, 2, 2), 0.4))
    for flags in ([True] * 3, [False] * 3):
        mean, kept = average_outputs(images, flags)
        assert kept == [0, 1, 2] and torch.allclose(mean, torch.full((1, 1, 2, 2), 0.4))
    with pytest.raises(ValueError, match="collapse flags"):
        average_outputs(images, [False])


def test_replica_output_is_validated():
    from dipddpm.errors import ConfigError

    with pytest.raises(ConfigError, match="method.replica_output"):
        dip_method.validate(composed(*TINY, "method.replica_output=median"))
    with pytest.raises(ConfigError, match="method.final_from"):
        dip_method.validate(composed(*TINY, "method.final_from=best"))


# --- method=dip_best end to end -----------------------------------------------------------------

def test_dip_best_returns_one_image_without_the_clean_image_on_a_grey_image(tmp_path, train):
    cfg = composed(*TINY, "method=dip_best")
    assert (cfg.method.final_from, cfg.method.replica_output, cfg.method.replicas) == ("stopped", "mean", 2)
    assert dip_method.clean_image_uses(cfg) == []
    assert (cfg.early_stop.name, cfg.early_stop.factor, cfg.early_stop.sigma) == ("discrepancy", 0.94, None)
    done = train(*TINY, "method=dip_best", "data.grayscale=true", "method.steps=30", "early_stop.every=2",
                 f"output_root={tmp_path}", "threads=1")
    assert done.returncode == 0, done.stderr[-2000:]
    result_path, = tmp_path.rglob("result.json")
    result = json.loads(result_path.read_text())
    run_dir = result_path.parent
    assert result["status"] == "ok" and result["uses_clean_image"] is False and result["clean_image_uses"] == []
    metrics = result["metrics"]
    assert metrics["replicas_averaged"] == 2
    final = png_levels(run_dir / "final.png")
    assert final.shape == (16, 16), "one grey image"
    stopped = np.mean([png_levels(run_dir / f"replica_{k}" / "stopped.png") for k in range(2)], axis=0)
    assert np.abs(final - stopped).max() <= 1, "final.png is the mean of the replicas' stopped images"
    assert [item["psnr_final"] for item in metrics["items"]] == [item["psnr_stop"] for item in metrics["items"]]
    # psnr_final is the PSNR of final.png (up to its 8-bit rounding), not the replicas' mean PSNR
    clean = png_levels(run_dir / "clean.png") / 255.0
    assert metrics["psnr_final"] == pytest.approx(10 * math.log10(1 / np.mean((clean - final / 255.0) ** 2)), abs=0.02)
    assert metrics["psnr_final"] != pytest.approx(np.mean([i["psnr_final"] for i in metrics["items"]]), abs=0.05)
