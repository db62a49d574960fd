"""The R1 (staged/*) and R2 (guided/*) experiments run end to end as users run them.

One module fixture launches every experiment's sweep under profile=smoke with seeds=1,
plus the faithful dry runs of the guided plans, two processes at a time; the tests then
read what those runs wrote. The variant, curriculum and backbone axes run in full; the R1
tables' lr, CNN depth and noise-plan axes run on fewer values (NARROWED): a value left out
changes numbers (a rate, a layer count, the stage sigmas) that the values kept send through
the same code.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import run_train

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
EXPERIMENTS = sorted(
    p.relative_to(CONF / "experiment").with_suffix("").as_posix()
    for folder in ("staged", "guided")
    for p in (CONF / "experiment" / folder).glob("*.yaml")
)
SMOKE = ["profile=smoke", "seeds=1", "threads=1"]
# Command-line values for sweep axes (they replace the experiment's own, as in Hydra's basic sweeper).
# optim.lr: one rate per experiment, 0.001 in the depth tables and R1's 0.005 elsewhere. backbone.depth:
# 5 layers here, 3 in the levels and fast tables, 4 in traditional_vs_staged (test_backbones builds all
# three). noise_plan: each plan of the levels tables runs with every variant in one of them.
NARROWED = {
    "staged/depth_staged": ["backbone.depth=5", "optim.lr=0.001"],
    "staged/depth_traditional": ["backbone.depth=5", "optim.lr=0.001"],
    "staged/fast_epochs": ["optim.lr=0.005"],
    "staged/levels_1000": ["noise_plan=gradual", "optim.lr=0.005"],
    "staged/levels_200": ["noise_plan=fast,slow", "optim.lr=0.005"],
    "staged/levels_increasing": ["noise_plan=slow_075", "optim.lr=0.005"],
    "staged/traditional_vs_staged": ["optim.lr=0.001"],   # at 0.005 the honest gradual smoke run collapses (R1's lottery)
}
R2_COSINE = [49, 54, 58, 63, 68, 73, 79, 84, 89, 94, 100, 106, 112, 118, 124, 130, 137, 144, 151, 167]
R2_LINEAR = [25, 28, 32, 36, 40, 46, 52, 58, 66, 74, 84, 95, 107, 120, 136, 154, 174, 196, 220, 257]
R2_TIMESTEPS = [500, 475, 451, 427, 403, 378, 354, 330, 306, 282, 257, 233, 209, 185, 161, 136, 112, 88, 64, 40]


def _composed(name: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", "seeds=1"], return_hydra_config=True)


def _expected_jobs(cfg, command_line: list[str]) -> list[dict]:
    """The sweep's jobs as {key: value} dicts, expanded with Hydra's own override parser; an axis
    given on ``command_line`` takes the values given there."""
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    parser = OverridesParser.create()
    given = {override.get_key_element(): override for override in parser.parse_overrides(command_line)}
    assert set(given) <= set(params), f"{sorted(set(given) - set(params))} are not sweep axes"
    axes = []
    for key, value in params.items():
        override = given.get(key) or parser.parse_overrides([f"{key}={value}"])[0]
        values = (override.sweep_string_iterator() if override.is_sweep_override()
                  else [override.get_value_element_as_str()])
        axes.append([(override.get_key_element().lstrip("+"), str(v)) for v in values])
    return [dict(combination) for combination in product(*axes)]


def _metric(metrics: dict, name: str):
    """A table value from result.json metrics; 'stage_psnr_best.2' is the 2nd item of a list metric."""
    if name in metrics:
        return metrics[name]
    base, _, index = name.rpartition(".")
    if index.isdigit() and isinstance(metrics.get(base), list) and len(metrics[base]) >= int(index):
        return metrics[base][int(index) - 1]
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every experiment's smoke sweep and the two faithful dry runs, two processes at a time."""
    root = tmp_path_factory.mktemp("experiments")
    jobs = {name: ["-m", f"experiment={name}", *SMOKE, *NARROWED.get(name, []), f"output_root={root / 'smoke'}"]
            for name in EXPERIMENTS}
    for schedule in ("linear", "cosine"):
        jobs[f"dry:{schedule}"] = ["experiment=guided/backbone_scheduler", f"curriculum=r2_guided_{schedule}",
                                   "profile=faithful", "dry_run=true", f"output_root={root / schedule}"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(jobs, pool.map(lambda args: run_train(*args, timeout=900), jobs.values())))
    return root, done


