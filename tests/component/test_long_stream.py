"""Component tests: the long-stream benchmark (``pairsieve bench-long-stream``) and the cost
trace."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from service.cli import main
from service.evaluation import long_stream
from service.evaluation.datasets import make_synthetic
from service.evaluation.simulator import SimConfig, simulate


def test_stream_runs_record_offered_items_and_seconds_at_every_curve_point():
    ds = make_synthetic(n=300, d_a=16, d_b=12, latent_dim=8, seed=0)
    for strategy in ("default", "random"):
        res = simulate(ds, SimConfig(strategy=strategy, mode="stream", budget=60, warmup=20,
                                     retrain_every=20, test_size=50, stream_order="dataset"))
        cost = res["cost"]
        assert [c["pairs"] for c in cost] == [p["pairs"] for p in res["curve"]]
        off = [c["offered"] for c in cost]
        assert off[0] == 0 and off == sorted(off) and off[-1] <= 2 * res["pool_rows"]
        assert off[-1] >= res["curve"][-1]["pairs"]  # every acquisition was offered first
        for key in ("select_seconds", "train_seconds"):
            vals = [c[key] for c in cost]
            assert vals == sorted(vals) and vals[0] >= 0
        if strategy == "default":
            assert cost[-1]["select_seconds"] > 0
    pool = simulate(ds, SimConfig(strategy="default", mode="pool", budget=40, round_size=20,
                                  warmup=20, test_size=50))
    assert pool["cost"] == []


def test_per_item_cost_is_the_select_time_per_offered_item_between_samples():
    cost = [{"offered": 0, "select_seconds": 0.0}, {"offered": 100, "select_seconds": 0.01},
            {"offered": 100, "select_seconds": 0.01}, {"offered": 300, "select_seconds": 0.05}]
    x, us = long_stream.per_item_cost(cost)
    np.testing.assert_allclose(x, [100, 300])  # the empty segment is dropped
    np.testing.assert_allclose(us, [100.0, 200.0])


def test_checkpoints_end_at_the_budget():
    assert long_stream.checkpoints(3000) == [100, 250, 500, 1000, 2000, 3000]
    assert long_stream.checkpoints(120) == [100, 120]


def test_run_refuses_no_seeds_and_a_missing_reference_arm():
    with pytest.raises(ValueError, match="seeds is empty"):
        long_stream.run("emoji-image-name", budget=50, seeds=[])
    with pytest.raises(ValueError, match=r"strategies must include \['random'\]"):
        long_stream.run("emoji-image-name", budget=50, seeds=[0], strategies=("default",))
    with pytest.raises(ValueError, match="jobs must be >= 1, got 0"):
        long_stream.run("emoji-image-name", budget=50, seeds=[0], jobs=0)


def test_cli_bench_long_stream_writes_curve_cost_table_plot_and_json(tmp_path, capsys):
    out = tmp_path / "ls" / "long.md"
    rc = main(["bench-long-stream", "--dataset", "emoji-image-name", "--budget", "120",
               "--seeds", "2", "--retrain-every", "30", "--test-size", "200", "--out", str(out)])
    assert rc == 0
    progress = capsys.readouterr().out
    assert len(re.findall(r"emoji-image-name default +seed", progress)) == 2
    assert len(re.findall(r"emoji-image-name default-no-decay +seed", progress)) == 2
    assert "events" in progress
    report = out.read_text()
    table = report.split("## Learning curve")[1].split("## Per-item cost")[0]
    rows = [line for line in table.splitlines() if line.startswith("| 1")]
    assert [r.split(" | ")[0] for r in rows] == ["| 100", "| 120"]
    assert all(re.fullmatch(r"[0-2]/2", r.split(" | ")[4]) for r in rows)  # wins of 2 seeds
    assert all(len(r.split(" | ")) == 7 for r in rows)  # + no decay, + decay - no decay
    assert "**Drift decay.**" in report and "higher on" in report.split("**Drift decay.**")[1]
    cost = report.split("## Per-item cost")[1]
    tenths = [line for line in cost.splitlines() if line.startswith("| ") and
              line.split(" | ")[0][2:].isdigit()]
    assert len(tenths) == 10
    assert all(float(t.split(" | ")[2]) > 0 for t in tenths)  # µs per item measured, positive
    assert "Last tenth / first tenth" in report and "fewer acquisitions" in report
    data = json.loads((out.parent / "long-results.json").read_text())
    assert sorted((r["strategy"], r["seed"]) for r in data["runs"]) == [
        ("default", 0), ("default", 1), ("default-no-decay", 0), ("default-no-decay", 1),
        ("random", 0), ("random", 1)]
    assert all(r["stream_order"] == "dataset" for r in data["runs"])
    assert (out.with_suffix(".png")).stat().st_size > 1000
    # notes edited by hand: --render re-writes the report from the results, running nothing
    (out.parent / "long-notes.md").write_text("## Findings\n\n- a hand-written finding\n")
    assert main(["bench-long-stream", "--render", "--out", str(out)]) == 0
    again = out.read_text()
    assert again.endswith("- a hand-written finding\n")
    assert again.split("## Findings")[0].rstrip() == report.rstrip()  # same figures, same command


def test_parallel_runs_give_the_same_curves_as_sequential_ones():
    kw = dict(budget=60, seeds=[0], retrain_every=30, test_size=200,
              strategies=("default", "random"), log=lambda _: None)
    seq = long_stream.run("emoji-image-name", jobs=1, **kw)
    par = long_stream.run("emoji-image-name", jobs=2, **kw)
    assert [(r["strategy"], r["seed"]) for r in par["runs"]] == [("default", 0), ("random", 0)]
    assert [r["curve"] for r in seq["runs"]] == [r["curve"] for r in par["runs"]]
