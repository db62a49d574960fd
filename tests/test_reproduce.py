"""dipddpm-reproduce and the claims: verdicts against hand-computed cases, collapsed and clean-image
columns, the regeneration-only path on a fake reproduction folder, and resume from a moved folder."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from dipddpm.compare import build_table, gather
from dipddpm.compare.plots import plot_bars
from dipddpm.compare.claims import Side, judge, parse_claims, pooled_std, verdict
from dipddpm.compare.claims import side as claim_side
from dipddpm.errors import ConfigError
from dipddpm import reproduce as rp

EXPERIMENT = "staged/traditional_vs_staged"


def side(*values, collapsed=0):
    return Side(np.array(values, dtype=float), collapsed)


# ---------------------------------------------------------------- verdicts


def test_elapsed_time_is_the_union_of_job_intervals_and_counts_resumed_runs():
    def job(start, finish):
        return {"started": f"2026-11-30T{start}", "finished": f"2026-11-30T{finish}"}
    # two jobs at once (10:00-10:05, 10:01-10:04), one right after (10:05:30-10:06), then a resumed
    # run two hours later (12:00-12:10); an undated result is left out
    results = [job("10:00:00", "10:05:00"), job("10:01:00", "10:04:00"), job("10:05:30", "10:06:00"),
               job("12:00:00", "12:10:00"), {"status": "ok"}]
    assert rp.elapsed_seconds(results) == (6 * 60 + 10 * 60, 2)
    assert rp.elapsed_seconds([{"status": "ok"}]) is None


def test_verdict_against_hand_computed_cases():
    # means 31 and 26, both std 1 (n=3): s_p = 1, d = +5 > 2 -> confirmed
    confirmed = verdict(side(30, 31, 32), side(25, 26, 27), higher_is_better=True)
    assert (confirmed.kind, confirmed.difference, confirmed.pooled_std) == ("confirmed", 5.0, 1.0)
    assert confirmed.reason == "d = +5, 2 s_p = 2: the report's direction, by more than 2 s_p"
    # the same numbers where lower is better: d = -5 < -2 -> refuted
    refuted = verdict(side(30, 31, 32), side(25, 26, 27), higher_is_better=False)
    assert (refuted.kind, refuted.difference) == ("refuted", -5.0)
    # means 32 and 31, both std 2: d = 1 within 2 s_p = 4 -> inconclusive
    assert verdict(side(30, 32, 34), side(29, 31, 33), True).kind == "inconclusive"
    # unequal n: s_b^2 = 5/3 (n=4), s_w^2 = 2 (n=2): s_p = sqrt((3 * 5/3 + 1 * 2) / 4) = sqrt(1.75)
    better, worse = side(1, 2, 3, 4), side(0, 2)
    assert pooled_std(better, worse) == pytest.approx(math.sqrt(1.75), abs=1e-12)
    uneven = verdict(better, worse, True)
    assert uneven.kind == "inconclusive" and uneven.difference == pytest.approx(1.5)
    # d just above and just below the bound: 2 s_p = 2 with s_p = 1
    assert verdict(side(2.01, 3.01, 4.01), side(0, 1, 2), True).kind == "confirmed"
    assert verdict(side(1.99, 2.99, 3.99), side(0, 1, 2), True).kind == "inconclusive"
    # one run on a side: no std -> inconclusive; none -> no results yet
    assert verdict(side(40), side(25, 26, 27), True).kind == "inconclusive"
    assert verdict(side(), side(25, 26), True).kind == "no results yet"


def test_bad_claims_fail_with_one_line_naming_the_key():
    spec = {"claims": [{"text": "x", "metric": "psnr_final", "higher_is_better": "yes",
                        "better": {"a": 1}, "worse": {"a": 2}}]}
    with pytest.raises(ConfigError, match=r"^table.claims\[0\].higher_is_better='yes' is not allowed: true or false$"):
        parse_claims(spec)
    spec["claims"][0].update(higher_is_better=True, worse={})
    with pytest.raises(ConfigError, match=r"^table.claims\[0\].worse=\{\} is not allowed"):
        parse_claims(spec)
    spec["claims"][0].update(worse={"a": 2}, direction="up")
    with pytest.raises(ConfigError, match=r"table.claims\[0\].direction='up' is not allowed: one of the keys"):
        parse_claims(spec)


def test_every_claim_compares_rows_its_sweep_runs():
    """Each selector names table row/column fields with values the experiment's sweep has."""
    judged = 0
    for entry in rp.tables():
        spec = rp.table_spec(entry.experiment)
        raw = yaml.safe_load((rp.config_dir() / "experiment" / f"{entry.experiment}.yaml").read_text())
        params = raw["hydra"]["sweeper"]["params"]
        fields = set(spec.get("rows") or []) | set(spec.get("columns") or [])
        for claim in parse_claims(spec):
            assert claim["metric"] in spec["values"], (entry.experiment, claim["metric"])
            selectors = [claim["better"], claim["worse"], *(claim.get("honest") or {}).values()]
            for selector in selectors:
                for name, value in selector.items():
                    assert name in fields, (entry.experiment, name)
                    swept = str(params.get(name, ""))
                    if swept and not swept.startswith("range("):
                        assert str(value) in swept.split(","), (entry.experiment, name, value)
            judged += 1
    assert judged >= 15   # every report table of R1-R5 has at least one claim


