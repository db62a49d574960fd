"""dipddpm-bench in a tiny mode: the CSV it writes, and its plain baseline network."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from dipddpm.bench import COLUMNS, backbone_config, cli, plain_net_for, train_step_flops
from dipddpm.models import build_backbone

NUMERIC = ("ms_per_step", "steps_per_second", "gflop_per_step", "gflops", "ceiling_gflops", "ceiling_share",
           "ratio", "eval_ms", "eval_share")


def test_tiny_bench_writes_positive_finite_numbers(tmp_path, capsys):
    code = cli(["--backbones", "skip_mnist", "--sizes", "16", "--steps", "3", "--repeats", "1", "--replicas", "2",
                "--no-compile", "--ceiling-size", "128", "--sampling-steps", "2", "--device", "cpu",
                "--out", str(tmp_path)])
    assert code == 0
    assert "ms_per_step" in capsys.readouterr().out
    with open(tmp_path / "bench.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    kinds = {(row["section"], row["variant"]) for row in rows}
    for expected in [("ceiling", "fp32"), ("dip", "ours"), ("dip", "plain"), ("dip", "channels_last"),
                     ("dip", "autocast_bf16"), ("eval", "eval_every=50"), ("replicas", "vmap K=2"),
                     ("replicas", "loop K=2"), ("replicas", "sequential K=2")]:
        assert expected in kinds
    assert any(row["section"] == "sampling" for row in rows)
    for row in rows:
        assert row["device"] == "cpu" and row["torch"] == torch.__version__ and int(row["threads"]) >= 1
        for name in NUMERIC:
            if row[name] != "":
                value = float(row[name])
                assert math.isfinite(value) and value > 0, (row["section"], row["variant"], name, value)
    ours = next(row for row in rows if row["section"] == "dip" and row["variant"] == "ours")
    assert ours["ratio"] != "" and float(ours["gflop_per_step"]) > 0
    assert float(ours["ms_per_step"]) * float(ours["steps_per_second"]) == pytest.approx(1000.0, rel=1e-3)
    sampling = [row for row in rows if row["section"] == "sampling"]
    assert {(row["backbone"], row["batch"]) for row in sampling if row["ms_per_step"]} == {
        (net, batch) for net in ("unet_ln", "unet_res") for batch in ("1", "64")}


def test_plain_baseline_is_the_same_network_as_ours():
    cfg = backbone_config("skip")
    ours = build_backbone(cfg, 32, 3)
    plain = plain_net_for(cfg, 32, 3)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(plain) == count(ours)
    code, target = torch.rand(1, 32, 64, 64), torch.rand(1, 3, 64, 64)
    assert train_step_flops(plain, code, target) == train_step_flops(ours, code, target)
    assert plain_net_for(backbone_config("cnn"), 32, 3) is None


def test_bench_rejects_an_unknown_backbone(tmp_path, capsys):
    assert cli(["--backbones", "nonet", "--out", str(tmp_path)]) == 2
    assert "--backbones" in capsys.readouterr().err
