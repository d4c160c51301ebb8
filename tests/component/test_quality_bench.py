"""The offline benchmark commands end to end on tiny inputs: `bench-quality` (and its strategy
selection) and `bench-stream-cost`."""

from __future__ import annotations

import pytest

from service.cli import main
from service.evaluation import quality


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


def _worker_threads():
    import torch
    from threadpoolctl import threadpool_info

    return torch.get_num_threads(), sorted({p["num_threads"] for p in threadpool_info()})


def test_quality_workers_compute_on_one_thread_even_when_forked_from_a_threaded_parent():
    # the parent loads BLAS with 2 threads (as on any 2+ core box) before forking the workers:
    # an environment variable set afterwards does not reach the inherited pool
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=2):
        with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as plain:
            inherited = plain.submit(_worker_threads).result()
        with ProcessPoolExecutor(1, mp_context=mp.get_context("fork"),
                                 initializer=quality._init_worker) as ex:
            limited = ex.submit(_worker_threads).result()
    assert inherited[1] == [2]  # the failure mode the initializer exists for
    assert limited == (1, [1])


def _row(strategy, seeds, savings, auc):
    return {"mode": "stream", "dataset": "digits", "strategy": strategy,
            "per_seed": {"seed": seeds, "savings": savings, "auc": auc}}


def test_paired_vs_random_pairs_runs_by_seed_not_by_position():
    rows = [_row("random", [0, 1, 2], [0.0, 0.1, 0.2], [0.10, 0.20, 0.30]),
            # listed in another order and missing seed 1: only seeds 0 and 2 are compared
            _row("default", [2, 0], [0.5, 0.1], [0.28, 0.14])]
    p = quality.paired_vs_random(rows, "stream", "digits", "default")
    assert p["n"] == 2 and p["auc_wins"] == 1  # +0.04 on seed 0, -0.02 on seed 2
    assert p["savings_diff"] == pytest.approx((0.1 + 0.3) / 2)
    assert p["auc_diff"] == pytest.approx((0.04 - 0.02) / 2)
    assert p["savings_sem"] == pytest.approx(abs(0.3 - 0.1) / 2)  # std(ddof=1)/sqrt(2) of 2 values
    assert quality.paired_vs_random(rows, "stream", "digits", "nope") is None
    assert quality.paired_vs_random(rows, "pool", "digits", "default") is None


def _run(strategy, seed, draw, r1s):
    return {"dataset": "d", "mode": "stream", "strategy": strategy, "seed": seed, "draw": draw,
            "budget": 100,
            "curve": [{"pairs": p, "r1": r} for p, r in zip((0, 50, 100), r1s, strict=True)],
            "acquisitions_per_modality": {"a": 50, "b": 50}, "wall_seconds": 0.1}


def test_summarize_averages_random_draws_per_seed_into_the_baseline():
    runs = [_run("random", 0, 0, (0.0, 0.2, 0.4)), _run("random", 0, 1, (0.0, 0.5, 0.6)),
            _run("random", 1, 0, (0.0, 0.3, 0.5)), _run("random", 1, 1, (0.0, 0.3, 0.5)),
            _run("default", 0, 0, (0.0, 0.5, 0.6)), _run("default", 1, 0, (0.0, 0.5, 0.6))]
    rows = {r["strategy"]: r for r in quality.summarize(runs)}
    rand, default = rows["random"], rows["default"]
    # the baseline curve is the mean of all four draws: 0, 0.325, 0.5 at 0, 50, 100 pairs
    assert rand["target_r1"] == pytest.approx(0.5)
    assert rand["seeds"] == 2 and rand["draws"] == 2 and default["draws"] == 1
    # seed 0: draw 0 never reaches 0.5; its best, 0.4, is where the baseline is at
    # 50 + 50 * 0.075 / 0.175 pairs (a shortfall); draw 1 reaches 0.5 at 50 pairs (+50 %).
    # The seed's value is the mean of its draws, not either draw.
    short = (50 + 50 * 0.075 / 0.175) / 100 - 1
    assert rand["per_seed"]["savings"][0] == pytest.approx((short + 0.5) / 2)
    assert rand["per_seed"]["savings"][1] == pytest.approx(0.0)  # both reach 0.5 at 100 pairs
    assert rand["savings_mean"] == pytest.approx((short + 0.5) / 4)
    assert default["per_seed"]["savings"] == pytest.approx([0.5, 0.5])