# ---------------------------------------------------------------- fake results


def fake_job(folder: Path, name: str, *, curriculum, variant, seed, psnr, status="ok", clean=True,
             collapsed=None, seconds=10.0):
    job = folder / name
    job.mkdir(parents=True, exist_ok=True)
    metrics = {"psnr_final": psnr}
    if collapsed is not None:
        metrics["collapsed"] = collapsed
    result = {"status": status, "error": None, "experiment": EXPERIMENT, "method": "dip", "seed": seed,
              "device": "cpu",
              "overrides": {"curriculum": curriculum, "variant": variant, "optim.lr": "0.005", "seed": str(seed)},
              "choices": {}, "config": {"seed": seed}, "config_hash": f"h-{name}", "uses_clean_image": clean,
              "metrics": metrics, "job_seconds": seconds, "started": "2026-11-30T10:00:00",
              "finished": f"2026-11-30T10:0{seed}:00"}
    (job / "result.json").write_text(json.dumps(result))
    return job


def fake_experiment(folder: Path) -> None:
    """Report rows (clean image): gradual 34 ± 0.5 beats traditional 26 ± 0.5, one traditional run
    collapsed (10 dB); honest rows: 28 ± 1 vs 28 ± 0.5 (inconclusive)."""
    rows = {("r1_gradual", "report"): [33.5, 34.0, 34.5], ("r1_traditional", "report"): [25.5, 26.0, 26.5],
            ("r1_gradual", "honest"): [27.0, 28.0, 29.0], ("r1_traditional", "honest"): [27.5, 28.0, 28.5]}
    for (curriculum, variant), values in rows.items():
        for seed, psnr in enumerate(values):
            fake_job(folder, f"curriculum={curriculum},seed={seed},variant={variant}", curriculum=curriculum,
                     variant=variant, seed=seed, psnr=psnr, clean=variant == "report", collapsed=False)
    fake_job(folder, "curriculum=r1_traditional,seed=3,variant=report", curriculum="r1_traditional",
             variant="report", seed=3, psnr=10.0, status="collapsed", collapsed=True)


