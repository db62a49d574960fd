"""dipddpm-compare on hand-made sweep folders: exact tables, report columns, failures, plots, cli."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from dipddpm.compare import (
    build_table,
    cli,
    compare_paths,
    field_text,
    gather,
    stage_starts,
)

T11_SPEC = {
    "title": "T1.1 — traditional vs modified",
    "rows": ["noise_plan"],
    "values": ["psnr_final", "ssim_final"],
    "format": {"psnr_final": ".2f", "ssim_final": ".4f"},
    "labels": {"noise_plan": {"single": "Traditional", "gradual": "Modified"}},
    "report": [
        {"noise_plan": "single", "psnr_final": 26.2294, "ssim_final": 0.7426},
        {"noise_plan": "gradual", "psnr_final": 34.5017},
    ],
}

T41_SPEC = {
    "title": "T4.1 — sampling time",
    "rows": ["method"],
    "columns": ["method.steps"],
    "values": ["sample_seconds"],
    "format": {"sample_seconds": ".3f"},
    "labels": {"method": {"ddpm_plain": "DDPM", "ddpm_dip": "DIP+DDPM"}},
    "report": [
        {"method": "ddpm_plain", "method.steps": 100, "sample_seconds": 0.644},
        {"method": "ddpm_plain", "method.steps": 200, "sample_seconds": 1.246},
        {"method": "ddpm_dip", "method.steps": 100, "sample_seconds": 0.743},
        {"method": "ddpm_dip", "method.steps": 200, "sample_seconds": 1.252},
    ],
}


def write_result(job_dir, *, status="ok", seed=0, overrides=None, choices=None, config=None,
                 metrics=None, error=None, table=None, method="dip", experiment="staged/t11"):
    """A result.json as dipddpm-train writes it."""
    job_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "status": status,
        "error": error,
        "experiment": experiment,
        "method": method,
        "seed": seed,
        "overrides": overrides or {},
        "choices": choices or {},
        "config": config or {},
        "config_hash": f"hash-{job_dir.name}",
        "metrics": metrics or {},
    }
    if table is not None:
        result["table"] = table
    (job_dir / "result.json").write_text(json.dumps(result), encoding="utf-8")


def write_curve(job_dir, rows):
    lines = ["step,stage,loss,psnr,ssim,psnr_noisy,nr_stat"]
    lines += [",".join("" if v is None else str(v) for v in row) for row in rows]
    (job_dir / "curve.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_missing(job_dir, overrides):
    """A job Hydra started but that never wrote result.json."""
    (job_dir / ".hydra").mkdir(parents=True)
    text = "".join(f"- {item}\n" for item in overrides)
    (job_dir / ".hydra" / "overrides.yaml").write_text(text, encoding="utf-8")


@pytest.fixture
def t11_sweep(tmp_path):
    """2 rows: gradual (2 ok + 1 missing), single (1 ok, 1 failed, 1 diverged)."""
    sweep = tmp_path / "sweep"

    def job(name, plan, seed, **kwargs):
        write_result(sweep / name, seed=seed, table=T11_SPEC,
                     overrides={"noise_plan": plan, "seed": str(seed)},
                     choices={"noise_plan": plan, "backbone": "cnn"},
                     config={"backbone.depth": 4, "seed": seed}, **kwargs)

    job("gradual_s0", "gradual", 0, metrics={"psnr_final": 30.0, "ssim_final": 0.75,
                                            "stage_psnr_best": [28.5, 29.5, 30.5]})
    write_curve(sweep / "gradual_s0", [
        (0, 0, 0.5, 10.0, 0.2, 9.0, None), (5, 0, 0.4, None, None, None, None),
        (10, 1, 0.3, 20.0, 0.5, 9.0, None), (20, 2, 0.2, 30.0, 0.75, 9.0, None)])
    job("gradual_s1", "gradual", 1, metrics={"psnr_final": 32.0, "ssim_final": 0.875,
                                            "stage_psnr_best": [29.0, 31.0, 32.0]})
    write_curve(sweep / "gradual_s1", [(0, 0, 0.5, 11.0, 0.2, 9.0, None), (20, 1, 0.2, 32.0, 0.8, 9.0, None)])
    write_missing(sweep / "gradual_s2", ["noise_plan=gradual", "seed=2"])
    job("single_s0", "single", 0, metrics={"psnr_final": 25.0, "ssim_final": 0.7})
    job("single_s1", "single", 1, status="failed",
        error={"type": "RuntimeError", "message": "boom\nsecond line", "traceback_file": "traceback.txt"})
    job("single_s2", "single", 2, status="diverged", metrics={"psnr_final": None, "ssim_final": None},
        error={"type": "DivergedError", "message": "loss is nan at step 40"})
    return sweep


EXPECTED_T11_TABLE = """## T1.1 — traditional vs modified

