"""`pairsieve bench` (service/perfbench: perf, peers, fixtures) on tiny sizes: shapes, rows,
report."""

from __future__ import annotations

import builtins
import sys
import time
import types

import numpy as np
import pytest

from service.cli import build_parser
from service.perfbench import fixtures, peers, perf

D, SIZE = 96, 64  # pca_dim = k = 64 needs d >= 64


@pytest.fixture(scope="module")
def tiny_engine():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = perf.run_engine(dims=(D,), batches=(1, 8), sizes=(SIZE,), reps=3, target_s=0.02,
                              pool_items=256, log=lambda s: None)
    finally:
        torch.set_num_threads(old)
    return res


def test_reference_computes_the_same_shapes_as_the_selector():
    sel, stream = perf.engine_selector(D, SIZE, seed=0)
    fixtures.warm_selector(sel, stream.mixed, batch=32, extra_items=64)
    assert sel.status()["cache_fill"] == {m: 1.0 for m in sel.modalities}
    assert all(sel.scorer.index_fill(m) == SIZE for m in sel.modalities)
    k = sel.model.dim_out
    typ_k = perf.reference_typicality_k(sel)
    assert typ_k == sel.config.acquisition.typicality_k > 0  # the default weighs typicality
    ref = perf.MatmulReference(D, k, sel.scorer.index_size, sel.caches[sel.modalities[0]].capacity,
                               sel.scorer.tau, typicality_k=typ_k)
    for b in (1, 8):
        assert ref.shapes(b) == perf.selector_shapes(sel, b)
        assert set(ref.shapes(b)) == {"embed", "min_distance", "similarities", "typicality"}
        x, is_b = stream.mixed(b)
        z, mind, probs, typ = ref(x)
        assert z.shape == (b, k) and mind.shape == (b,) and probs.shape == (b, SIZE)
        assert np.allclose(probs.sum(dim=1).numpy(), 1.0, atol=1e-4)
        # typicality = mean of the typ_k best cosines to the own index
        want = np.sort((z @ ref.own_index.T).numpy(), axis=1)[:, -typ_k:].mean(axis=1)
        np.testing.assert_allclose(typ, want, atol=1e-6)
        # what the selector computes on the same rows: (b_m, k) embeddings against (C, k) / (K, k)
        for m in sel.modalities:
            assert tuple(sel.scorer.embed(m, x).shape) == (b, k)
            assert tuple(sel.caches[m].embeddings.shape) == (SIZE, k)
        prop = sel.propose(fixtures.items_from(x, is_b, sel.modalities))
        assert len(prop.decisions) == b
    assert ref.flops_per_item() == 2 * (D * k + k * SIZE + 2 * k * SIZE)
    plain = perf.MatmulReference(D, k, SIZE, SIZE)  # without typicality: three matmuls
    assert plain(x)[3] is None and "typicality" not in plain.shapes(8)
    assert plain.flops_per_item() == 2 * (D * k + k * SIZE + k * SIZE)
    with pytest.raises(ValueError, match="typicality_k must be >= 0, got -1"):
        perf.MatmulReference(D, k, SIZE, SIZE, typicality_k=-1)


def test_tiny_grid_returns_one_row_per_cell(tiny_engine):
    rows = tiny_engine["rows"]
    assert [(r["d"], r["batch"], r["K"], r["C"]) for r in rows] == [(D, 1, SIZE, SIZE),
                                                                    (D, 8, SIZE, SIZE)]
    for r in rows:
        assert r["selector"]["median"] > 0 and r["reference"]["median"] > 0
        assert r["share"]["n"] == 3
        assert 0 < r["share"]["min"] <= r["share"]["median"] <= r["share"]["max"]
        assert r["cache_fill"] == 1.0
    assert tiny_engine["peak"]["median"] > 0