def test_summarize_measures_every_strategy_against_the_ridge_baseline_end_to_end():
    runs = [_run("random", 0, 0, (0.0, 0.2, 0.4)), _run("random", 1, 0, (0.0, 0.4, 0.6)),
            _run(quality.BASELINE, 0, 0, (0.0, 0.1, 0.2)),
            _run(quality.BASELINE, 1, 0, (0.0, 0.1, 0.4)),
            _run("default", 0, 0, (0.0, 0.3, 0.6)), _run("default", 1, 0, (0.0, 0.1, 0.2))]
    rows = {r["strategy"]: r for r in quality.summarize(runs)}
    # the baseline's mean curve reaches 0.3 at the budget: default crosses it at 50 pairs on seed
    # 0 (+50 %) and never on seed 1 (its best, 0.2, is where the baseline is at 100 * 0.2 / 0.3
    # pairs: a shortfall)
    assert rows["default"]["baseline_target_r1"] == pytest.approx(0.3)
    want = [0.5, (50 + 50 * 0.1 / 0.2) / 100 - 1]
    assert rows["default"]["per_seed"]["vs_baseline"] == pytest.approx(want)
    want = [1 - (50 + 50 * 0.1 / 0.2) / 100, 1 - 50 * 0.3 / 0.4 / 100]
    assert rows["random"]["per_seed"]["vs_baseline"] == pytest.approx(want)
    # R@1 at the checkpoints (NaN past the curve's end)
    at = rows["random"]["per_seed"]["r1_at"]
    assert at[0][:2] == pytest.approx([0.2, 0.4]) and all(v != v for v in at[0][2:])
    report = "\n".join(quality._baseline_tables(list(rows.values())))
    assert ("| stream | d | 0.300 / 0.100 (+0.200 ± 0.100) | 0.500 / 0.300 (+0.200 ± 0.000) "
            "| – | – |") in report
    assert "| stream | d | 0.300 | " in report  # the baseline's R@1 at the budget, then % saved


def test_cli_bench_quality_writes_report_json_and_curves(tmp_path, capsys):
    out = tmp_path / "rep"
    rc = main(["bench-quality", "--modes", "stream", "--seeds", "2", "--datasets", "synthetic",
               "--strategies", "random,default,entropy-0.7", "--budget", "60", "--jobs", "1",
               "--random-draws", "2", "--out-dir", str(out)])
    assert rc == 0
    progress = capsys.readouterr().out
    assert "[   8/8]" in progress and "eta" in progress  # progress line per run
    assert "random #1" in progress
    data = quality.read_results(out / "quality-results.json.gz")
    assert sorted((r["strategy"], r["seed"], r["draw"]) for r in data["runs"]) == [
        ("default", 0, 0), ("default", 1, 0), ("entropy-0.7", 0, 0), ("entropy-0.7", 1, 0),
        ("random", 0, 0), ("random", 0, 1), ("random", 1, 0), ("random", 1, 1)]
    draws = [r for r in data["runs"] if r["strategy"] == "random" and r["seed"] == 0]
    assert draws[0]["curve"] != draws[1]["curve"]  # independent draws on the same split
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
    paired = report.split("paired by seed")[1]
    assert "| default | synthetic |" in paired and "/2 |" in paired  # AUC wins over 2 seeds
    assert rows["default"]["per_seed"]["seed"] == [0, 1] and rows["random"]["draws"] == 2
    assert rows["random"]["per_seed"]["seed"] == [0, 1] and rows["default"]["draws"] == 1
    assert "2 random draws per seed" in report
    assert (out / "quality-stream.png").stat().st_size > 1000