| noise_plan | psnr_final | psnr_final (report) | ssim_final | ssim_final (report) | n | failed |
|---|---|---|---|---|---|---|
| Traditional | 25.00 | 26.2294 | 0.7000 | 0.7426 | 1 | 2 |
| Modified | 31.00 ± 1.41 | 34.5017 | 0.8125 ± 0.0884 |  | 2 | 1 |
"""


def test_gather_one_row_per_run_with_list_metrics_and_missing(t11_sweep):
    frame = gather([t11_sweep])
    assert [p.rsplit("/", 1)[1] for p in frame["job_dir"]] == [
        "gradual_s0", "gradual_s1", "gradual_s2", "single_s0", "single_s1", "single_s2"]
    assert list(frame["status"]) == ["ok", "ok", "missing", "ok", "failed", "diverged"]
    assert list(frame["seed"]) == [0, 1, 2, 0, 1, 2]
    assert list(frame.columns[:7]) == ["job_dir", "status", "error", "seed", "method", "experiment", "config_hash"]
    assert {"override.noise_plan", "choice.backbone", "cfg.backbone.depth"} <= set(frame.columns)
    assert frame.loc[2, "override.noise_plan"] == "gradual"
    assert frame.loc[2, "error"] == "no result.json"
    assert frame.loc[4, "error"] == "RuntimeError: boom\nsecond line"
    assert list(frame.loc[0, ["stage_psnr_best.1", "stage_psnr_best.2", "stage_psnr_best.3"]]) == [28.5, 29.5, 30.5]
    assert "stage_psnr_best" not in frame.columns
    assert math.isnan(frame.loc[3, "stage_psnr_best.1"])


def test_t11_markdown_csv_and_plots(t11_sweep, tmp_path):
    out = tmp_path / "out"
    output = compare_paths([t11_sweep], out_dir=out)
    expected_notes = (
        "\nRuns not ok: 3\n\n"
        f"- `{t11_sweep}/gradual_s2` missing: no result.json\n"
        f"- `{t11_sweep}/single_s1` failed: RuntimeError: boom\n"
        f"- `{t11_sweep}/single_s2` diverged: DivergedError: loss is nan at step 40\n"
    )
    assert output.markdown == EXPECTED_T11_TABLE + expected_notes
    assert (out / "table.md").read_text(encoding="utf-8") == EXPECTED_T11_TABLE + expected_notes
    assert (output.n_runs, output.n_ok, output.n_failed) == (6, 3, 3)

    ssim_std = math.sqrt(((0.75 - 0.8125) ** 2 + (0.875 - 0.8125) ** 2) / 1)
    expected_csv = (
        "noise_plan,psnr_final_mean,psnr_final_std,psnr_final_report,"
        "ssim_final_mean,ssim_final_std,ssim_final_report,n,failed\n"
        "single,25.0,,26.2294,0.7,,0.7426,1,2\n"
        f"gradual,31.0,{math.sqrt(2.0)!r},34.5017,0.8125,{ssim_std!r},,2,1\n"
    )
    assert (out / "table.csv").read_text(encoding="utf-8") == expected_csv

    results = pd.read_csv(out / "results.csv")
    assert len(results) == 6 and list(results["status"]).count("ok") == 3
    for name in ("curves.png", "bars.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert output.curves_png == out / "curves.png" and output.bars_png == out / "bars.png"


def test_out_dir_defaults_to_first_path_and_notes_are_relative(t11_sweep):
    output = compare_paths([t11_sweep])
    assert output.table_md == t11_sweep / "table.md"
    assert "- `single_s1` failed: RuntimeError: boom\n" in output.markdown


def test_pivot_columns_t41_like(tmp_path):
    sweep = tmp_path / "t41"
    runs = [("plain_100_s0", "ddpm_plain", 100, 0, 0.5), ("plain_100_s1", "ddpm_plain", 100, 1, 0.7),
            ("plain_200_s0", "ddpm_plain", 200, 0, 1.0), ("dip_100_s0", "ddpm_dip", 100, 0, 0.6),
            ("dip_200_s0", "ddpm_dip", 200, 0, None)]
    for name, method, steps, seed, seconds in runs:
        write_result(sweep / name, seed=seed, method=method, table=T41_SPEC,
                     status="ok" if seconds is not None else "failed",
                     overrides={"method": method, "method.steps": str(steps), "seed": str(seed)},
                     choices={"method": method}, config={"method.steps": steps},
                     metrics={"sample_seconds": seconds} if seconds is not None else {})
    output = compare_paths([sweep], out_dir=tmp_path / "out")
    a, b = "sample_seconds [method.steps=100]", "sample_seconds [method.steps=200]"
    assert output.table.markdown == (
        "## T4.1 — sampling time\n\n"
        f"| method | {a} | {a} (report) | {b} | {b} (report) | n | failed |\n"
        "|---|---|---|---|---|---|---|\n"
        "| DDPM | 0.600 ± 0.141 | 0.644 | 1.000 | 1.246 | 3 | 0 |\n"
        "| DIP+DDPM | 0.600 | 0.743 | missing | 1.252 | 1 | 1 |\n"
    )
    numeric = output.table.numeric
    assert list(numeric.columns) == ["method", "method.steps", "sample_seconds_mean", "sample_seconds_std",
                                     "sample_seconds_report", "n", "failed"]
    assert [(r.method, r._2, r.n, r.failed) for r in numeric.itertuples()] == [
        ("ddpm_plain", "100", 2, 0), ("ddpm_plain", "200", 1, 0),
        ("ddpm_dip", "100", 1, 0), ("ddpm_dip", "200", 0, 1)]
    assert math.isnan(numeric.loc[3, "sample_seconds_mean"])
    assert numeric.loc[3, "sample_seconds_report"] == 1.252


def test_auto_rows_and_default_values_without_spec(t11_sweep):
    frame = gather([t11_sweep])
    table = build_table(frame, {})
    assert table.row_fields == ["noise_plan"]
    assert table.values == ["psnr_final", "ssim_final"]
    assert table.title == "staged/t11"
    assert list(table.display["noise_plan"]) == ["gradual", "single"]
    assert list(table.display["psnr_final"]) == ["31 ± 1.414", "25"]


def test_several_sweeps_combine_and_duplicates_are_dropped(t11_sweep, tmp_path):
    other = tmp_path / "other"
    write_result(other / "job", seed=3, overrides={"noise_plan": "single", "seed": "3"},
                 metrics={"psnr_final": 27.0, "ssim_final": 0.8})
    frame = gather([t11_sweep, other, t11_sweep / "single_s0" / "result.json"])
    assert len(frame) == 7
    table = build_table(frame, T11_SPEC)
    assert list(table.display.loc[0, ["psnr_final", "n", "failed"]]) == ["26.00 ± 1.41", 2, 2]


def test_field_values_compare_as_text():
    assert [field_text(v) for v in (4, 4.0, "4", 0.05, True, None, float("nan"))] == [
        "4", "4", "4", "0.05", "true", "", ""]


def test_stage_starts_are_first_steps_of_new_stages():
    curve = pd.DataFrame({"step": [0, 10, 20, 30, 40], "stage": [0, 0, 1, 1, 2]})
    assert stage_starts(curve) == [20.0, 40.0]


def test_cli_prints_table_and_exit_codes(t11_sweep, tmp_path, capsys):
    assert cli([str(t11_sweep), "--out", str(tmp_path / "cli")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(EXPECTED_T11_TABLE)
    assert f"wrote {tmp_path / 'cli' / 'table.md'}" in printed

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli([str(empty)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"dipddpm-compare: no result.json or started job found under: {empty}\n"


def test_started_jobs_read_hydra_config_and_containers_are_not_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    write_missing(sweep, ["experiment=staged/t12"])
    for depth in (3, 5):
        job = sweep / f"depth={depth}"
        write_missing(job, [f"backbone.depth={depth}", "seed=0"])
        config = {"seed": 0, "backbone": {"name": "cnn", "depth": depth},
                  "table": {"title": "T1.2", "rows": ["backbone.depth"], "values": ["psnr_final"]}}
        (job / ".hydra" / "config.yaml").write_text(json.dumps(config), encoding="utf-8")
    output = compare_paths([sweep], out_dir=tmp_path / "out")
    assert list(output.frame["cfg.backbone.name"]) == ["cnn", "cnn"]
    assert "cfg.table.title" not in output.frame.columns
    assert output.table.markdown == (
        "## T1.2\n\n| backbone.depth | psnr_final | n | failed |\n|---|---|---|---|\n"
        "| 3 | missing | 0 | 1 |\n| 5 | missing | 0 | 1 |\n")
    assert output.curves_png is None and (tmp_path / "out" / "bars.png").is_file()


def test_spec_rebuilt_from_flattened_config_keys(tmp_path):
    config = {"table.title": "Flat", "table.rows": ["noise_plan"], "table.values": ["psnr_final"],
              "table.labels.noise_plan.fast": "Fast", "report": [{"noise_plan": "fast", "psnr_final": 37.1566}]}
    write_result(tmp_path / "s" / "job", overrides={"noise_plan": "fast"}, config=config,
                 metrics={"psnr_final": 36.0})
    output = compare_paths([tmp_path / "s"])
    assert output.markdown == (
        "## Flat\n\n| noise_plan | psnr_final | psnr_final (report) | n | failed |\n"
        "|---|---|---|---|---|\n| Fast | 36 | 37.1566 | 1 | 0 |\n")
