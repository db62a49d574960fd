"""The app end to end, as a user runs it: one job, its files, its errors (each bad input's
message found in-process; one bad input per place the CLI stops run as a process).

The diverging run, the dry run and the bad-input processes run one after another in a
background thread (the ``background`` fixture) while the tiny runs go on: two processes at a time.
"""

import csv
import json

import pytest
import torch
from conftest import TINY_RUN, composed, in_background, run_dir_from

from dipddpm.dip import DipSettings, Stage, fit_dip
from dipddpm.errors import ConfigError, DivergedError
from dipddpm.sweep import check_composition, check_group_choices
from dipddpm.train import prepare_job


# one bad command line for each place cli stops: the group check, the composition, the job's validation
BAD_INPUT_PROCESSES = [["backbone=nonsense"], ["data.sizee=3"], ["data.sigma=1.5"]]
DRY_RUN = ["noise_plan=gradual", "epoch_plan=list", "epoch_plan.steps=[5,6,7]", "dry_run=true"]
DIVERGING = ["backbone=cnn", "backbone.depth=3", "data.size=16", "method.steps=30", "eval_every=10", "optim.lr=1e30",
             "method.input=noisy", "threads=1"]


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    """{name: (future of the finished process, its output_root)} for the dry run ("dry_run"), the
    diverging run ("diverging") and BAD_INPUT_PROCESSES ("bad0", "bad1", ...)."""
    commands = {"dry_run": DRY_RUN, "diverging": DIVERGING}
    commands.update({f"bad{i}": args for i, args in enumerate(BAD_INPUT_PROCESSES)})
    with in_background(commands, tmp_path_factory.mktemp("background")) as runs:
        yield runs


@pytest.mark.usefixtures("background")  # starts the background runs first
def test_tiny_run_writes_every_file(tiny_run):
    _, run = tiny_run
    for name in ("result.json", "curve.csv", "clean.png", "noisy.png", "final.png", "best.png", "curves.png"):
        assert (run / name).is_file(), name
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "ok" and result["seed"] == 0 and result["device"] == "cpu"
    assert result["choices"]["backbone"] == "skip_mnist"
    assert result["config"]["data.size"] == 32 and result["config"]["method.steps"] == 12
    metrics = result["metrics"]
    for key in ("psnr_final", "ssim_final", "psnr_best", "ssim_best", "psnr_stop", "ssim_stop", "psnr_noisy_input",
                "psnr_final_vs_noisy", "best_step", "stop_step", "loss_final", "wall_seconds", "steps", "steps_per_second"):
        assert metrics[key] is not None, key
    assert metrics["steps"] == 12 and metrics["stop_step"] == 11
    assert result["uses_clean_image"] is False
    rows = list(csv.DictReader((run / "curve.csv").open()))
    assert list(rows[0]) == ["step", "stage", "stage_step", "loss", "psnr", "ssim", "psnr_noisy", "nr_stat"]
    assert [int(r["step"]) for r in rows] == [0, 4, 8, 11]
    assert max(float(r["psnr"]) for r in rows) == pytest.approx(metrics["psnr_best"], abs=1e-6)