def test_bench_quality_report_leads_with_the_real_datasets(tmp_path):
    from service.evaluation.datasets import QUALITY_REAL, REAL
    from service.evaluation.quality import DEFAULT_DATASETS, ordered

    assert DEFAULT_DATASETS[:len(QUALITY_REAL)] == QUALITY_REAL and set(QUALITY_REAL) <= set(REAL)
    assert ordered(["synthetic", "emoji-image-name", "digits"]) == [
        "emoji-image-name", "digits", "synthetic"]
    out = tmp_path / "rep"
    rc = main(["bench-quality", "--modes", "stream", "--seeds", "2",
               "--datasets", "synthetic,emoji-image-name", "--budget", "60", "--jobs", "1",
               "--strategies", "random,random-replicate,default", "--random-draws", "1",
               "--out-dir", str(out)])
    assert rc == 0
    report = (out / "quality.md").read_text()
    lead = report.index("## Real data (pretrained encoders) at a glance")
    assert lead < report.index("## stream mode")
    glance = report[lead:report.index("## stream mode")]
    assert "| stream | emoji-image-name | default |" in glance
    assert "| stream | emoji-image-name | random-replicate |" in glance
    assert "synthetic" not in glance  # the lead table holds the real sets only
    head = next(line for line in report.splitlines() if line.startswith("| strategy | "))
    assert head.index("emoji-image-name (real)") < head.index("synthetic")
    assert head.endswith("| mean real | mean all |")


def test_report_only_rebuilds_the_report_from_the_results_and_current_notes(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["bench-quality", "--modes", "stream", "--seeds", "2", "--datasets", "synthetic",
                 "--strategies", "random,default", "--budget", "40", "--jobs", "1",
                 "--random-draws", "1", "--out-dir", str(out)]) == 0
    first = (out / "quality.md").read_text()
    meta = quality.read_results(out / "quality-results.json.gz")["meta"]
    assert meta["seeds"] == 2 and meta["budget"] == 40 and meta["runs"] == 4
    (out / "quality-notes.md").write_text("## Findings\n\nwritten after the run\n")
    before = (out / "quality-results.json.gz").stat().st_mtime_ns
    (out / "quality-stream.png").unlink()
    assert main(["bench-quality", "--report-only", "--out-dir", str(out)]) == 0
    assert (out / "quality-stream.png").stat().st_size > 1000  # the figures are redrawn too
    again = (out / "quality.md").read_text()
    assert again.startswith(first.rstrip("\n")) and again.endswith("written after the run\n")
    assert (out / "quality-results.json.gz").stat().st_mtime_ns == before  # nothing was rerun
    assert main(["bench-quality", "--report-only", "--out-dir", str(tmp_path / "none")]) == 2
    assert "quality-results.json.gz not found" in capsys.readouterr().err


def test_rerun_replaces_one_strategy_and_keeps_the_other_runs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "rep"
    # budget 80: 30 picks after the 50 random warm-up ones
    assert main(["bench-quality", "--modes", "pool", "--seeds", "2", "--datasets", "synthetic",
                 "--strategies", "random,default", "--budget", "80", "--jobs", "1",
                 "--random-draws", "1", "--out-dir", str(out)]) == 0
    before = quality.read_results(out / "quality-results.json.gz")
    # the change being measured: the pool default becomes coreset (another pick rule); with
    # --jobs 1 the runs are made in this process, so they run it
    from service.core.pool.kcenter import CoresetStrategy
    from service.evaluation import simulator

    real = simulator._pool_strategies
    monkeypatch.setattr(simulator, "_pool_strategies", lambda: {**real(),
                                                                 "default": CoresetStrategy})
    assert main(["bench-quality", "--rerun", "pool:default", "--jobs", "1",
                 "--out-dir", str(out)]) == 0
    after = quality.read_results(out / "quality-results.json.gz")
    key = lambda r: (r["strategy"], r["seed"])  # noqa: E731
    old = {key(r): r["curve"] for r in before["runs"]}
    new = {key(r): r["curve"] for r in after["runs"]}
    assert set(old) == set(new)
    assert all(new[k] == old[k] for k in new if k[0] == "random")  # kept as they were
    assert any(new[k] != old[k] for k in new if k[0] == "default")  # re-run with the change
    report = (out / "quality.md").read_text()
    assert "Then `pairsieve " in report and "re-ran 2 of them" in report  # both commands
    assert main(["bench-quality", "--rerun", "stream:default", "--out-dir", str(out)]) == 2
    assert "has no stream runs of 'default'" in capsys.readouterr().err
    assert main(["bench-quality", "--rerun", "default", "--out-dir", str(out)]) == 2
    assert main(["bench-quality", "--rerun", "pool:random", "--out-dir", str(out)]) == 2
    assert "re-run the whole matrix instead" in capsys.readouterr().err