def test_collapsed_runs_are_counted_apart_beside_the_all_runs_figure(tmp_path):
    fake_experiment(tmp_path)
    spec = {"rows": ["curriculum", "variant"], "values": ["psnr_final"], "format": {"psnr_final": ".2f"}}
    table = build_table(gather([tmp_path]), spec)
    display = table.display.set_index(["curriculum", "variant"])
    traditional = display.loc[("r1_traditional", "report")]
    # learned: 25.5, 26, 26.5 -> 26.00 ± 0.50; all runs add the collapsed 10 dB run
    every = [25.5, 26.0, 26.5, 10.0]
    mean = sum(every) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in every) / 3)
    assert traditional["psnr_final"] == "26.00 ± 0.50"
    assert traditional["psnr_final (all runs)"] == f"{mean:.2f} ± {std:.2f}" == "22.00 ± 8.01"
    assert (traditional["n"], traditional["collapsed"], traditional["failed"]) == (3, "1 of 4", 0)
    assert display.loc[("r1_gradual", "report"), "collapsed"] == "0 of 3"
    numeric = table.numeric.set_index(["curriculum", "variant"])
    assert numeric.loc[("r1_traditional", "report"), "psnr_final_all_mean"] == pytest.approx(22.0)
    assert numeric.loc[("r1_traditional", "report"), "collapsed"] == 1
    assert "collapsed k of n" in table.markdown


def test_a_cell_whose_every_run_collapsed_says_so_and_its_bar_too(tmp_path):
    fake_experiment(tmp_path)
    for seed in range(2):
        fake_job(tmp_path, f"curriculum=r1_single,seed={seed},variant=report", curriculum="r1_single",
                 variant="report", seed=seed, psnr=11.0 + seed, status="collapsed", collapsed=True)
    spec = {"rows": ["curriculum", "variant"], "values": ["psnr_final"], "format": {"psnr_final": ".2f"}}
    table = build_table(gather([tmp_path]), spec)
    single = table.display.set_index(["curriculum", "variant"]).loc[("r1_single", "report")]
    assert single["psnr_final"] == "all collapsed"
    assert single["psnr_final (all runs)"] == f"11.50 ± {math.sqrt(0.5):.2f}"
    assert (single["n"], single["collapsed"]) == (0, "2 of 2")
    svg = plot_bars(table, tmp_path / "bars.png").with_suffix(".svg").read_text()
    assert svg.count("all collapsed") == 1 and "missing" not in svg


def test_uses_clean_image_column_per_row(tmp_path):
    fake_experiment(tmp_path)
    table = build_table(gather([tmp_path]), {"rows": ["variant"], "values": ["psnr_final"]})
    assert list(table.display.columns[:2]) == ["variant", "uses clean image"]
    assert dict(zip(table.display["variant"], table.display["uses clean image"])) == {"honest": "no", "report": "yes"}
    mixed = build_table(gather([tmp_path]), {"rows": ["curriculum"], "values": ["psnr_final"]})
    assert set(mixed.display["uses clean image"]) == {"mixed"}
    assert list(table.numeric["uses_clean_image"]) == ["no", "yes"]


def test_claim_verdicts_on_fake_runs(tmp_path):
    fake_experiment(tmp_path)
    claim = next(c for c in parse_claims(rp.table_spec(EXPERIMENT)) if c["better"]["optim.lr"] == 0.005)
    judged = judge(gather([tmp_path]), claim)
    # better: 33.5, 34, 34.5; worse (the collapsed run counts): 25.5, 26, 26.5, 10
    assert (judged.better.n, judged.worse.n, judged.worse.collapsed) == (3, 4, 1)
    s_p = math.sqrt((2 * 0.25 + 192.5) / 5)   # (n - 1) s^2 of each side
    assert judged.verdict.pooled_std == pytest.approx(s_p)
    assert judged.verdict.difference == pytest.approx(34.0 - 22.0)
    assert judged.verdict.kind == "inconclusive"          # 12 < 2 s_p = 12.43: the collapse costs the claim
    assert judged.honest[2].kind == "inconclusive"
    # a baseline row carries the config of the job whose observation it denoised: never a claim's side
    baseline = fake_job(tmp_path, "baseline=nlm,data=x", curriculum="r1_gradual", variant="report", seed=0, psnr=5.0)
    result = json.loads((baseline / "result.json").read_text())
    (baseline / "result.json").write_text(json.dumps(result | {"baseline": "nlm", "method": "classical"}))
    again = judge(gather([tmp_path]), claim)
    assert (again.better.n, again.verdict.difference) == (3, pytest.approx(12.0))
    assert claim_side(gather([tmp_path]), {"baseline": "nlm"}, "psnr_final").n == 1


