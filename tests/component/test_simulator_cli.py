"""Component tests: the offline simulator (``service.evaluation.simulator``) and the
``pairsieve`` CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from service.alignment import TrainerConfig
from service.cli import build_parser, main
from service.core.budget import TUNED_RANDOM_AFTER
from service.core.pool import STRATEGIES as POOL_REGISTRY
from service.core.pool.base import PoolState
from service.core.pool.random import RandomStrategy
from service.evaluation import simulator as sim_mod
from service.evaluation.datasets import BUILTIN, load_npz, make_synthetic
from service.evaluation.simulator import SimConfig, list_strategies, simulate
from service.settings import Settings

SMALL = dict(budget=60, round_size=20, warmup=20, retrain_every=20, test_size=50)
CASES = [(s, m) for m in ("pool", "stream") for s in ("random", "default")]




@pytest.fixture(scope="module")
def tiny():
    return make_synthetic(n=300, d_a=16, d_b=12, latent_dim=8, seed=0)


@pytest.fixture(scope="module")
def tiny_missing():
    return make_synthetic(n=300, d_a=16, d_b=12, latent_dim=8, missing_rate=0.3, seed=0)


@pytest.fixture(scope="module")
def results(tiny):
    return {(s, m): simulate(tiny, SimConfig(strategy=s, mode=m, **SMALL)) for s, m in CASES}


def check_contract(res: dict, *, strategy: str, mode: str, seed: int, budget: int) -> None:
    assert res["strategy"] == strategy and res["mode"] == mode
    assert res["seed"] == seed and res["budget"] == budget
    curve = res["curve"]
    assert isinstance(curve, list) and curve
    for p in curve:
        assert type(p["pairs"]) is int
        for key in ("r1", "r5"):
            assert isinstance(p[key], float) and 0.0 <= p[key] <= 1.0
        assert p["r5"] >= p["r1"]
    pairs = [p["pairs"] for p in curve]
    assert all(x <= y for x, y in zip(pairs, pairs[1:], strict=False)), pairs  # pairwise
    assert pairs[-1] <= budget


# --- simulate: result format -------------------------------------------------------------


@pytest.mark.parametrize("strategy,mode", CASES)
def test_result_follows_contract(results, strategy, mode):
    res = results[(strategy, mode)]
    check_contract(res, strategy=strategy, mode=mode, seed=0, budget=60)
    final = res["curve"][-1]["pairs"]
    if mode == "pool":
        assert final == 60
    assert sum(res["acquisitions_per_modality"].values()) == final
    assert set(res["acquisitions_per_modality"]) == {"a", "b"}
    assert res["unique_pairs"] + res["no_match"] + res["wasted"] == final
    assert res["test_size"] == 50 and res["pool_rows"] == 250
    assert json.loads(json.dumps(res)) == res  # JSON-serialisable as is


@pytest.mark.parametrize("strategy,mode", CASES)
def test_learning_happens(results, strategy, mode):
    curve = results[(strategy, mode)]["curve"]
    # 50 held-out pairs: chance R@1 is 0.02; ~60 pairs on the easy synthetic set do much better.
    assert curve[-1]["r1"] > 0.15


# --- simulate: determinism ---------------------------------------------------------------


@pytest.mark.parametrize("strategy,mode", CASES)
def test_same_config_same_result(tiny, results, strategy, mode):
    again = simulate(tiny, SimConfig(strategy=strategy, mode=mode, **SMALL))
    first = results[(strategy, mode)]
    assert again["curve"] == first["curve"]

    def drop(r):  # timings differ run to run; the counts in the cost trace must not
        out = {k: v for k, v in r.items() if k not in ("wall_seconds", "cost")}
        out["cost"] = [(c["pairs"], c["offered"]) for c in r["cost"]]
        return out

    assert drop(again) == drop(first)


def test_other_seed_other_result(tiny, results):
    other = simulate(tiny, SimConfig(strategy="random", mode="pool", seed=1, **SMALL))
    assert other["curve"] != results[("random", "pool")]["curve"]


def test_warmup_shared_across_strategies(results):
    # Same seed: same test split and same random warm-up, so the first point (after warm-up,
    # before any strategy acted) is identical.
    first_random = results[("random", "pool")]["curve"][0]
    first_default = results[("default", "pool")]["curve"][0]
    assert first_random == first_default
    assert first_random["pairs"] == SMALL["warmup"]


# --- simulate: the strategy never sees the pairing ---------------------------------------


class Recorder:
    """A random strategy that keeps a copy of every PoolState it is shown."""

    name = "recorder"

    def __init__(self):
        self.rounds: list[dict] = []
        self._inner = RandomStrategy()

    def select(self, state: PoolState, budget, rng):
        picks = self._inner.select(state, budget, rng)
        self.rounds.append({
            "fields": {f.name for f in dataclasses.fields(state)},
            "raw": {m: state.raw[m].copy() for m in state.modalities},
            "embedded": {m: state.embedded[m].shape for m in state.modalities},
            "selected": {m: state.selected[m].shape for m in state.modalities},
            "acquired": dict(state.acquired_per_modality),
            "picks": list(picks),
        })
        return picks


@pytest.fixture
def recorded(tiny, monkeypatch):
    rec = Recorder()
    monkeypatch.setitem(POOL_REGISTRY, "recorder", lambda: rec)
    test_sets = []
    real_recall = sim_mod.retrieval_recall

    def spy(model, xa, xb, ks=(1, 5)):
        test_sets.append(np.asarray(xa).copy())
        return real_recall(model, xa, xb, ks)

    monkeypatch.setattr(sim_mod, "retrieval_recall", spy)
    res = simulate(tiny, SimConfig(strategy="recorder", mode="pool", budget=80, round_size=20,
                                   warmup=20, test_size=50))
    return rec, res, test_sets


def _row_ids(x: np.ndarray, lookup: dict[bytes, int]) -> list[int]:
    return [lookup[r.tobytes()] for r in x]


def test_strategy_sees_only_open_pool_items(tiny, recorded):
    rec, res, test_sets = recorded
    assert len(rec.rounds) == 3  # (80 - 20 warm-up) / 20
    look_a = {r.tobytes(): i for i, r in enumerate(tiny.a)}
    look_b = {r.tobytes(): i for i, r in enumerate(tiny.b)}
    assert len(look_a) == len(look_b) == tiny.n  # rows are distinct, so lookup is exact
    test_rows = set(_row_ids(test_sets[0], look_a))
    assert len(test_rows) == 50
    assert all(np.array_equal(t, test_sets[0]) for t in test_sets)  # one fixed test split
    for i, rnd in enumerate(rec.rounds):
        assert rnd["fields"] == {"modalities", "raw", "embedded", "selected", "model",
                                 "acquired_per_modality"}
        ids = {"a": _row_ids(rnd["raw"]["a"], look_a), "b": _row_ids(rnd["raw"]["b"], look_b)}
        revealed = res["curve"][i]["unique_pairs"]  # pairs known when this round started
        for m in ("a", "b"):
            assert len(set(ids[m])) == len(ids[m])  # no duplicates
            assert not set(ids[m]) & test_rows  # held-out pairs are never candidates
            # fully paired data: each revealed pair closed one item of each modality
            assert len(ids[m]) == res["pool_rows"] - revealed
            dim = TrainerConfig().dim_out
            assert rnd["embedded"][m] == (len(ids[m]), dim)
            assert rnd["selected"][m] == (revealed, dim)
        assert sum(rnd["acquired"].values()) == res["curve"][i]["pairs"]
        if i + 1 < len(rec.rounds):
            nxt = rec.rounds[i + 1]
            nxt_ids = {"a": set(_row_ids(nxt["raw"]["a"], look_a)),
                       "b": set(_row_ids(nxt["raw"]["b"], look_b))}
            for m, j in rnd["picks"]:
                row = ids[m][j]
                # the picked item and (the pairing being revealed) its partner are gone
                assert row not in nxt_ids["a"] and row not in nxt_ids["b"]


def test_candidate_order_does_not_reveal_pairing(tiny, recorded):
    rec, _, _ = recorded
    look_a = {r.tobytes(): i for i, r in enumerate(tiny.a)}
    look_b = {r.tobytes(): i for i, r in enumerate(tiny.b)}
    rnd = rec.rounds[0]
    ids_a = np.array(_row_ids(rnd["raw"]["a"], look_a))
    ids_b = np.array(_row_ids(rnd["raw"]["b"], look_b))
    aligned = np.mean(ids_a == ids_b)  # row i of a and row i of b are partners in `tiny`
    # independent orders would give ~1/230; allow a generous margin
    assert aligned < 0.1


# --- simulate: missing modality ----------------------------------------------------------


@pytest.mark.parametrize("strategy,mode", CASES)
def test_missing_modality_accounting(tiny_missing, strategy, mode):
    res = simulate(tiny_missing, SimConfig(strategy=strategy, mode=mode, **SMALL))
    final = res["curve"][-1]["pairs"]
    assert res["no_match"] > 0
    assert res["unique_pairs"] + res["no_match"] + res["wasted"] == final
    assert res["curve"][-1]["unique_pairs"] == res["unique_pairs"]
    assert sum(res["acquisitions_per_modality"].values()) == final <= 60


# --- SimConfig / simulate errors ---------------------------------------------------------


def test_unknown_strategy_lists_known_names():
    with pytest.raises(ValueError,
                       match=r"unknown pool strategy 'nope'; known: \[.*'default'.*'random'"):
        SimConfig(strategy="nope", mode="pool")
    with pytest.raises(ValueError, match=r"unknown stream strategy 'coreset'; known: \["):
        SimConfig(strategy="coreset", mode="stream")  # a pool-only name


def test_bad_mode():
    with pytest.raises(ValueError, match=r"mode must be one of \('pool', 'stream'\), got 'batch'"):
        SimConfig(mode="batch")


@pytest.mark.parametrize("field,value", [("budget", 0), ("round_size", 0), ("test_size", 0)])
def test_bad_sizes(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be >= 1, got {value}"):
        SimConfig(**{field: value})
    with pytest.raises(ValueError, match="warmup must be >= 0, got -1"):
        SimConfig(warmup=-1)


def test_budget_larger_than_pool(tiny):
    with pytest.raises(ValueError, match=r"budget 251 exceeds the pool of 250 rows"):
        simulate(tiny, SimConfig(**{**SMALL, "budget": 251}))


def test_too_few_pairs_for_test_split():
    ds = make_synthetic(n=30, d_a=4, d_b=3, latent_dim=2, seed=0)
    with pytest.raises(ValueError, match=r"too few paired rows \(30\) for a test split"):
        simulate(ds, SimConfig(**{**SMALL, "budget": 5}))


def test_list_strategies_has_baselines():
    names = list_strategies()
    assert set(names) == {"pool", "stream"}
    for mode in names:
        assert {"random", "default"} <= set(names[mode])
        assert names[mode] == sorted(names[mode])


@pytest.mark.parametrize("budget", [7, 60, 200])
def test_stream_random_spends_exactly_the_budget(budget):
    # selection sampling: a fixed acceptance probability used to end runs up to 20 % short
    ds = make_synthetic(n=400, d_a=8, d_b=6, latent_dim=4, seed=1)
    for seed in range(3):
        res = simulate(ds, SimConfig(**{**SMALL, "budget": budget, "mode": "stream",
                                        "strategy": "random", "seed": seed}))
        assert res["curve"][-1]["pairs"] == budget
        assert sum(res["acquisitions_per_modality"].values()) == budget
        assert res["wasted"] == 0  # an item whose partner was acquired is never offered


def test_stream_default_is_what_a_deployment_runs():
    # the benchmark's stream `default` must measure the service's own selector settings
    from service.core.budget import BudgetConfig
    from service.runtime import build_engine
    from service.settings import Settings

    bench = sim_mod._stream_configs()["default"](BudgetConfig(total=10, target_rate=0.1))
    handler = build_engine(Settings())
    try:
        svc = handler.selector.config
    finally:
        handler.close()
    assert bench.uncertainty == svc.uncertainty == "least_confidence"
    assert bench.acquisition == svc.acquisition
    assert (bench.tau, bench.index_size, bench.cache_capacity, bench.cross_insert,
            bench.cache_on_model_change) == (svc.tau, svc.index_size, svc.cache_capacity,
                                             svc.cross_insert, svc.cache_on_model_change)


def test_stream_default_equals_what_default_settings_build():
    # Field by field: the config the service builds from default Settings is the simulator's
    # stream `default` except what the deployment sets: the budget total and target rate (the
    # simulator sets them from its budget and stream length) and the threshold window (the
    # simulator sizes it to its short streams: 1024).
    from dataclasses import asdict

    s, sim = Settings(), SimConfig(mode="stream")
    bench = sim_mod._stream_configs()["default"](sim_mod._stream_budget(sim, rate=0.13))
    svc = s.selector_config()
    deployment = {"total", "target_rate", "window"}
    b_bench, b_svc = asdict(bench.budget), asdict(svc.budget)
    assert {k: v for k, v in b_bench.items() if k not in deployment} == \
        {k: v for k, v in b_svc.items() if k not in deployment}
    assert (b_svc["total"], b_svc["target_rate"], b_svc["window"]) == (None, 0.05, 2048)
    assert bench.acquisition == svc.acquisition
    assert {k: v for k, v in asdict(bench).items() if k != "budget"} == \
        {k: v for k, v in asdict(svc).items() if k != "budget"}
    # the learner and its schedule: the model the service trains is the one benchmarked
    assert s.trainer_config() == sim.trainer
    assert s.retrain_every_pairs == sim.retrain_every
    assert (s.warmup_accepts, s.explore_fraction) == (sim.warmup, sim.explore)
    assert b_svc["random_after"] == b_bench["random_after"] == TUNED_RANDOM_AFTER


# --- CLI ---------------------------------------------------------------------------------


def test_cli_simulate_list(capsys):
    assert main(["simulate", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    parsed = dict(line.split(": ", 1) for line in out)
    assert set(parsed) == {"pool", "stream"}
    for mode, names in list_strategies().items():
        assert parsed[mode].split() == names
        assert "random" in names and "default" in names


@pytest.mark.slow
def test_cli_datasets_list(capsys):
    assert main(["datasets", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(BUILTIN)


@pytest.mark.slow
def test_cli_export_then_simulate(tmp_path, capsys):
    npz = tmp_path / "tmp.npz"
    assert main(["datasets", "export", "synthetic", "--out", str(npz)]) == 0
    assert f"wrote {npz}: 2000 rows" in capsys.readouterr().out
    assert load_npz(npz).n == 2000
    out = tmp_path / "res" / "res.json"
    argv = ["simulate", "--data", str(npz), "--strategy", "random", "--mode", "pool",
            "--budget", "40", "--seed", "1", "--out", str(out), "--quiet", "--test-size", "50",
            "--round-size", "20", "--warmup", "20"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # --quiet: no progress lines
    assert f"wrote {out}: random/pool on tmp, 40 acquisitions" in captured.out
    res = json.loads(out.read_text())
    check_contract(res, strategy="random", mode="pool", seed=1, budget=40)
    assert res["dataset"] == "tmp"
    assert res["curve"][-1]["pairs"] == 40
    assert [p["pairs"] for p in res["curve"]] == [20, 40]


def test_cli_simulate_to_stdout_with_progress(tmp_path, tiny, capsys):
    npz = tmp_path / "tiny.npz"
    tiny.to_npz(npz)
    argv = ["simulate", "--data", str(npz), "--strategy", "random", "--mode", "stream",
            "--budget", "40", "--test-size", "50", "--warmup", "20", "--retrain-every", "20"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    check_contract(json.loads(captured.out), strategy="random", mode="stream", seed=0, budget=40)
    argv[4] = "default"
    assert main(argv) == 0
    captured = capsys.readouterr()
    check_contract(json.loads(captured.out), strategy="default", mode="stream", seed=0, budget=40)
    assert "default/stream seed 0: " in captured.err  # progress lines without --quiet


def test_cli_unknown_strategy_returns_2(tmp_path, tiny, capsys):
    npz = tmp_path / "tiny.npz"
    tiny.to_npz(npz)
    assert main(["simulate", "--data", str(npz), "--strategy", "nope", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "pairsieve: error: unknown pool strategy 'nope'" in captured.err
    assert captured.out == ""


def test_cli_malformed_npz_returns_2(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, a=np.zeros((5, 3), np.float32), b=np.zeros((4, 3), np.float32))
    assert main(["simulate", "--data", str(bad), "--strategy", "random", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pairsieve: error:" in err and "a has 5 rows but b has 4" in err


def test_cli_simulate_needs_data():
    with pytest.raises(SystemExit, match="give --data FILE.npz or --dataset NAME"):
        main(["simulate"])


def test_cli_simulate_plot_writes_png_beside_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["simulate", "--dataset", "emoji-image-name", "--mode", "stream", "--order",
                 "dataset", "--budget", "40", "--test-size", "100", "--out", str(out), "--plot",
                 "--quiet"]) == 0
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    result = json.loads(out.read_text())
    assert result["dataset"] == "emoji-image-name" and result["curve"][-1]["pairs"] >= 30
    assert f"wrote {png}" in capsys.readouterr().out


def test_cli_simulate_plot_needs_out():
    with pytest.raises(SystemExit, match="--plot writes beside --out"):
        main(["simulate", "--dataset", "synthetic", "--plot", "--quiet"])


def test_dataset_order_stream_follows_rows(tiny):
    """stream_order='dataset' offers rows in dataset order (within 64-item windows)."""
    cfg = SimConfig(strategy="random", mode="stream", budget=20, seed=3, test_size=20,
                    stream_order="dataset")
    assert simulate(tiny, cfg)["curve"][-1]["pairs"] == 20
    with pytest.raises(ValueError, match="stream_order must be 'shuffled' or 'dataset'"):
        SimConfig(stream_order="books")


def test_cli_simulate_learner_and_embedding_dim(tmp_path):
    out = tmp_path / "ridge.json"
    assert main(["simulate", "--dataset", "bible-en-es", "--strategy", "random", "--budget", "150",
                 "--seed", "100", "--learner", "ridge", "--embedding-dim", "64", "--quiet",
                 "--out", str(out)]) == 0
    ridge = json.loads(out.read_text())
    assert ridge["learner"] == "ridge" and ridge["embedding_dim"] == 64
    assert main(["simulate", "--dataset", "bible-en-es", "--strategy", "random", "--budget", "150",
                 "--seed", "100", "--learner", "cca", "--embedding-dim", "32", "--quiet",
                 "--out", str(tmp_path / "cca.json")]) == 0
    cca = json.loads((tmp_path / "cca.json").read_text())
    assert cca["learner"] == "cca" and cca["embedding_dim"] == 32
    assert main(["simulate", "--dataset", "emoji-image-name", "--strategy", "random",
                 "--budget", "60", "--quiet", "--out", str(tmp_path / "default.json")]) == 0
    default = json.loads((tmp_path / "default.json").read_text())
    assert (default["learner"], default["embedding_dim"]) == (TrainerConfig().method,
                                                              TrainerConfig().dim_out)
    # the same pairs (random, same seed): on real text the ridge map is far ahead
    assert ridge["curve"][-1]["r1"] > cca["curve"][-1]["r1"] + 0.1


@pytest.mark.parametrize("strategy", ["random", "default"])
def test_stream_seen_refits_the_unpaired_data_on_the_items_offered_so_far(tiny, strategy,
                                                                          monkeypatch):
    """stream_unpaired='seen': each retrain's unpaired data is the stream so far, growing, never
    the whole pool (what a service knows); 'pool' fits the whole pool once, up front."""
    sizes = []
    real = sim_mod.AlignmentTrainer.fit_unpaired

    def record(self, unpaired):
        sizes.append(sum(len(v) for v in unpaired.values()))
        return real(self, unpaired)

    monkeypatch.setattr(sim_mod.AlignmentTrainer, "fit_unpaired", record)
    res = simulate(tiny, SimConfig(strategy=strategy, mode="stream", stream_unpaired="seen",
                                   **SMALL))
    pool_items = 2 * res["pool_rows"]
    # the up-front fit on the pool, the cold start's first events, then one per retrain
    assert sizes[0] == pool_items and sizes[1] == 2 * SimConfig().batch_size
    grown = sizes[2:]
    assert len(grown) == len(res["curve"]) - 1 and grown == sorted(grown)
    # (the last retrain may come after the whole stream: a selector can run out of stream)
    assert 0 < grown[0] < grown[-1] <= pool_items and res["stream_unpaired"] == "seen"
    sizes.clear()
    simulate(tiny, SimConfig(strategy=strategy, mode="stream", **SMALL))
    assert sizes == [pool_items]
    with pytest.raises(ValueError, match="stream_unpaired must be 'pool' or 'seen', got 'all'"):
        SimConfig(stream_unpaired="all")


@pytest.mark.parametrize("mode", ["pool", "stream"])
def test_no_warm_up_starts_from_the_cold_model(tiny, mode):
    """warmup=0: the first curve point is the cold model's (nothing acquired), and the strategy
    acts from the first acquisition (this crashed in pool mode before)."""
    res = simulate(tiny, SimConfig(strategy="default", mode=mode, **{**SMALL, "warmup": 0}))
    assert res["curve"][0]["pairs"] == 0 and res["curve"][-1]["pairs"] == SMALL["budget"]


# --- simulate: stream decisions deferred to windows (round 6 of reports/stream-tuning.md) -------


class WindowRecorder:
    """The pool default, keeping the candidates (raw rows) and picks of every window it decides."""

    def __init__(self):
        self.windows: list[dict] = []
        self._inner = sim_mod.POOL_DEFAULT()

    def select(self, state: PoolState, budget, rng):
        picks = self._inner.select(state, budget, rng)
        self.windows.append({"raw": {m: state.raw[m].copy() for m in state.modalities},
                             "picks": list(picks)})
        return picks


@pytest.mark.parametrize("window", [25, 64])
def test_stream_window_decides_consecutive_stretches_of_arrivals_and_spends_the_budget(
        tiny, monkeypatch, window):
    """A window strategy picks only among the items that arrived in its window (never one still
    ahead in the stream), each offered item is in one window, and the run spends exactly the
    budget without paying for a partner of an earlier pick."""
    rec = WindowRecorder()
    monkeypatch.setattr(sim_mod, "POOL_DEFAULT", lambda: rec)
    monkeypatch.setitem(sim_mod._STREAM_WINDOWS, "window-test", window)
    cfg = SimConfig(strategy="window-test", mode="stream", **SMALL)
    res = simulate(tiny, cfg)
    assert res["curve"][-1]["pairs"] == SMALL["budget"] and res["wasted"] == 0
    # the stream order the simulator drew (same seed streams as simulate's)
    _, pool = sim_mod._split(tiny, cfg, np.random.default_rng(cfg.seed))
    stream = np.random.default_rng([cfg.seed, 1]).permutation(2 * len(pool))
    arrival = np.empty(len(stream), dtype=np.int64)
    arrival[stream] = np.arange(len(stream))
    row_to_k = {int(r): k for k, r in enumerate(pool)}
    look = {"a": {r.tobytes(): i for i, r in enumerate(tiny.a)},
            "b": {r.tobytes(): i for i, r in enumerate(tiny.b)}}
    side = {"a": 0, "b": 1}
    stretches, picked = [], 0
    for w in rec.windows:
        codes = {m: [2 * row_to_k[look[m][r.tobytes()]] + side[m] for r in w["raw"][m]]
                 for m in ("a", "b")}
        pos = sorted(int(arrival[c]) for m in codes for c in codes[m])
        assert pos, "a window was decided with no candidates"
        stretches.append((pos[0], pos[-1], len(pos)))
        picked += len(w["picks"])
        for m, j in w["picks"]:
            assert 0 <= j < len(codes[m])  # a pick is one of the window's own candidates
    assert rec.windows and picked >= SMALL["budget"] - SMALL["warmup"]
    windows = [stretches[0]]
    for lo, hi, n in stretches[1:]:
        w_lo, w_hi, _ = windows[-1]
        if lo >= w_lo and hi <= w_hi:  # a make-up pick in the same window (a partner was picked)
            continue
        assert lo > w_hi  # the next window follows the last in arrival order, never overlaps
        windows.append((lo, hi, n))
    assert all(n <= window for _, _, n in windows)
    # a window is decided when its window-th item arrived (so at most that many candidates,
    # fewer when partners of earlier picks dropped out), the last one when the stream ended
    assert windows[0][2] == window


def test_stream_window_strategies_are_listed_and_bad_names_refused():
    names = list_strategies()["stream"]
    assert {"window-256", "window-1024"} <= set(names)
    with pytest.raises(ValueError, match="unknown stream strategy 'window-7'"):
        SimConfig(strategy="window-7", mode="stream")


@pytest.mark.parametrize("name", sorted(sim_mod._STREAM_SWITCH_TO_RANDOM))
def test_stream_switch_to_random_selects_until_its_share_then_spends_the_rest_at_random(
        tiny, monkeypatch, name):
    """default-then-random-*: the selector decides every batch until its share of the budget is
    spent and none after; selection sampling then spends exactly the rest."""
    acquired: list[int] = []
    spent_at_propose: list[int] = []
    real_acquire, real_propose = sim_mod._Oracle.acquire, sim_mod.StreamingSelector.propose

    def acquire(self, side, k):
        acquired.append(k)
        return real_acquire(self, side, k)

    def propose(self, batch):
        spent_at_propose.append(len(acquired))
        return real_propose(self, batch)

    monkeypatch.setattr(sim_mod._Oracle, "acquire", acquire)
    monkeypatch.setattr(sim_mod.StreamingSelector, "propose", propose)
    cfg = dict(SMALL, budget=90)
    simulate(tiny, SimConfig(strategy="default", mode="stream", **cfg))
    assert max(spent_at_propose) > round(cfg["budget"] * 0.5)  # the default selects on
    acquired.clear()
    spent_at_propose.clear()
    res = simulate(tiny, SimConfig(strategy=name, mode="stream", **cfg))
    stop = round(cfg["budget"] * sim_mod._STREAM_SWITCH_TO_RANDOM[name])
    assert spent_at_propose and max(spent_at_propose) < stop  # no selector decision after it
    assert res["curve"][-1]["pairs"] == cfg["budget"] == len(acquired)


def test_stream_default_decides_its_tail_at_random_after_a_third_of_the_budget(tiny, monkeypatch):
    """The stream default is the service's: BudgetConfig.random_after = TUNED_RANDOM_AFTER. Its
    decisions carry the utility's reasons until a third of the budget is spent and the random
    tail's from there on; it still spends the budget. ``default-no-random-tail`` and
    ``random_after=None`` (``--random-after off``) are the same run, without a tail decision."""
    acquired: list[int] = []
    reasons: list[tuple[int, str]] = []  # (spent before the batch, reason) per decision
    real_acquire, real_propose = sim_mod._Oracle.acquire, sim_mod.StreamingSelector.propose

    def acquire(self, side, k):
        acquired.append(k)
        return real_acquire(self, side, k)

    def propose(self, batch):
        proposal = real_propose(self, batch)
        reasons.extend((len(acquired), d.reason.code) for d in proposal.decisions)
        return proposal

    monkeypatch.setattr(sim_mod._Oracle, "acquire", acquire)
    monkeypatch.setattr(sim_mod.StreamingSelector, "propose", propose)
    cfg = dict(SMALL, budget=90)
    assert SimConfig().random_after == TUNED_RANDOM_AFTER == Settings().random_after
    res = simulate(tiny, SimConfig(strategy="default", mode="stream", **cfg))
    start = round(cfg["budget"] * TUNED_RANDOM_AFTER)
    tail = [code for spent, code in reasons if spent >= start]
    assert tail and set(tail) <= {"random_tail", "pacing", "budget_exhausted"}
    assert "random_tail" in tail
    assert "random_tail" not in {code for spent, code in reasons if spent < start - 8}
    assert res["curve"][-1]["pairs"] == len(acquired)
    assert cfg["budget"] - 8 <= len(acquired) <= cfg["budget"], len(acquired)
    runs = []
    for kw in (dict(strategy="default-no-random-tail"),
               dict(strategy="default", random_after=None)):
        acquired.clear()
        reasons.clear()
        runs.append(simulate(tiny, SimConfig(mode="stream", **kw, **cfg))["curve"])
        assert "random_tail" not in {code for _, code in reasons}
        assert cfg["budget"] - 8 <= len(acquired) <= cfg["budget"], len(acquired)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("raw,want", [("off", None), ("0.5", 0.5), ("1", 1.0)])
def test_random_after_flag_takes_a_share_or_off(raw, want):
    args = build_parser().parse_args(["simulate", "--random-after", raw])
    assert args.random_after == want
    assert build_parser().parse_args(["simulate"]).random_after == TUNED_RANDOM_AFTER


@pytest.mark.parametrize("raw", ["0", "1.5", "nan", "a third"])
def test_random_after_flag_refuses_what_is_not_a_share(raw, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "--random-after", raw])
    assert f"expected a share in (0, 1] or 'off', got '{raw}'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="random_after must be in"):
        SimConfig(mode="stream", random_after=0.0)