def test_orphan_check_adds_its_paired_table_and_survives_report_rebuilds(tmp_path, capsys,
                                                                        monkeypatch):
    out = tmp_path / "rep"
    assert main(["bench-quality", "--modes", "stream", "--seeds", "2", "--datasets", "synthetic",
                 "--strategies", "random,default", "--budget", "40", "--jobs", "1",
                 "--random-draws", "1", "--out-dir", str(out)]) == 0
    monkeypatch.setattr(quality, "ORPHAN_BUDGET", 60)  # small and fast; --jobs 1: in process
    assert main(["bench-quality", "--orphans", "--seeds", "3", "--jobs", "1",
                 "--out-dir", str(out)]) == 0
    meta = quality.read_results(out / "quality-results.json.gz")["meta"]
    runs = meta["orphans"]["runs"]
    assert sorted({(r["mode"], r["strategy"]) for r in runs}) == [
        ("pool", "default"), ("pool", "random"), ("stream", "default"), ("stream", "random")]
    assert len(runs) == 12 and all(0 <= r["no_match"] <= 60 for r in runs)
    assert any(r["no_match"] > 0 for r in runs)  # 20 % of the rows are orphans
    report = (out / "quality.md").read_text()
    section = report.split("## Orphan acquisitions (missing modality)")[1].split("##")[0]
    rows = [line for line in section.splitlines() if line.startswith(("| pool", "| stream"))]
    assert len(rows) == 2 and all(line.endswith("/3 |") for line in rows)
    assert main(["bench-quality", "--report-only", "--out-dir", str(out)]) == 0
    assert "## Orphan acquisitions" in (out / "quality.md").read_text()  # kept in the meta
    assert main(["bench-quality", "--orphans", "--out-dir", str(tmp_path / "none")]) == 2
    assert "quality-results.json.gz not found" in capsys.readouterr().err


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


def test_random_after_reaches_the_stream_runs_and_the_report_says_which(tmp_path, monkeypatch):
    """``--random-after`` sets the stream selector's random tail of every run (Job ->
    SimConfig), the results' meta records it and the header names it; a rerun records its own
    and the orphan check reuses the one its results were made with. Random's runs do not use
    the selector: the same with or without a tail."""
    from service.core.budget import TUNED_RANDOM_AFTER

    seen: list[float | None] = []
    real_run_job = quality._run_job
    monkeypatch.setattr(quality, "_run_job",
                        lambda job: seen.append(job.random_after) or real_run_job(job))
    runs, heads = {}, {}
    for flag in ([], ["--random-after", "off"]):
        out = tmp_path / ("off" if flag else "on")
        assert main(["bench-quality", "--modes", "stream", "--seeds", "1", "--datasets",
                     "synthetic", "--strategies", "random,default", "--budget", "60", "--jobs",
                     "1", "--random-draws", "1", "--out-dir", str(out), *flag]) == 0
        data = quality.read_results(out / "quality-results.json.gz")
        runs[bool(flag)] = {r["strategy"]: r["curve"] for r in data["runs"]}
        heads[bool(flag)] = (data["meta"]["random_after"],
                             (out / "quality.md").read_text().splitlines()[2])
    assert seen == [TUNED_RANDOM_AFTER] * 2 + [None] * 2
    assert heads[False][0] == TUNED_RANDOM_AFTER and "random tail after 0.333 of the budget" \
        in heads[False][1]
    assert heads[True][0] is None and "stream selector: no random tail" in heads[True][1]
    assert runs[False]["random"] == runs[True]["random"]
    seen.clear()
    out = tmp_path / "off"
    assert main(["bench-quality", "--rerun", "stream:default", "--random-after", "0.5",
                 "--jobs", "1", "--out-dir", str(out)]) == 0
    meta = quality.read_results(out / "quality-results.json.gz")["meta"]
    assert seen == [0.5] and meta["random_after"] == 0.5
    monkeypatch.setattr(quality, "ORPHAN_BUDGET", 60)
    seen.clear()
    assert main(["bench-quality", "--orphans", "--seeds", "1", "--jobs", "1",
                 "--out-dir", str(out)]) == 0
    assert seen == [0.5] * 4  # pool runs carry it too; only the stream selector reads it