# ---------------------------------------------------------------- reproduction folder


def test_regeneration_only_when_up_to_date_and_a_missing_job_launches(tmp_path, monkeypatch):
    root, doc = tmp_path / "outputs", tmp_path / "docs" / "REPRODUCTION.md"
    folder = rp.experiment_dir(root, "smoke", EXPERIMENT)
    assert folder == root / "reproduction" / "smoke" / "staged" / "traditional_vs_staged"
    fake_experiment(folder)
    entry = next(e for e in rp.tables() if e.experiment == EXPERIMENT)
    overrides = rp.sweep_overrides(entry, "smoke", "all", [])
    assert overrides == ["-m", f"experiment={EXPERIMENT}", "profile=smoke", "+baselines=all"]
    location = rp.sweep_location(folder, root, "smoke")
    assert location == [f"hydra.sweep.dir={folder.as_posix()}",
                        f"cache_dir={(root / 'reproduction' / 'smoke' / 'cache').as_posix()}", f"output_root={root.as_posix()}"]
    rp.write_manifest(folder, "cmd", rp.config_fingerprint(), overrides)

    launched = []
    monkeypatch.setattr(rp.subprocess, "call", lambda command: launched.append(command) or 0)
    assert rp.reproduce("smoke", EXPERIMENT, [], root, doc) == 0      # builds the tables once
    assert launched == [] and (folder / "table.md").is_file() and (folder / "bars.png").is_file()
    stamp = (folder / "table.md").stat().st_mtime_ns
    assert rp.reproduce("smoke", None, [], root, doc) == 0         # every other table launches, not this one
    assert not any(f"experiment={EXPERIMENT}" in c for c in launched)
    assert not any("experiment=denoise/zero_shot" in c for c in launched)   # table.profiles: [faithful]
    assert len(launched) == len(rp.tables()) - 2
    assert all(f"cache_dir={(root / 'reproduction' / 'smoke' / 'cache').as_posix()}" in c for c in launched)
    launched.clear()
    began = time.perf_counter()
    assert rp.reproduce("smoke", EXPERIMENT, [], root, doc) == 0
    seconds = time.perf_counter() - began
    assert launched == [] and seconds < 3.0, seconds
    # how the jobs run (launcher, threads) does not make a finished sweep out of date; seeds do
    fingerprint = rp.config_fingerprint()
    assert rp.is_up_to_date(folder, fingerprint, overrides + ["launcher=joblib", "threads=1"])
    assert not rp.is_up_to_date(folder, fingerprint, overrides + ["seeds=2"])
    assert (folder / "table.md").stat().st_mtime_ns == stamp       # nothing changed: tables not rebuilt

    text = doc.read_text()
    assert text.startswith("# Reproduction (profile `smoke`)")
    assert "- Machine: " in text and "**These results ran without a GPU.**" in text
    assert "- Date: 2026-11-30" in text and "d > 2 s_p" in text
    section = text.split("## T1.1")[1].split("\n## ")[0]
    assert "Jobs: 13 of the sweep's 60 finished (1 collapsed, 0 failed or stopped, 47 not started); wall time 130 s" in section
    assert "| T1.1 | `staged/traditional_vs_staged` | 13 of 60 |" in text   # 5 seeds x 2 curricula x 3 variants x 2 lr
    assert "; 3.0 minutes of elapsed time in one run." in section   # 10:00:00 to 10:03:00
    summary_row = next(line for line in text.splitlines() if line.startswith("| T1.1 |"))
    assert summary_row.endswith("| 3.0 |")
    assert "| T1.2 | `staged/depth_staged` | not yet run | 2 no results yet | — |" in text
    assert "Elapsed time of all these sweeps: 3 min (" in text
    assert "ours: 34 ± 0.5 (n=3) vs 22 ± 8.01 (n=4, 1 collapsed); report: 34.5017 vs 26.2294" in section
    assert "verdict: **inconclusive** — d = +12, 2 s_p = 12.43: |d| within 2 s_p" in section
    assert "honest rows (no clean image): 28 ± 1 (n=3) vs 28 ± 0.5 (n=3): **inconclusive**" in section
    assert "| uses clean image |" in section and "1 of 4" in section
    differs = section.split("What differs from the report:\n\n")[1].split("\n\n")[0].splitlines()
    assert differs[0] == "- Image: scikit-image's astronaut (bundled) stands in for R1's Lenna; noise sigma 0.1 as R1."
    assert len(differs) == 3 and not any("64x64" in line for line in differs)   # the standard entry: not under smoke
    assert "![bars](../outputs/reproduction/smoke/staged/traditional_vs_staged/bars.png)" in section
    assert "## T1.2" in text and text.split("## T1.2")[1].split("\n## ")[0].count("**Not yet run.**") == 1
    assert "\n## R4 ablation — DDPM training epochs (3 DIP passes, 500 steps)\n" in text   # its title, not the label twice

    (folder / "curriculum=r1_gradual,seed=1,variant=report" / "result.json").unlink()
    assert rp.reproduce("smoke", EXPERIMENT, [], root, doc) == 0
    assert len(launched) == 1 and launched[0][1:] == ["-m", "dipddpm.train", *overrides, *location]