def test_report_renders_every_section_header(tiny_engine, monkeypatch):
    monkeypatch.setattr(perf, "_load_e2e", lambda: None)
    res = {"machine": fixtures.machine_info(), "sections": list(perf.SECTIONS), "quick": True,
           "errors": {"stream": "RuntimeError: boom"}, "engine": tiny_engine,
           "kafka": perf.run_e2e("kafka", True, log=lambda s: None),
           "grpc": {"table_md": "| rps |\n|---|\n| 1 |", "notes": "fake"}}
    text = perf.render(res, "pairsieve bench --quick")
    for title in perf.SECTION_TITLES.values():
        assert f"\n## {title}\n" in text
    assert "does not exist yet" in text            # kafka skipped with a note
    assert "| rps |" in text and "fake" in text     # grpc table from the e2e dict
    assert "**FAILED**" in text and "boom" in text  # a failed section is shown, not dropped
    assert "Not run in this invocation" in text     # peers / profile absent
    assert "pairsieve bench --quick" in text and "torch.set_num_threads(1)" in text


def test_engine_targets_are_read_per_micro_batch_as_the_issue_states(tiny_engine):
    # issue 16: >= 80 % of the reference at B = 256, >= 50 % at B = 32 (not one rule for both)
    def row(b, size, share):
        r = dict(tiny_engine["rows"][0], batch=b, K=size, C=size)
        r["share"] = {"median": share, "min": share, "max": share, "n": 1}
        return r
    e = dict(tiny_engine, rows=[row(32, 1024, 0.55), row(32, 4096, 0.45), row(256, 1024, 0.79),
                                row(256, 4096, 0.81)])
    text = "\n".join(perf._render_engine(e))
    assert ("**Target (share >= 80% of the reference at B = 256): 1 of 2 cells meet it.** "
            f"Below: d={D} K=C=1024 (0.79).") in text
    assert ("**Target (share >= 50% of the reference at B = 32): 1 of 2 cells meet it.** "
            f"Below: d={D} K=C=4096 (0.45).") in text
    assert "typicality" in text  # the reference does the default's typicality too
    text = "\n".join(perf._render_engine(dict(e, rows=e["rows"][:2])))
    assert "No cell with B = 256 in this grid; its target is not evaluated." in text


def test_e2e_module_functions_are_called_when_present(monkeypatch):
    fake = types.ModuleType("service.perfbench.e2e")
    fake.run_kafka = lambda quick: {"table_md": f"kafka quick={quick}"}
    monkeypatch.setitem(sys.modules, "service.perfbench.e2e", fake)
    assert perf.run_e2e("kafka", True, log=lambda s: None) == {"table_md": "kafka quick=True"}
    assert "skipped" in perf.run_e2e("grpc", True, log=lambda s: None)