def test_same_seed_gives_identical_metrics(tiny_run, train, tmp_path):
    """A second process repeats seed 0 (as the first job of a sweep) and runs seed 1."""
    proc = train("-m", *TINY_RUN, "seed=0,1", f"output_root={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    by_seed = {r["seed"]: r["metrics"] for r in (json.loads(p.read_text()) for p in tmp_path.rglob("result.json"))}
    first = json.loads((tiny_run[1] / "result.json").read_text())["metrics"]
    timing = {"wall_seconds", "steps_per_second"}
    untimed = lambda metrics: {k: v for k, v in metrics.items() if k not in timing}  # noqa: E731
    assert untimed(first) == untimed(by_seed[0])
    assert by_seed[1]["psnr_final"] != first["psnr_final"]


def error_line(*args) -> str:
    """The error line dipddpm-train prints for a bad command line, found in this process in cli's
    order: the group choices, the composition, then the job's own validation."""
    problem = check_group_choices(list(args)) or check_composition(list(args))
    if problem is None:
        with pytest.raises(ConfigError) as info:
            prepare_job(composed(*args))
        problem = str(info.value)
    return f"dipddpm-train: error: {problem}"


@pytest.mark.parametrize("args,key", [
    (["backbone=nonsense"], "backbone='nonsense'"),
    (["data.path=/no/such.png"], "data.path='/no/such.png'"),
    (["data.size=100"], "data.size=100"),
    (["data.sigma=1.5"], "data.sigma=1.5"),
    (["optim.lr=0"], "optim.lr=0"),
    (["method.steps=0"], "method.steps=0"),
    (["backbone=cnn", "backbone.depth=7"], "backbone.depth=7"),
    (["data.sizee=3"], "data.sizee='3'"),
    (["early_stop=sometimes"], "early_stop='sometimes'"),
    (["data=mnist"], "data='mnist'"),
    (["method=classical", "data=digit"], "data='digit'"),
])
def test_bad_input_names_the_key(args, key):
    assert error_line(*args).startswith(f"dipddpm-train: error: {key} is not allowed: ")


@pytest.mark.parametrize("index", range(len(BAD_INPUT_PROCESSES)), ids=[a[0] for a in BAD_INPUT_PROCESSES])
def test_bad_input_is_one_line_and_exit_status_2(background, index):
    future, root = background[f"bad{index}"]
    proc = future.result()
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "Warning" not in l and "warn" not in l]
    assert lines == [error_line(*BAD_INPUT_PROCESSES[index])], proc.stderr
    assert not list(root.rglob("result.json"))


def test_an_undecodable_image_file_is_a_config_error(tmp_path):
    fake = tmp_path / "x.png"
    fake.write_text("not an image\n")
    assert error_line(f"data.path={fake}") == \
        f"dipddpm-train: error: data.path='{fake}' is not allowed: a readable image file (OSError)"


def test_dry_run_writes_plan_without_training(background):
    future, root = background["dry_run"]
    proc = future.result()
    assert proc.returncode == 0, proc.stderr
    plans = list(root.rglob("plan.json"))
    assert len(plans) == 1 and not list(root.rglob("result.json"))
    plan = json.loads(plans[0].read_text())
    assert [s["steps"] for s in plan["stages"]] == [5, 6, 7]
    assert [s["sigma"] for s in plan["stages"]] == [0.1, 0.05, 0.025]


def test_diverging_run_is_recorded_as_diverged(background):
    future, root = background["diverging"]
    proc = future.result()
    assert proc.returncode == 1, proc.stderr[-2000:]
    result = json.loads(next(root.rglob("result.json")).read_text())
    assert result["status"] == "diverged"
    assert result["error"]["type"] == "DivergedError"
    assert "nan" not in json.dumps(result["metrics"]).lower()


class NanAfter(torch.nn.Module):
    """Identity-ish net whose output becomes NaN from call ``n`` on."""

    def __init__(self, n):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls, self.n = 0, n

    def forward(self, x):
        self.calls += 1
        out = x * self.scale
        return out * float("nan") if self.calls > self.n else out


def test_fit_dip_reports_the_first_bad_step():
    target = torch.rand(1, 1, 4, 4)
    stage = Stage(index=0, steps=20, net_input=torch.rand(1, 1, 4, 4), target=target)
    with pytest.raises(DivergedError) as info:
        fit_dip(NanAfter(7), [stage], DipSettings(eval_every=10), clean=target)
    assert info.value.step == 7


def test_fit_dip_stages_share_one_network_and_record_stage_boundaries():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    clean = torch.rand(1, 1, 8, 8)
    stages = [Stage(i, 5, torch.rand(1, 1, 8, 8), clean) for i in range(3)]
    result = fit_dip(net, stages, DipSettings(eval_every=2, lr=0.01), clean=clean)
    assert result.steps_run == 15
    assert [r["step"] for r in result.curve] == [0, 2, 4, 5, 7, 9, 10, 12, 14]
    assert [r["stage"] for r in result.curve] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [s.stop_step for s in result.stages] == [4, 4, 4]
    assert result.best_step == max(result.curve, key=lambda r: r["psnr"])["step"]