def test_a_launch_that_skips_every_job_still_leaves_the_table_of_the_current_spec(tmp_path, monkeypatch):
    """A sweep's own callback writes table.md from the specs its results recorded; after any launch the
    table is rebuilt from the experiment's current spec, even when no result changed."""
    root = tmp_path / "outputs"
    folder = rp.experiment_dir(root, "smoke", EXPERIMENT)
    fake_experiment(folder)
    monkeypatch.setattr(rp.subprocess, "call", lambda command: 0)
    assert rp.reproduce("smoke", EXPERIMENT, [], root, tmp_path / "R.md", launch="all") == 0
    built = (folder / "table.md").read_text()
    assert "R1: clean target + PSNR stop (uses clean image)" in built      # the current spec's label

    def callback_table(command):
        (folder / "table.md").write_text("## from the recorded specs\n")
        return 0

    monkeypatch.setattr(rp.subprocess, "call", callback_table)
    assert rp.reproduce("smoke", EXPERIMENT, [], root, tmp_path / "R.md", launch="all") == 0
    assert (folder / "table.md").read_text() == built


@pytest.mark.slow
def test_a_moved_reproduction_folder_resumes_without_rerunning(tmp_path, monkeypatch):
    """A finished sweep copied to another root (a fresh clone elsewhere) is up to date there, and
    launching its sweep anyway skips every job: the config hash has no machine or path in it."""
    first, moved = tmp_path / "a" / "outputs", tmp_path / "b" / "outputs"
    extra = ["seeds=1", "backbone.depth=3", "optim.lr=0.005", "threads=1"]
    pattern = "staged/depth_traditional"
    assert rp.reproduce("smoke", pattern, extra, first, None, baselines="none") == 0
    shutil.copytree(first / "reproduction", moved / "reproduction")
    folder = rp.experiment_dir(moved, "smoke", pattern)
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("result.json")}
    assert len(stamps) == 2                     # variant report, classic

    overrides = rp.sweep_overrides(rp.tables(pattern)[0], "smoke", "none", extra)
    assert rp.is_up_to_date(folder, rp.config_fingerprint(), overrides)
    monkeypatch.setattr(rp.subprocess, "call", lambda command: pytest.fail(f"launched {command}"))
    assert rp.reproduce("smoke", pattern, extra, moved, None, baselines="none") == 0
    monkeypatch.undo()
    # launched anyway: Hydra's jobs find their result.json complete for the same config hash and skip
    assert rp.reproduce("smoke", pattern, extra, moved, None, baselines="none", launch="all") == 0
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("result.json")} == stamps