@pytest.mark.parametrize("schedule,steps", [("cosine", R2_COSINE), ("linear", R2_LINEAR)])
def test_guided_dry_run_gives_the_reports_step_lists(runs, schedule, steps):
    root, done = runs
    process = done[f"dry:{schedule}"]
    assert process.returncode == 0, process.stderr[-3000:]
    plans = list((root / schedule / "runs").rglob("plan.json"))
    assert len(plans) == 1
    plan = json.loads(plans[0].read_text())
    assert [stage["steps"] for stage in plan["stages"]] == steps
    assert [stage["t"] for stage in plan["stages"]] == R2_TIMESTEPS
    assert plan["total_steps"] == 2000
    printed = [line.split() for line in process.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert [int(cells[3]) for cells in printed] == steps


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_sweep_runs_end_to_end(runs, name):
    root, done = runs
    process = done[name]
    assert process.returncode == 0, (process.stdout + process.stderr)[-3000:]
    cfg = _composed(name)
    table = OmegaConf.to_container(cfg.table, resolve=True)
    sweep_dir = root / "smoke" / "sweeps" / name / "smoke"
    results = [json.loads(p.read_text()) for p in sweep_dir.rglob("result.json")]
    expected = _expected_jobs(cfg, NARROWED.get(name, []))
    assert len(results) == len(expected)
    swept = lambda overrides: json.dumps({k: overrides.get(k) for k in expected[0]}, sort_keys=True)  # noqa: E731
    assert sorted(swept(r["overrides"]) for r in results) == sorted(swept(job) for job in expected)
    for result in results:
        assert result["status"] == "ok", result["error"]
        assert result["experiment"] == name
        missing = [v for v in table["values"] if _metric(result["metrics"], v) is None]
        assert not missing, f"{result['overrides']}: no {missing} in metrics"
    markdown = (sweep_dir / "table.md").read_text()
    assert markdown.startswith(f"## {table['title']}")
    assert " (report) |" in markdown


def _rows(markdown: str, columns: int) -> list[tuple]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    return [tuple(cell.strip() for cell in line.strip("|").split("|")[:columns]) for line in lines]


def test_r1_tables_mark_which_rows_used_the_clean_image(runs):
    root, _ = runs
    sweep_dir = root / "smoke" / "sweeps" / "staged" / "traditional_vs_staged" / "smoke"
    results = [json.loads(p.read_text()) for p in sweep_dir.rglob("result.json")]
    uses = {(r["overrides"]["curriculum"], r["overrides"]["variant"]): r["uses_clean_image"] for r in results}
    assert uses == {("r1_traditional", "report"): True, ("r1_gradual", "report"): True,
                    ("r1_traditional", "classic"): False, ("r1_gradual", "classic"): True,
                    ("r1_traditional", "honest"): False, ("r1_gradual", "honest"): False}
    classic = [r for r in results if r["overrides"]["variant"] == "classic"]
    assert all(r["config"]["method.input"] == "code" and r["config"]["method.target"] == "noisy"
               and r["config"]["early_stop.name"] == "wmv" for r in classic)
    rows = _rows((sweep_dir / "table.md").read_text(), 2)
    assert ("Traditional (sigma 0.1, 3000)", "R1: clean target + PSNR stop (uses clean image)") in rows
    assert ("Traditional (sigma 0.1, 3000)", "classic DIP: code -> noisy, WMV stop") in rows


def test_guided_table_rows_come_out_as_in_the_report(runs):
    root, _ = runs
    markdown = (root / "smoke" / "sweeps" / "guided" / "backbone_scheduler" / "smoke" / "table.md").read_text()
    assert _rows(markdown, 3) == [
        ("DIP", "UNet", "–"), ("DIP", "SegNet", "–"),
        ("Guided-DIP", "UNet", "linear"), ("Guided-DIP", "UNet", "cosine"),
        ("Guided-DIP", "SegNet", "linear"), ("Guided-DIP", "SegNet", "cosine"),
        ("Guided-DIP", "SegNet", "cosine, honest (stages from y = x_40)"),
        ("Guided-DIP", "SegNet", "linear, honest (stages from y = x_40)"),
        ("Guided-DIP", "UNet", "cosine, honest (stages from y = x_40)"),
        ("Guided-DIP", "UNet", "linear, honest (stages from y = x_40)"),
    ]
    assert "| 21.29 |" in markdown and "| 1491 |" in markdown
    results = [json.loads(p.read_text()) for p in (root / "smoke" / "sweeps" / "guided").rglob("result.json")]
    assert {r["metrics"]["image_size"] for r in results} == {32}  # the smoke presets of unet.yaml and segnet.yaml
