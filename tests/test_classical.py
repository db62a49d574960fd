"""method=classical, baseline rows beside DIP sweeps, the baselines/cset experiment, and the
compare support they use (result items, mean row, baseline rows)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import composed, run_method
from PIL import Image

from dipddpm.compare import build_table, compare_paths, gather
from dipddpm.errors import ConfigError
from dipddpm.methods import classical, dip
from dipddpm.sweep import config_dir, config_hash

TINY = ["backbone=cnn", "backbone.depth=3", "data.size=32", "data.sigma=0.1", "profile=smoke"]
TRAIN = shutil.which("dipddpm-train") or str(Path(sys.executable).parent / "dipddpm-train")


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64) / 255.0


def psnr_by_hand(reference, estimate) -> float:
    return 10.0 * math.log10(1.0 / float(np.mean((reference - estimate) ** 2)))


def needs(algorithm):
    missing = classical.package_missing(algorithm)
    return pytest.mark.skipif(missing is not None, reason=f"{missing} is not installed")


# ---------------------------------------------------------------- the method


@pytest.mark.parametrize("algorithm", [
    "nlm", "tv", pytest.param("wavelet", marks=needs("wavelet")), pytest.param("bm3d", marks=needs("bm3d"))])
@pytest.mark.parametrize("grayscale", [False, True])
def test_each_algorithm_improves_psnr_on_a_tiny_noisy_image(tmp_path, algorithm, grayscale):
    cfg = composed(*TINY, "method=classical", f"method.algorithm={algorithm}", f"data.grayscale={grayscale}")
    metrics = run_method(classical, cfg, tmp_path)
    clean, noisy, final = (png(tmp_path / f"{name}.png") for name in ("clean", "noisy", "final"))
    assert clean.shape == ((32, 32) if grayscale else (32, 32, 3))
    assert 19.5 < psnr_by_hand(clean, noisy) < 21.5          # sigma 0.1, clipped: about 20 dB
    assert metrics["psnr_noisy_input"] == pytest.approx(psnr_by_hand(clean, noisy), abs=0.1)
    assert metrics["psnr_final"] == pytest.approx(psnr_by_hand(clean, final), abs=0.15)
    assert metrics["psnr_final"] > metrics["psnr_noisy_input"] + 2.0
    assert (metrics["sigma_source"], metrics["sigma_used"], metrics["image_size"]) == ("known", 0.1, 32)
    assert "psnr_best" not in metrics and "best_step" not in metrics
    assert classical.clean_image_uses(cfg) == []


def test_classical_and_dip_runs_see_the_identical_noisy_input(tmp_path):
    dip_cfg = composed(*TINY, "data.noise_seed=7", "seed=3")
    classical_cfg = composed(*TINY, "data.noise_seed=7", "method=classical", "method.algorithm=tv")
    dip_metrics = run_method(dip, dip_cfg, tmp_path / "dip")
    classical_metrics = run_method(classical, classical_cfg, tmp_path / "classical")
    assert (tmp_path / "dip" / "noisy.png").read_bytes() == (tmp_path / "classical" / "noisy.png").read_bytes()
    assert dip_metrics["psnr_noisy_input"] == classical_metrics["psnr_noisy_input"]
    other_draw = composed(*TINY, "data.noise_seed=8", "method=classical", "method.algorithm=tv")
    run_method(classical, other_draw, tmp_path / "other")
    assert (tmp_path / "other" / "noisy.png").read_bytes() != (tmp_path / "dip" / "noisy.png").read_bytes()


@needs("wavelet")                                           # estimate_sigma uses PyWavelets too
def test_estimated_sigma_is_recorded_and_close_to_the_true_one(tmp_path):
    cfg = composed(*TINY, "method=classical", "method.algorithm=nlm", "method.sigma=estimated",
                   "data.image=camera")
    metrics = run_method(classical, cfg, tmp_path)
    assert metrics["sigma_source"] == "estimated"
    assert metrics["sigma_used"] != 0.1 and abs(metrics["sigma_used"] - 0.1) < 0.03
    assert metrics["parameters"]["h"] == pytest.approx(0.8 * metrics["sigma_used"])
    text, plan = classical.describe(cfg)
    assert "estimated from each noisy image" in text and plan["parameters"]["h"] == "0.8 * sigma"


def test_missing_bm3d_gives_the_install_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "bm3d", None)       # import bm3d now raises ImportError
    cfg = composed(*TINY, "method=classical", "method.algorithm=bm3d")
    with pytest.raises(ConfigError) as caught:
        classical.validate(cfg)
    assert str(caught.value) == ("method.algorithm='bm3d' is not allowed: the bm3d package is not installed; "
                                 "install it with pip install 'dipddpm[baselines]'")
    assert "bm3d" not in classical.available_algorithms()


def test_missing_pywavelets_stops_wavelet_and_estimated_sigma(monkeypatch):
    monkeypatch.setitem(sys.modules, "pywt", None)
    with pytest.raises(ConfigError, match=r"^method.algorithm='wavelet' is not allowed: the PyWavelets package"):
        classical.validate(composed(*TINY, "method=classical", "method.algorithm=wavelet"))
    with pytest.raises(ConfigError, match=r"^method.sigma='estimated' is not allowed: .*dipddpm\[baselines\]'$"):
        classical.validate(composed(*TINY, "method=classical", "method.sigma=estimated"))


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="method.algorithm='median'"):
        classical.validate(composed(*TINY, "method=classical", "method.algorithm=median"))
    with pytest.raises(ConfigError, match="method.sigma='oracle'"):
        classical.validate(composed(*TINY, "method=classical", "method.sigma=oracle"))
    with pytest.raises(ConfigError, match="data.image='nosuch'"):
        classical.validate(composed(*TINY, "method=classical", "method.images=[camera,nosuch]"))


def test_images_all_uses_every_file_of_the_folder(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("Zebra", "apple"):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    cfg = composed(*TINY, "method=classical", "method.algorithm=tv", "method.images=all", f"data.folder={folder}",
                   "data.size=32")
    metrics = run_method(classical, cfg, tmp_path / "run")
    assert [item["image"] for item in metrics["items"]] == ["Zebra", "apple"]
    assert metrics["image_count"] == 2
    assert metrics["psnr_final"] == pytest.approx(np.mean([item["psnr_final"] for item in metrics["items"]]))
    for item in metrics["items"]:
        clean, final = png(tmp_path / "run" / item["image"] / "clean.png"), png(
            tmp_path / "run" / item["image"] / "final.png")
        assert item["psnr_final"] == pytest.approx(psnr_by_hand(clean, final), abs=0.15)


# ---------------------------------------------------------------- compare support


def write_result(job_dir, **result):
    job_dir.mkdir(parents=True, exist_ok=True)
    base = {"status": "ok", "error": None, "experiment": "t", "method": "dip", "seed": 0, "overrides": {},
            "choices": {}, "config": {}, "config_hash": job_dir.name, "metrics": {}}
    (job_dir / "result.json").write_text(json.dumps(base | result), encoding="utf-8")


def test_items_expand_into_rows_and_the_mean_row_averages_the_rows(tmp_path):
    spec = {"rows": ["image"], "columns": ["method.algorithm"], "values": ["psnr_final"], "mean_row": True,
            "format": {"psnr_final": ".2f"}}
    psnr = {("nlm", 0): [30.0, 20.0], ("nlm", 1): [32.0, 22.0], ("tv", 0): [28.0, 25.0]}
    for (algorithm, seed), values in psnr.items():
        items = [{"image": name, "psnr_final": value, "sigma_source": "known", "parameters": {"h": 1}}
                 for name, value in zip(("b", "a"), values)]
        write_result(tmp_path / f"{algorithm}_{seed}", method="classical", seed=seed, table=spec,
                     overrides={"method.algorithm": algorithm, "seed": str(seed)},
                     metrics={"psnr_final": float(np.mean(values)), "items": items})
    frame = gather([tmp_path])
    assert len(frame) == 6 and list(frame["item.image"]) == ["b", "a"] * 3
    assert list(frame["psnr_final"]) == [30.0, 20.0, 32.0, 22.0, 28.0, 25.0]
    assert "items.1" not in frame.columns and "parameters" not in frame.columns
    table = compare_paths([tmp_path]).table
    nlm_mean = np.mean([np.mean([30.0, 32.0]), np.mean([20.0, 22.0])])
    nlm_std = np.std([31.0, 21.0], ddof=1)
    assert list(table.display["image"]) == ["a", "b", "mean"]
    a, b = "psnr_final [method.algorithm=nlm]", "psnr_final [method.algorithm=tv]"
    assert list(table.display[a]) == ["21.00 ± 1.41", "31.00 ± 1.41", f"{nlm_mean:.2f} ± {nlm_std:.2f}"]
    assert list(table.display[b]) == ["25.00", "28.00", f"{26.5:.2f} ± {np.std([25.0, 28.0], ddof=1):.2f}"]
    assert list(table.display["n"]) == [3, 3, 6]
    mean_rows = table.numeric[table.numeric["image"] == "mean"]
    assert list(mean_rows["psnr_final_mean"]) == [pytest.approx(26.0), pytest.approx(26.5)]


T11 = {"title": "T1.1", "rows": ["noise_plan"], "columns": ["backbone.depth"], "values": ["psnr_final", "psnr_best"],
       "format": {"psnr_final": ".1f", "psnr_best": ".1f"},
       "report": [{"noise_plan": "single", "backbone.depth": 3, "psnr_final": 26.2}]}


def test_baseline_rows_sit_after_the_dip_rows_in_every_pivot_column(tmp_path):
    for plan, depth, value in (("single", 3, 25.0), ("single", 4, 26.0), ("gradual", 3, 30.0), ("gradual", 4, 31.0)):
        write_result(tmp_path / f"{plan}_{depth}", table=T11, overrides={"noise_plan": plan},
                     config={"backbone.depth": depth, "data.sigma": 0.1},
                     metrics={"psnr_final": value, "psnr_best": value + 1})
    for algorithm, value in (("tv", 27.0), ("nlm", 28.0)):
        write_result(tmp_path / f"baseline={algorithm},data=x", method="classical", baseline=algorithm, table=T11,
                     config={"backbone.depth": 3, "noise_plan.name": "single", "data.sigma": 0.1},
                     metrics={"psnr_final": value, "image_size": 64})
    table = compare_paths([tmp_path]).table
    assert table.markdown == (
        "## T1.1\n\n"
        "| noise_plan | psnr_final [backbone.depth=3] | psnr_final [backbone.depth=3] (report) "
        "| psnr_best [backbone.depth=3] | psnr_final [backbone.depth=4] | psnr_best [backbone.depth=4] "
        "| n | failed |\n|---|---|---|---|---|---|---|---|\n"
        "| single | 25.0 | 26.2 | 26.0 | 26.0 | 27.0 | 2 | 0 |\n"
        "| gradual | 30.0 |  | 31.0 | 31.0 | 32.0 | 2 | 0 |\n"
        "| classical: nlm | 28.0 |  | — | 28.0 | — | 1 | 0 |\n"
        "| classical: tv | 27.0 |  | — | 27.0 | — | 1 | 0 |\n")


def test_baseline_rows_keep_data_fields_and_name_the_side_when_it_varies(tmp_path):
    spec = {"rows": ["data.sigma"], "values": ["psnr_final"]}
    for sigma, value in ((0.1, 25.0), (0.2, 21.0)):
        write_result(tmp_path / f"dip_{sigma}", table=spec, overrides={"data.sigma": str(sigma)},
                     metrics={"psnr_final": value})
        for size in (32, 64):
            write_result(tmp_path / f"baseline=tv,data={sigma}_{size}", baseline="tv", method="classical",
                         config={"data.sigma": sigma}, metrics={"psnr_final": value + size / 32, "image_size": size})
    table = build_table(gather([tmp_path]), spec)
    assert table.row_fields == ["method", "data.sigma"]
    assert [tuple(row) for row in table.display[["method", "data.sigma", "psnr_final"]].to_numpy()] == [
        ("dip", "0.1", "25"), ("dip", "0.2", "21"),
        ("classical: tv (32 px)", "0.1", "26"), ("classical: tv (32 px)", "0.2", "22"),
        ("classical: tv (64 px)", "0.1", "27"), ("classical: tv (64 px)", "0.2", "23")]


# ---------------------------------------------------------------- end to end


def test_baselines_switch_files_keep_train_yaml_folder_names():
    train = yaml.safe_load((config_dir() / "train.yaml").read_text())
    wanted = set(train["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]) | {"baselines"}
    for option in ("all", "fast", "none"):
        switch = yaml.safe_load((config_dir() / "baselines" / f"{option}.yaml").read_text())
        assert set(switch["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]) >= wanted, option
        assert set(switch) == {"hydra"}, option


def train(*args, cwd):
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    return subprocess.run([TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_dip_sweep_with_baselines_gets_classical_rows_without_changing_its_jobs(tmp_path):
    done = train("-m", *TINY, "seed=0,1", "threads=1", "+baselines=fast", f"output_root={tmp_path}",
                 "hydra.callbacks.classical_baselines.algorithms=[tv,nlm]", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "adhoc" / "smoke"
    jobs = sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert jobs == ["backbone.depth=3,backbone=cnn,data.sigma=0.1,data.size=32,seed=0",
                    "backbone.depth=3,backbone=cnn,data.sigma=0.1,data.size=32,seed=1"]
    first = json.loads((sweep / jobs[0] / "result.json").read_text())
    assert first["config_hash"] == config_hash(composed(*TINY, "seed=0"))
    baselines = sorted(sweep.glob("baseline=*"))
    assert [p.name.split(",")[0] for p in baselines] == ["baseline=nlm", "baseline=tv"]
    for folder in baselines:
        result = json.loads((folder / "result.json").read_text())
        assert (result["status"], result["method"], result["baseline_of"]) == ("ok", "classical", jobs)
        assert not [key for key in result["config"] if key.split(".")[0] in classical.DIP_ONLY_GROUPS]
        assert (folder / "noisy.png").read_bytes() == (sweep / jobs[1] / "noisy.png").read_bytes()
    table = (sweep / "table.md").read_text()
    assert "| classical: nlm |" in table and "| classical: tv |" in table
    stamp = (baselines[0] / "result.json").stat().st_mtime_ns
    assert set(classical.run_baselines(sweep, ["nlm", "tv"]).values()) == {"ok"}
    assert (baselines[0] / "result.json").stat().st_mtime_ns == stamp          # resumed, not re-run


@pytest.mark.slow
def test_cset_experiment_gives_an_image_by_algorithm_table_with_a_mean_row(tmp_path):
    done = train("-m", "experiment=baselines/cset", "profile=smoke", "seeds=1", f"output_root={tmp_path}",
                 "method.image_set=[astronaut,camera]", "method.algorithm=nlm,tv", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = tmp_path / "sweeps" / "baselines" / "cset" / "smoke"
    psnr = {}
    for algorithm in ("nlm", "tv"):
        (job,) = sweep.glob(f"method.algorithm={algorithm},*seed=0")
        result = json.loads((job / "result.json").read_text())
        assert result["status"] == "ok"
        psnr[algorithm] = {item["image"]: item["psnr_final"] for item in result["metrics"]["items"]}
    lines = (sweep / "table.md").read_text().splitlines()
    rows = [line.split(" | ")[0].lstrip("| ") for line in lines[4:] if line.startswith("| ")]
    assert rows == ["astronaut", "camera", "mean"]
    assert lines[2].startswith("| image | uses clean image | PSNR [method.algorithm=NLM] | SSIM [method.algorithm=NLM] | PSNR [")
    assert [line.split(" | ")[1] for line in lines[4:6]] == ["no", "no"]
    mean_cells = lines[4 + 2].split(" | ")
    for position, algorithm in ((2, "nlm"), (4, "tv")):
        expected = np.mean(list(psnr[algorithm].values()))
        assert mean_cells[position].startswith(f"{expected:.2f} ± "), (mean_cells, expected)