def test_an_unknown_profile_fails_before_any_launch(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(rp.subprocess, "call", lambda command: pytest.fail(f"launched {command}"))
    assert rp.cli(["nosuch", "--only", EXPERIMENT, "--output-root", str(tmp_path), "--doc", str(tmp_path / "R.md")]) == 2
    message = capsys.readouterr().err
    assert message.startswith("dipddpm-reproduce: error: profile='nosuch' is not allowed: one of ") and "smoke" in message
    assert not (tmp_path / "R.md").exists()


def test_differences_list_the_common_entries_then_the_profiles():
    spec = {"differs": {"all": ["seeds 0-4"], "standard": "image 64 px", "faithful": []}}
    assert rp.differences(spec, "standard") == ["seeds 0-4", "image 64 px"]
    assert rp.differences(spec, "faithful") == ["seeds 0-4"]
    assert rp.differences({}, "standard") == []
    with pytest.raises(ValueError, match="table.differs must map"):
        rp.differences({"differs": ["image 64 px"]}, "standard")
    section = rp.differences(rp.table_spec("guided/backbone_scheduler"), "standard")
    assert section[-1].startswith("SegNet at 32x32 (R2: 128x128")


def test_a_table_of_another_profile_is_shown_and_never_launched(tmp_path, monkeypatch):
    """denoise/zero_shot's table.profiles is [faithful]: other profiles launch nothing for it and show
    faithful's committed table; faithful itself launches it."""
    root, doc = tmp_path / "outputs", tmp_path / "docs" / "REPRODUCTION.md"
    ran = rp.experiment_dir(root, "faithful", "denoise/zero_shot")
    for seed in range(2):
        fake_job(ran, f"method=bm3d,seed={seed}", curriculum="-", variant="-", seed=seed, psnr=30.0 + seed, clean=False)
    (ran / "table.md").write_text("## Zero-shot denoisers\n\n| method | PSNR |\n|---|---|\n| BM3D | 30.50 ± 0.71 |\n")
    rp.write_document("smoke", root, doc)
    text = doc.read_text()
    section = text.split("## denoise/zero_shot")[1].split("\n## ")[0]
    assert section.startswith(" — Zero-shot denoisers")
    assert ("Experiment `denoise/zero_shot`: not a `smoke` sweep (its `table.profiles`: faithful), so "
            "`dipddpm-reproduce smoke` launches nothing for it.") in section
    assert "**Not yet run.**" not in section
    assert ("Profile `faithful` ran it (2 jobs, committed in `outputs/reproduction/faithful/denoise/zero_shot/`); "
            "its table, not this profile's:") in section
    assert "| BM3D | 30.50 ± 0.71 |" in section
    assert "Profile `" not in text.split("## baselines/cset")[1].split("\n## ")[0]   # nobody ran it
    assert "| denoise/zero_shot | `denoise/zero_shot` | faithful only |" in text
    assert rp.reproducing_profiles(rp.table_spec("denoise/zero_shot")) == ["faithful"]
    assert rp.reproducing_profiles({"profiles": "standard"}) == ["standard"]
    assert rp.reproducing_profiles({}) is None

    launched = []
    monkeypatch.setattr(rp.subprocess, "call", lambda command: launched.append(command) or 0)
    assert rp.reproduce("standard", "denoise/zero_shot", [], root, None) == 0
    assert launched == []
    assert rp.reproduce("faithful", "denoise/zero_shot", [], root, None, launch="all") == 0
    assert len(launched) == 1 and "experiment=denoise/zero_shot" in launched[0]