def test_peers_report_not_runnable_rows_when_an_import_fails(monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")  # peers.run sets it; restore afterwards
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "skactiveml" or name.startswith("skactiveml."):
            raise ImportError(f"No module named {name!r} (simulated)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    shared: dict = {}
    rows_in = [peers._Pairsieve(shared, 32, size=SIZE, warm_items=64),
               peers._SkalVariableUncertainty(), peers._SkalDensity(256)]
    res = peers.run(n_items=256, d=D, reps=1, cap_s=0.05, peers=rows_in, log=lambda s: None)
    by_key = {r["key"]: r for r in res["rows"]}
    assert by_key["pairsieve-b32"]["runnable"]
    assert by_key["pairsieve-b32"]["items_per_s"]["median"] > 0
    for key in ("skactiveml-vu", "skactiveml-dbal-b256"):
        assert not by_key[key]["runnable"]
        assert by_key[key]["reason"].startswith("not runnable")
        assert "simulated" in by_key[key]["reason"]
    text = "\n".join(peers.render(res))
    assert text.count("not runnable") >= 2
    assert not res["verdict"]["evaluated"]  # no diversity peer ran (and no B=256 pairsieve row)


def test_peer_failing_at_run_time_is_a_row_too(monkeypatch):
    monkeypatch.setenv("NUMBA_NUM_THREADS", "1")
    class Broken(peers.Peer):
        key, label, dist = "broken", "broken peer", "nonexistent-dist"

        def process(self, lo, hi):
            raise RuntimeError("kaput")

    res = peers.run(n_items=64, d=D, reps=2, cap_s=0.05, peers=[Broken()], log=lambda s: None)
    row = res["rows"][0]
    assert not row["runnable"] and row["reason"] == "not runnable: RuntimeError: kaput"


def test_cli_bench_arguments():
    args = build_parser().parse_args(["bench", "--quick", "--sections", "engine,peers",
                                      "--out", "x.md", "--dims", "64,128"])
    assert args.quick and args.sections == "engine,peers" and args.out == "x.md"
    assert args.func.__name__ == "_cmd_bench"
    assert perf.parse_sections("peers,engine") == ("engine", "peers")
    with pytest.raises(ValueError, match="unknown bench section"):
        perf.parse_sections("engine,nope")


def test_decision_parity_of_two_identical_devices_is_exact():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        par = perf.decision_parity(("cpu", "cpu"), d=D, size=SIZE, batch=32, n_batches=4,
                                   warm_items=64)
    finally:
        torch.set_num_threads(old)
    assert par["n_decisions"] == 4 * 32
    assert par["agreement"] == 1.0 and par["n_disagree"] == 0
    assert par["first_divergence_batch"] is None and par["max_abs_utility_diff"] == 0.0
    assert par["accepts"][0] == par["accepts"][1] > 0  # the stream accepts something


def test_gpu_section_without_cuda_is_a_note_not_an_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = {"machine": fixtures.machine_info(), "sections": ["gpu"], "quick": True, "errors": {},
           "gpu": perf.run_gpu(True, log=lambda s: None)}
    text = perf.render(res, "pairsieve bench --sections gpu")
    assert "## 7. GPU" in text and "no CUDA device" in text and "**FAILED**" not in text


def test_gpu_report_states_target_and_parity_verdicts(tiny_engine):
    eng = {**tiny_engine, "device": "cuda",
           "rows": [{**tiny_engine["rows"][-1], "K": 16384, "C": 16384,
                     "selector": {"median": 612_000.0, "min": 600_000.0, "max": 620_000.0}}]}
    par = {"devices": ["cpu", "cuda:0"], "d": 512, "K": 16384, "batch": 256, "n_batches": 40,
           "n_decisions": 10240, "agreement": 0.985, "accepts": [1020, 1031],
           "median_abs_utility_diff": 1e-7, "max_abs_utility_diff": 3e-6,
           "first_divergence_batch": 7}
    text = "\n".join(perf._render_gpu({"device_name": "NVIDIA H200", "engine": eng,
                                       "parity": par}))
    assert "NVIDIA H200" in text and "612,000 items/s" in text
    assert "meets the 500,000 items/s target" in text
    assert "98.50%" in text and "does NOT meet the 99% tolerance" in text


def test_write_report_appends_the_notes_beside_it(tmp_path, tiny_engine):
    res = {"machine": fixtures.machine_info(), "sections": ["engine"], "quick": True, "errors": {},
           "engine": tiny_engine}
    plain = perf.write_report(res, tmp_path / "perf.md", "cmd").read_text()
    (tmp_path / "perf-notes.md").write_text("## Findings and limits\n\nhand-written\n")
    with_notes = perf.write_report(res, tmp_path / "perf.md", "cmd").read_text()
    assert with_notes == plain + "\n## Findings and limits\n\nhand-written\n"


def _kafka_res(ceiling, faust_rate, single, batched, le_100ms):
    """A :func:`e2e._kafka` result whose three rounds read ``batched`` and ``single`` events/s
    against ``ceiling`` times 1.05, 1.0 and 0.9 (so the middle round is every median), with
    ``le_100ms`` (and 90 ms p99) in the middle round."""
    from service.perfbench import e2e

    step = {"phase": "1000/s", "produced_per_s": 1000.0, "decided_per_s": 990.0, "kept_up": True}
    run = lambda best: {"sustained_max_per_s": best, "sustained_max_step": "x",  # noqa: E731
                        "highest_rate_kept_up": best, "steps": [step]}
    floor = {f"fetch_max_wait_{w}ms": {"p50_ms": 1.0, "p99_ms": 2.0} for w in (1500, 50, 10)}
    rounds = []
    for f, le, p99 in ((1.05, le_100ms - 0.01, 95.0), (1.0, le_100ms, 90.0),
                       (0.9, min(1.0, le_100ms + 0.004), 80.0)):
        half = {k: None for k in e2e.HALF_LOAD_KEYS}
        half.update(service_le_100ms=le, service_p99_ms=p99, service_p50_ms=p99 / 2)
        rounds.append({"ceiling_items_per_s": ceiling * f, "batch_events_per_s": batched,
                       "batch_share": batched / (ceiling * f), "single_events_per_s": single,
                       "batch_while_producing_per_s": 0.5 * batched,
                       "single_while_producing_per_s": 0.5 * single, "half_load": half})
    rr = e2e.rounds_summary(rounds, 8000.0, 4000.0, batched / 2)
    return {"compute_ceiling": {"items_per_s": ceiling}, "rounds": rr,
            "params": {"target_step_s": 5.0, "half_s": 6.0},
            "faust_ceiling": {"events_per_s": faust_rate, "complete": True},
            "single_events": run(single), "one_worker": run(batched), "two_workers": run(batched),
            "raw_consume": {"events_per_s": 1e5, "mb_per_s": 100.0},
            "broker_fetch_floor": floor}


def test_kafka_targets_are_the_issues_three_read_from_the_rounds_medians():
    from service.perfbench import e2e

    # single-event records against min(round's ceiling, faust's ceiling); batches against the
    # round's ceiling; the p99 from the half-load steps; medians over the rounds
    t = e2e.kafka_targets(_kafka_res(ceiling=6000, faust_rate=3000, single=2200, batched=4900,
                                     le_100ms=0.995))
    assert t["single_bound_per_s"] == 3000 and t["single_bound_is"] == "faust's per-event ceiling"
    assert t["single_met"] and abs(t["single_ratio"] - 2200 / 3000) < 1e-12
    assert t["batch_met"] and abs(t["batch_ratio"] - 4900 / 6000) < 1e-12
    assert abs(t["batch_ratio_min"] - 4900 / 6300) < 1e-12 and t["rounds"] == 3
    assert t["p99_met"] and t["p99_target_ms"] == 100.0 and t["p99_at_half_ms"] == 90.0
    assert (t["p99_at_half_min_ms"], t["p99_at_half_max_ms"]) == (80.0, 95.0)
    t = e2e.kafka_targets(_kafka_res(ceiling=6000, faust_rate=9000, single=4100, batched=4700,
                                     le_100ms=0.98))
    assert t["single_bound_is"] == "compute ceiling" and not t["single_met"]  # 4100 < 4200
    assert not t["batch_met"] and not t["p99_met"]  # 4700 < 4800; 98 % within 100 ms
    # the stepped maxima over the first ceiling are kept beside the rounds, and do not decide
    res = _kafka_res(ceiling=6000, faust_rate=3000, single=2200, batched=4700, le_100ms=0.995)
    res["one_worker"]["sustained_max_per_s"] = 5900.0
    t = e2e.kafka_targets(res)
    assert not t["batch_met"] and abs(t["batch_ratio_stepped"] - 5900 / 6000) < 1e-12
    res = _kafka_res(6000, 3000, 2200, 4900, 0.995)
    res["targets"] = e2e.kafka_targets(res)
    text = e2e._kafka_table(res)
    assert ("target: single-event records >= 70% of min(compute ceiling, faust's per-event "
            "ceiling) = 2,100/s (rounds' median ceiling) | MET (median 73%, 73%–73%, of the "
            "faust's per-event ceiling; median 2,200 events/s working off a backlog, 1,100/s "
            "while 4,000/s were produced") in text
    assert ("target: FeatureBatch records >= 80% of the compute ceiling = 4,800/s (rounds' "
            "median ceiling) | MET (median 82%, 78%–91%; median 4,900 events/s working off a "
            "backlog, 2,450/s while 8,000/s were produced; the stepped maximum over the first "
            "ceiling: 82%)") in text
    assert ("target: p99 <= 100 ms at half load | MET (share decided within 100 ms, median: "
            "0.995)") in text
    assert "| 2 | 6,000 | 4,900 (82%) | 2,450 | 45.0 / 90.0 | 0.995 | 2,200 | 1,100 |" in text
    assert "One worker, stepped load, single-event records" in text


def test_kafka_rounds_offer_more_than_the_stepped_maximum_and_half_of_it():
    from service.perfbench import e2e

    # a throughput step is offered the best step's rate, or twice the maximum when that is more
    steps = [{"phase": "2000/s", "produced_per_s": 1999.0}, {"phase": "8000/s",
                                                             "produced_per_s": 8001.0}]
    one = {"sustained_max_per_s": 2835.0, "sustained_max_step": "8000/s", "steps": steps}
    assert e2e.kafka_target_rate(one) == 8000.0
    assert e2e.half_load_rate(one) == 1420.0
    one = {"sustained_max_per_s": 1990.0, "sustained_max_step": "2000/s", "steps": steps}
    assert e2e.kafka_target_rate(one) == 4000.0
    # the drain rate of a step; the rate while producing when there was no backlog to drain
    assert e2e._drain_per_s({"drain": {"events_per_s": 3000.0}, "sustained_per_s": 2000.0}) \
        == 3000.0
    assert e2e._drain_per_s({"drain": None, "sustained_per_s": 2000.0}) == 2000.0
    assert e2e._med([None, 3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert e2e._med([None]) == {"median": None, "min": None, "max": None}


def test_drain_rate_reads_only_the_window_the_worker_was_busy_after_the_producer_stopped():
    from service.perfbench.loadgen import drain_rate

    # producer stops at t = 10; the worker decides 1,000/s until the backlog is gone at t = 14
    def at(t, decided):
        return {"t": t, "decided": decided}

    scrapes = [at(8.0, 100), at(9.5, 1500), at(10.2, 2000), at(11.2, 3000), at(12.2, 4000),
               at(13.2, 5000), at(14.2, 5800), at(14.7, 5800), at(15.2, 5800)]
    got = drain_rate(scrapes, 10.0)
    # from the first scrape after the stop (10.2) to the last one below the final count (13.2):
    # the scrape at 14.2 already holds the final count, so the worker may have idled before it
    assert got == {"events": 3000, "seconds": 3.0, "events_per_s": 1000.0, "backlog_events": 3800}
    assert drain_rate(scrapes, 13.0) is None  # 13.2 -> 13.2: no window
    assert drain_rate(scrapes, 12.0, min_seconds=2.0) is None  # 12.2 -> 13.2: too short
    assert drain_rate([at(9.0, 10), at(11.0, 10)], 10.0) is None  # nothing left to work off
    assert drain_rate([], 10.0) is None


def test_cpu_meter_splits_cpu_time_between_worker_driver_and_broker():
    import os
    import subprocess

    from service.perfbench import e2e

    # a stand-in broker: a child process that burns CPU until stopped
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        meter = e2e.CpuMeter(burner.pid)
        subprocess.run([sys.executable, "-c", "sum(range(3_000_000))"], check=True)  # "driver"
        t = time.perf_counter()
        while time.perf_counter() - t < 0.3:  # "worker": this process
            sum(range(1000))
        got = meter.stop()
    finally:
        burner.kill()
        burner.wait()
    assert got["wall_s"] > 0.3 and got["worker_cpu_s"] > 0.1
    assert got["driver_cpu_s"] > 0 and got["broker_cpu_s"] > 0
    assert got["cores_busy"] == pytest.approx(
        (got["worker_cpu_s"] + got["driver_cpu_s"] + got["broker_cpu_s"]) / got["wall_s"])
    assert e2e.proc_cpu_seconds(None) == 0.0 and e2e.proc_cpu_seconds(burner.pid) == 0.0  # gone
    assert e2e.proc_cpu_seconds(os.getpid()) > 0
