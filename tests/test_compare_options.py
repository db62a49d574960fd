"""dipddpm-compare's command-line table options on two hand-made ad-hoc sweeps (a DIP sweep over
data.path, a classical sweep over algorithms): shape, short labels, mean row, deltas, formats,
key errors. Expected numbers are computed here from the values written, not by the package."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys

import pandas as pd
import pytest

from dipddpm.compare import cli, short_names
from dipddpm.compare.plots import axis_label
from dipddpm.io import csv_text

IMAGES = {"bird": "/data/set5/bird.png", "head": "/data/set5/head.png"}
# psnr_final per (image, method column, seed); tv on head ran seeds 0 and 2: not paired with nlm's 0, 1
PSNR = {
    ("bird", "dip", 0): 28.0, ("bird", "dip", 1): 29.5,
    ("head", "dip", 0): 31.0, ("head", "dip", 1): 30.0,
    ("bird", "nlm", 0): 26.0, ("bird", "nlm", 1): 26.75,
    ("head", "nlm", 0): 29.0, ("head", "nlm", 1): 29.25,
    ("bird", "tv", 0): 25.5, ("bird", "tv", 1): 25.0,
    ("head", "tv", 0): 28.0, ("head", "tv", 2): 28.625,
}


def _ssim(psnr: float) -> float:
    return round(psnr / 40.0, 6)


def write_run(job_dir, image: str, column: str, seed: int, psnr: float) -> None:
    """A result.json as dipddpm-train writes it for an ad-hoc job (no table spec)."""
    method = "dip" if column == "dip" else "classical"
    overrides = {"data.path": IMAGES[image], "seed": str(seed)}
    config = {"data.path": IMAGES[image], "data.size": 64, "method.name": method, "seed": seed}
    if method == "classical":
        overrides["method"] = "classical"
        overrides["method.algorithm"] = column
        config["method.algorithm"] = column
    result = {"status": "ok", "error": None, "experiment": "adhoc", "method": method, "seed": seed,
              "overrides": overrides, "choices": {"method": method, "data": "image"}, "config": config,
              "config_hash": job_dir.name, "metrics": {"psnr_final": psnr, "ssim_final": _ssim(psnr)}}
    job_dir.mkdir(parents=True)
    (job_dir / "result.json").write_text(json.dumps(result), encoding="utf-8")


@pytest.fixture
def sweeps(tmp_path):
    dip, classical = tmp_path / "dip", tmp_path / "classical"
    for (image, column, seed), psnr in PSNR.items():
        root = dip if column == "dip" else classical
        write_run(root / f"{image}_{column}_s{seed}", image, column, seed, psnr)
    return dip, classical


def cell(image: str, column: str) -> list[float]:
    return [v for (i, c, _), v in PSNR.items() if i == image and c == column]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


SHAPE = ("--rows", "data.path", "--cols", "method,method.algorithm", "--values", "psnr_final")


def test_images_by_methods_with_short_names_and_mean_row(sweeps, tmp_path, capsys):
    out = tmp_path / "out"
    code, printed, _ = run_cli(capsys, *sweeps, *SHAPE, "--mean", "--out", out)
    assert code == 0
    fmt = lambda m, s: f"{m:.4g} ± {s:.4g}"  # noqa: E731
    columns = [("classical/nlm", "nlm"), ("classical/tv", "tv"), ("dip", "dip")]
    lines = ["## adhoc", "", "| data.path | " + " | ".join(c for c, _ in columns) + " | n | failed |",
             "|---|---|---|---|---|---|"]
    row_means = {c: [] for _, c in columns}
    for image in ("bird", "head"):
        cells = []
        for _, column in columns:
            mean, std = mean_std(cell(image, column))
            row_means[column].append(mean)
            cells.append(fmt(mean, std))
        lines.append(f"| {image} | " + " | ".join(cells) + " | 6 | 0 |")
    lines.append("| mean | " + " | ".join(fmt(*mean_std(row_means[c])) for _, c in columns) + " | 12 | 0 |")
    assert printed.startswith("\n".join(lines) + "\n")

    numeric = pd.read_csv(out / "table.csv", keep_default_na=False)
    assert list(numeric.columns) == ["data.path", "method", "method.algorithm", "psnr_final_mean",
                                     "psnr_final_std", "psnr_final_report", "n", "failed"]
    mean_line = numeric[(numeric["data.path"] == "mean") & (numeric["method"] == "dip")].iloc[0]
    assert mean_line["psnr_final_mean"] == pytest.approx(statistics.mean(row_means["dip"]), abs=1e-12)
    assert mean_line["psnr_final_std"] == pytest.approx(statistics.stdev(row_means["dip"]), abs=1e-12)
    bird_tv = numeric[(numeric["data.path"] == IMAGES["bird"]) & (numeric["method.algorithm"] == "tv")].iloc[0]
    assert (bird_tv["psnr_final_mean"], bird_tv["n"]) == (pytest.approx(25.25), 2)
    for name in ("bars.png", "bars.svg", "table.md", "results.csv"):
        assert (out / name).is_file()


def test_baseline_deltas_paired_and_unpaired(sweeps, tmp_path, capsys):
    code, printed, _ = run_cli(capsys, *sweeps, *SHAPE, "--mean", "--baseline", "method.algorithm=nlm",
                               "--out", tmp_path / "out")
    assert code == 0
    table = pd.read_csv(tmp_path / "out" / "table.csv", keep_default_na=False)
    expected_rows = {}
    for image in ("bird", "head"):
        for column in ("dip", "tv"):
            x = {s: v for (i, c, s), v in PSNR.items() if i == image and c == column}
            b = {s: v for (i, c, s), v in PSNR.items() if i == image and c == "nlm"}
            if set(x) == set(b):
                diffs = [x[s] - b[s] for s in sorted(x)]
                delta, std, shown = statistics.mean(diffs), statistics.stdev(diffs), None
                shown = f"{delta:+.4g} ± {std:.4g}"
            else:
                delta = statistics.mean(x.values()) - statistics.mean(b.values())
                std, shown = float("nan"), f"{delta:+.4g} (unpaired)"
            expected_rows.setdefault(column, []).append(delta)
            line = table[(table["data.path"] == IMAGES[image]) & (table["method"] == ("dip" if column == "dip"
                                                                                     else "classical"))
                         & (table["method.algorithm"] == ("" if column == "dip" else column))].iloc[0]
            assert float(line["psnr_final_delta"]) == pytest.approx(delta, abs=1e-12)
            if math.isnan(std):
                assert line["psnr_final_delta_std"] == "" and line["psnr_final_paired"] == "False"
            else:
                assert float(line["psnr_final_delta_std"]) == pytest.approx(std, abs=1e-12)
            row = next(r for r in printed.splitlines() if r.startswith(f"| {image} |"))
            assert shown in row.split(" | ")
    header = next(r for r in printed.splitlines() if r.startswith("| data.path"))
    assert header == "| data.path | classical/nlm | classical/tv | dip | Δ classical/tv | Δ dip | n | failed |"
    mean_row = next(r for r in printed.splitlines() if r.startswith("| mean |")).split(" | ")
    for column, shown in zip(("tv", "dip"), mean_row[4:6]):
        assert shown == f"{statistics.mean(expected_rows[column]):+.4g} ± {statistics.stdev(expected_rows[column]):.4g}"
    assert "Δ: difference from method.algorithm=nlm in the same row" in printed
    # head: tv ran seeds 0 and 2, nlm 0 and 1 -> unpaired
    assert "(unpaired)" in next(r for r in printed.splitlines() if r.startswith("| head |"))


def test_deltas_pair_runs_by_seed_and_image(tmp_path, capsys):
    """A row holding two images x two seeds pairs with the baseline's runs of the same image and
    seed: four differences, their mean and std, not the difference of the means."""
    psnr = {("bird", "nlm", 0): 26.0, ("bird", "nlm", 1): 26.5, ("head", "nlm", 0): 29.0, ("head", "nlm", 1): 29.5,
            ("bird", "wavelet", 0): 26.25, ("bird", "wavelet", 1): 27.5,
            ("head", "wavelet", 0): 28.0, ("head", "wavelet", 1): 29.75}
    for (image, column, seed), value in psnr.items():
        write_run(tmp_path / "runs" / f"{image}_{column}_s{seed}", image, column, seed, value)
    code, printed, _ = run_cli(capsys, tmp_path / "runs", "--rows", "cfg.method.algorithm", "--values", "psnr_final",
                               "--baseline", "method.algorithm=nlm", "--out", tmp_path / "o")
    assert code == 0
    diffs = [psnr[(i, "wavelet", s)] - psnr[(i, "nlm", s)] for i in ("bird", "head") for s in (0, 1)]
    assert diffs == [0.25, 1.0, -1.0, 0.25]
    row = next(r for r in printed.splitlines() if r.startswith("| wavelet |")).split(" | ")
    assert row[2] == f"{statistics.mean(diffs):+.4g} ± {statistics.stdev(diffs):.4g}"


def test_uses_clean_image_as_a_value_reads_yes_no_mixed(tmp_path, capsys):
    """uses_clean_image among --values: each cell says no / yes / mixed, never "0 ± 0"."""
    flags = {("bird", "nlm", 0): False, ("bird", "nlm", 1): False,
             ("bird", "tv", 0): True, ("bird", "tv", 1): True,
             ("bird", "wavelet", 0): True, ("bird", "wavelet", 1): False}
    for (image, column, seed), flag in flags.items():
        job = tmp_path / "runs" / f"{image}_{column}_s{seed}"
        write_run(job, image, column, seed, 25.0)
        result = json.loads((job / "result.json").read_text())
        (job / "result.json").write_text(json.dumps(result | {"uses_clean_image": flag}))
    code, printed, _ = run_cli(capsys, tmp_path / "runs", "--rows", "data.path", "--cols", "method.algorithm",
                               "--values", "uses_clean_image", "--out", tmp_path / "o")
    assert code == 0
    row = next(r for r in printed.splitlines() if r.startswith("| bird |"))
    assert row.split(" | ")[1:4] == ["no", "yes", "mixed"]


def test_baseline_on_rows_adds_a_delta_column(sweeps, tmp_path, capsys):
    code, printed, _ = run_cli(capsys, *sweeps, "--rows", "cfg.method.algorithm", "--values", "ssim_final",
                               "--where", "method=classical", "--where", "data.path=bird",
                               "--baseline", "method.algorithm=tv", "--out", tmp_path / "o")
    assert code == 0
    nlm = [_ssim(PSNR[("bird", "nlm", s)]) for s in (0, 1)]
    tv = [_ssim(PSNR[("bird", "tv", s)]) for s in (0, 1)]
    diffs = [a - b for a, b in zip(nlm, tv)]
    lines = printed.splitlines()
    assert lines[2] == "| method.algorithm | ssim_final | Δ ssim_final | n | failed |"
    assert lines[4] == (f"| nlm | {statistics.mean(nlm):.4g} ± {statistics.stdev(nlm):.4g} | "
                        f"{statistics.mean(diffs):+.4g} ± {statistics.stdev(diffs):.4g} | 2 | 0 |")
    assert lines[5] == f"| tv | {statistics.mean(tv):.4g} ± {statistics.stdev(tv):.4g} |  | 2 | 0 |"


def test_where_with_commas_keeps_runs_equal_to_any_part(sweeps, tmp_path, capsys):
    code, printed, _ = run_cli(capsys, *sweeps, "--rows", "cfg.method.algorithm", "--values", "psnr_final",
                               "--where", "method.algorithm=nlm, tv", "--where", "data.path=bird",
                               "--out", tmp_path / "o")
    assert code == 0
    rows = [line.split(" | ")[0][2:] for line in printed.splitlines()[4:] if line.startswith("| ")]
    assert rows == ["nlm", "tv"]
    nlm = [PSNR[("bird", "nlm", s)] for s in (0, 1)]
    assert f"| nlm | {statistics.mean(nlm):.4g} ± {statistics.stdev(nlm):.4g} | 2 | 0 |" in printed


def test_parameter_sweep_two_metrics_csv_format(sweeps, tmp_path, capsys):
    code, printed, _ = run_cli(capsys, sweeps[1], "--rows", "method.algorithm", "--values", "psnr_final,ssim_final",
                               "--where", "data.path=/data/set5/head.png", "--format", "csv", "--out", tmp_path / "o")
    assert code == 0
    body = printed.split("wrote ")[0].strip().splitlines()
    assert body[0] == "method.algorithm,psnr_final,ssim_final,n,failed"
    nlm = cell("head", "nlm")
    assert body[1] == (f"nlm,{statistics.mean(nlm):.4g} ± {statistics.stdev(nlm):.4g},"
                       f"{statistics.mean(map(_ssim, nlm)):.4g} ± {statistics.stdev(map(_ssim, nlm)):.4g},2,0")


def test_latex_is_a_booktabs_table(sweeps, tmp_path, capsys):
    code, printed, _ = run_cli(capsys, *sweeps, *SHAPE, "--mean", "--baseline", "method.algorithm=nlm",
                               "--format", "latex", "--out", tmp_path / "o")
    assert code == 0
    tex = (tmp_path / "o" / "table.tex").read_text(encoding="utf-8")
    assert printed.startswith(tex)
    lines = tex.splitlines()
    assert lines[:5] == [r"\begin{table}[ht]", r"\centering", r"\caption{adhoc}", r"\begin{tabular}{lrrrrrrr}",
                         r"\toprule"]
    assert lines[5] == r"data.path & classical/nlm & classical/tv & dip & $\Delta$ classical/tv & $\Delta$ dip & n & failed \\"
    body = lines[7:lines.index(r"\bottomrule")]
    assert body[2] == r"\midrule" and body[3].startswith("mean & ")
    assert all(row.count(" & ") == 7 and row.endswith(r" \\") for row in body if row != r"\midrule")
    assert r"$\pm$" in body[0] and "±" not in tex and "_" not in tex.replace(r"\_", "")
    if shutil.which("pdflatex"):
        document = "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n" + tex + "\\end{document}\n"
        (tmp_path / "doc.tex").write_text(document, encoding="utf-8")
        done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:]


@pytest.mark.parametrize("args, message", [
    (("--rows", "data.pth"), "dipddpm-compare: --rows data.pth: no run has this key; nearest: data.path"),
    (("--values", "psnr_fnal"), "dipddpm-compare: --values psnr_fnal: no run has this key; nearest: psnr_final"),
    (("--cols", "method,method.algoritm"), "dipddpm-compare: --cols method.algoritm: no run has this key; "
                                           "nearest: method.algorithm"),
    (("--baseline", "method.algorithm=bm3d"), "dipddpm-compare: --baseline method.algorithm=bm3d: no row has it; "
                                              "values: nlm, tv"),
])
def test_unknown_keys_are_one_line_naming_the_nearest(sweeps, tmp_path, capsys, args, message):
    base = ("--rows", "data.path") if args[0] != "--rows" else ()
    if args[0] == "--baseline":
        base = ("--rows", "method.algorithm", "--where", "method=classical")
    code, printed, err = run_cli(capsys, *sweeps, *base, *args, "--out", tmp_path / "o")
    assert (code, printed) == (2, "")
    assert err.startswith(message) and err.count("\n") == 1


def test_short_names_tell_paths_apart():
    assert short_names(["/a/set5/bird.png", "/a/set5/head.png", "nlm"]) == {
        "/a/set5/bird.png": "bird", "/a/set5/head.png": "head"}
    assert short_names(["/x/a/img.png", "/y/b/img.png"]) == {"/x/a/img.png": "a/img", "/y/b/img.png": "b/img"}
    assert short_names(["staged/levels_1000", "staged/t11"]) == {}


def test_axis_labels_carry_units():
    assert [axis_label(m) for m in ("psnr_final", "wall_seconds", "ssim_final")] == [
        "psnr_final (dB)", "wall_seconds (s)", "ssim_final"]


def test_csv_text_one_writer_for_frames_and_dicts():
    rows = [{"step": 0, "psnr": None, "extra": 1}, {"step": 5, "psnr": 20.25, "loss": float("nan")}]
    assert csv_text(rows, ["step", "psnr", "loss"]) == "step,psnr,loss\n0,,\n5,20.25,\n"
    assert csv_text(rows) == "step,psnr,extra,loss\n0,,1,\n5,20.25,,\n"
    assert csv_text(pd.DataFrame({"a": [1.5, math.nan], "b": [1, 2]})) == "a,b\n1.5,1\n,2\n"


def test_bars_grouped_by_row_coloured_by_column_with_seed_error_bars(sweeps, tmp_path, monkeypatch):
    from dipddpm.compare import plots

    figures = {}

    def capture(path, figure, svg=False):
        figures[path.name] = (figure, svg)
        return path

    monkeypatch.setattr(plots, "save_figure_atomic", capture)
    for (image, column, seed), _ in PSNR.items():
        if column == "dip":
            job = sweeps[0] / f"{image}_{column}_s{seed}"
            (job / "curve.csv").write_text("step,psnr\n0,10\n100,20\n", encoding="utf-8")
    assert cli([*map(str, sweeps), *SHAPE, "--mean", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    bars, svg = figures["bars.png"]
    assert svg
    axes = bars.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["bird", "head"]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["classical/nlm", "classical/tv", "dip"]
    assert axes.get_ylabel() == "psnr_final (dB)"
    heights = {}
    from matplotlib.container import BarContainer

    bar_sets = [c for c in axes.containers if isinstance(c, BarContainer)]
    assert len(bar_sets) == 3
    for container, label in zip(bar_sets, ("nlm", "tv", "dip")):
        heights[label] = [patch.get_height() for patch in container.patches]
        spans = [segment[1][1] - segment[0][1] for segment in container.errorbar.lines[2][0].get_segments()]
        assert spans == pytest.approx([2 * mean_std(cell(image, label))[1] for image in ("bird", "head")])
    assert heights["tv"] == pytest.approx([mean_std(cell(image, "tv"))[0] for image in ("bird", "head")])
    curves = figures["curves.png"][0].axes[0]
    assert [t.get_text() for t in curves.get_legend().get_texts()] == ["bird · dip", "head · dip"]
    assert len(curves.get_lines()) == 4


def test_sweep_does_not_import_compare():
    code = "import sys, dipddpm.sweep; print(sorted(m for m in sys.modules if m.startswith('dipddpm.compare')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_spec_label_maps_apply_with_the_options(sweeps, tmp_path, capsys):
    job = sweeps[1] / "bird_nlm_s0" / "result.json"
    result = json.loads(job.read_text(encoding="utf-8"))
    result["table"] = {"labels": {"method.algorithm": {"nlm": "NLM"}, "data.path": {IMAGES["head"]: "Head"}}}
    job.write_text(json.dumps(result), encoding="utf-8")
    code, printed, _ = run_cli(capsys, *sweeps, *SHAPE, "--out", tmp_path / "o")
    lines = printed.splitlines()
    assert code == 0 and lines[2] == "| data.path | classical/NLM | classical/tv | dip | n | failed |"
    assert [line.split(" | ")[0] for line in lines[4:6]] == ["| bird", "| Head"]


def test_a_cell_whose_runs_carry_a_note_shows_it_instead_of_missing(sweeps, tmp_path):
    """An ok run without numbers but with a note (bm3d not installed) reads as the note."""
    dip, classical = sweeps
    job = classical / "bird_bm3d_s0"
    write_run(job, "bird", "tv", 0, 0.0)
    result = json.loads((job / "result.json").read_text(encoding="utf-8"))
    result["config"]["method.algorithm"] = result["overrides"]["method.algorithm"] = "bm3d"
    result["metrics"] = {"note": "not installed (pip install 'dipddpm[baselines]')"}
    (job / "result.json").write_text(json.dumps(result), encoding="utf-8")
    out = tmp_path / "out"
    code = cli([str(dip), str(classical), "--rows", "data.path", "--cols", "method,method.algorithm",
                     "--values", "psnr_final", "--out", str(out)])
    assert code == 0
    table = (out / "table.md").read_text(encoding="utf-8")
    bird = next(line for line in table.splitlines() if line.startswith("| bird"))
    assert "not installed (pip install 'dipddpm[baselines]')" in bird
    head = next(line for line in table.splitlines() if line.startswith("| head"))
    assert "missing" in head   # head has no bm3d run at all


def test_a_job_that_averages_its_replicas_is_one_run_not_one_per_replica(tmp_path):
    """replica_output=mean (dip_best): the table shows the returned image's PSNR, not the replicas'."""
    job = tmp_path / "sweep" / "best_s0"
    write_run(job, "bird", "dip", 0, 30.0)
    result = json.loads((job / "result.json").read_text(encoding="utf-8"))
    result["metrics"].update(replicas_averaged=3, items=[{"seed": s, "psnr_final": p}
                                                         for s, p in ((0, 28.0), (1, 29.0), (2, 27.0))])
    (job / "result.json").write_text(json.dumps(result), encoding="utf-8")
    out = tmp_path / "out"
    assert cli([str(tmp_path / "sweep"), "--rows", "data.path", "--values", "psnr_final", "--out", str(out)]) == 0
    frame = pd.read_csv(out / "table.csv")
    assert frame["psnr_final_mean"].tolist() == [30.0] and frame["n"].tolist() == [1]


def test_the_same_figure_saved_twice_gives_the_same_svg_bytes(tmp_path):
    """Committed plots change only with their data: no date in the SVG, fixed element ids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dipddpm.io import save_figure_atomic

    saved = []
    for name in ("a.png", "b.png"):
        figure, axes = plt.subplots()
        axes.bar(["x", "y"], [1.0, 2.0], yerr=[0.1, 0.2])
        save_figure_atomic(tmp_path / name, figure, svg=True)
        saved.append((tmp_path / name).with_suffix(".svg").read_bytes())
    assert saved[0] == saved[1]
    assert b"<dc:date>" not in saved[0] and b"clip-path" in saved[0]
