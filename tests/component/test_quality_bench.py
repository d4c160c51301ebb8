"""The offline benchmark commands end to end on tiny inputs: `bench-quality` (and its strategy
selection) and `bench-stream-cost`."""

from __future__ import annotations

import json

import pytest

from service.bench import quality
from service.cli import main


def test_select_strategies_takes_any_registered_name_per_mode():
    got = quality.select_strategies(["random", "coreset", "entropy-0.5", "random-replicate"],
                                    ("pool", "stream"))
    # coreset is pool-only, entropy-0.5 stream-only; neither is in the default matrix
    assert got == {"pool": ("random", "coreset", "random-replicate"),
                   "stream": ("random", "entropy-0.5", "random-replicate")}


def test_select_strategies_refuses_unknown_names_and_missing_random():
    with pytest.raises(ValueError, match=r"unknown strategies \['nope'\] for modes \['stream'\]"):
        quality.select_strategies(["random", "nope"], ("stream",))
    with pytest.raises(ValueError, match=r"stream: savings are measured against random"):
        quality.select_strategies(["default"], ("stream",))
    with pytest.raises(ValueError, match="empty"):
        quality.select_strategies([" "], ("stream",))


def test_cli_bench_quality_writes_report_json_and_curves(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(["bench-quality", "--modes", "stream", "--seeds", "2", "--datasets", "synthetic",
               "--strategies", "random,default,entropy-0.7", "--budget", "60", "--jobs", "1",
               "--out-dir", str(out)])
    assert rc == 0
    progress = capsys.readouterr().out
    assert "[   6/6]" in progress and "eta" in progress  # progress line per run
    data = json.loads((out / "quality-results.json").read_text())
    assert sorted((r["strategy"], r["seed"]) for r in data["runs"]) == [
        ("default", 0), ("default", 1), ("entropy-0.7", 0), ("entropy-0.7", 1),
        ("random", 0), ("random", 1)]
    # random spends exactly the budget; the selector paces to a target rate and can end a few
    # acquisitions short when the stream runs out (it cannot go back), never over
    assert all(r["curve"][-1]["pairs"] == 60 for r in data["runs"] if r["strategy"] == "random")
    assert all(50 <= r["curve"][-1]["pairs"] <= 60 for r in data["runs"])
    rows = {r["strategy"]: r for r in data["rows"]}
    assert set(rows) == {"random", "default", "entropy-0.7"}
    for r in rows.values():
        assert r["seeds"] == 2 and -1.0 <= r["savings_mean"] <= 1.0 and 0 <= r["auc_mean"] <= 1
    report = (out / "quality.md").read_text()
    assert "## stream mode" in report and "| default |" in report and "synthetic" in report
    assert (out / "quality-stream.png").stat().st_size > 1000


def test_cli_bench_stream_cost_writes_segment_report(tmp_path, capsys):
    out = tmp_path / "stream-cost.md"
    rc = main(["bench-stream-cost", "--items", "4096", "--segment", "1024", "--batch", "256",
               "--warmup-items", "1024", "--capacity", "256", "--index-size", "256",
               "--out", str(out)])
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"wrote {out}: last/first segment throughput (medians) ")
    ratio = float(line.split("(medians) ")[1].split(",")[0])
    assert ratio > 0
    text = out.read_text()
    rows = [r for r in text.splitlines() if r.startswith("| ")]
    assert len(rows) == 1 + 4  # the header and one row per measured segment (4096 / 1024)
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| 1,024", "| 2,048", "| 3,072", "| 4,096"]
