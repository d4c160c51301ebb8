"""Offline active-learning simulator (``pairsieve simulate``): hides the pairing, reveals on
acquisition.

A dataset's rows are true pairs. The simulator shuffles them, holds out ``test_size`` paired rows
for evaluation, and turns the rest into a pool of *unimodal* items (each row's ``a`` and ``b``).
A strategy acquires items; acquiring an item reveals its partner (the pair) if it has one, else it
is a NO_MATCH (budget spent, no pair). Acquisitions are the budget unit and the x axis of the
learning curve; the model is retrained after each round (pool) or every ``retrain_every``
acquisitions (stream) and evaluated by cross-modal recall@1/@5 on the held-out pairs.

All randomness comes from ``seed``: the split, the warm-up picks and the stream order are shared
by every strategy for the same seed, so curves of different strategies are paired comparisons.

Stream ``random`` is selection sampling: it spends exactly the budget on a uniform random subset
of the offered items. The selector paces towards a target rate and, since it cannot go back, may
end a few acquisitions short when the stream runs out (its curve then ends there). The
``window-*`` stream strategies hold offered items in windows and let the pool default pick among
each window's items (an experiment: a service deciding later; ``_stream_windowed``); the
``default-then-random-*`` ones select as the default until a share of the budget is spent and at
random after it (``_STREAM_SWITCH_TO_RANDOM``, selection sampling: round 7). The service's own
version of that switch, the budget controller's random tail (``SimConfig.random_after``, the
service's default), is in every selector strategy unless ``random_after`` is None;
``default-no-random-tail`` is the default without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from service.alignment import AlignmentTrainer, TrainerConfig, retrieval_recall
from service.core.acquisition import AcquisitionConfig
from service.core.budget import (
    TUNED_RANDOM_AFTER,
    TUNED_WARMUP_ACCEPTS,
    BudgetConfig,
    check_random_after,
)
from service.core.pool import DEFAULT_STRATEGY as POOL_DEFAULT
from service.core.pool import STRATEGIES as POOL_BASELINES
from service.core.pool.base import PoolState
from service.core.pool.hybrid import HybridStrategy
from service.core.selector import SelectorConfig, StreamingSelector
from service.core.types import FeatureItem
from service.evaluation.datasets import Dataset
from service.evaluation.ridge_baseline import RidgeBaseline, recall_from_scores
from service.learning_loop import DEFAULT_RETRAIN_EVERY

MODES = ("pool", "stream")


def _pool_strategies() -> dict[str, Callable[[], object]]:
    out: dict[str, Callable[[], object]] = {name: cls for name, cls in POOL_BASELINES.items()}
    # default: the service's pool default (what the gRPC SelectPool runs): diversity 0.5 +
    # typicality 0.5, rank-normalised per modality (service/core/pool/__init__.py). The margin-*
    # entries are the earlier default's family (margin w + diversity 1-w; margin scores are
    # heavy-tailed, z-scoring them let one modality's tail dominate in early experiments).
    out["default"] = POOL_DEFAULT
    out["margin-0.3"] = HybridStrategy  # the default before typicality (margin 0.3, rank)
    out["margin-0.3-typicality-0.35"] = lambda: HybridStrategy(weight=0.3, typicality=0.35)
    # the pool tuning run (reports/pool-tuning.md, seeds 100-119): 0.7 was the default before it
    out["margin-0.5"] = lambda: HybridStrategy(weight=0.5)
    out["margin-0.7"] = lambda: HybridStrategy(weight=0.7)
    out["hybrid-zscore"] = lambda: HybridStrategy(normalization="zscore")
    out["hybrid-entropy"] = lambda: HybridStrategy(uncertainty="entropy")
    return out


# Stream strategies that select as the default until this share of the budget is spent, then
# at random (selection sampling over the rest of the stream); round 7 of reports/stream-tuning.md.
_STREAM_SWITCH_TO_RANDOM = {"default-then-random-0.33": 1 / 3, "default-then-random-0.5": 0.5}


def _stream_configs() -> dict[str, Callable[[BudgetConfig], SelectorConfig] | None]:
    # the tuning candidates (rounds 1-4 of reports/stream-tuning.md) ran without drift decay
    def cfg(uw, dw, cw=0.1, unc="entropy", norm="zscore", quotas=False, tw=0.0):
        return lambda b: SelectorConfig(
            uncertainty=unc, budget=b, cache_half_life=None,
            acquisition=AcquisitionConfig(uncertainty_weight=uw, diversity_weight=dw,
                                          coverage_weight=cw, normalization=norm, quotas=quotas,
                                          typicality_weight=tw))

    def no_tail(b: BudgetConfig) -> SelectorConfig:
        return SelectorConfig(budget=replace(b, random_after=None))

    return {
        "random": None,
        # the service's own defaults (SelectorConfig, AcquisitionConfig), so the benchmarked
        # default is what a deployment runs: diversity 0.5 + typicality 0.5, rank-normalised
        "default": lambda b: SelectorConfig(budget=b),
        # the default before typicality (round 4 of reports/stream-tuning.md)
        "lc-0.7": cfg(0.7, 0.3, unc="least_confidence"),
        # candidates of the tuning run (reports/stream-tuning.md, seeds 100-109/200-209/300-309)
        "entropy-0.7": cfg(0.7, 0.3),  # the default before the tuning run
        "entropy-0.5": cfg(0.5, 0.5),
        "entropy-0.3": cfg(0.3, 0.7),
        "least-confidence-0.5": cfg(0.5, 0.5, unc="least_confidence"),
        "entropy": cfg(1.0, 0.0, 0.0),
        "margin": cfg(1.0, 0.0, 0.0, unc="margin"),
        "diversity": cfg(0.0, 1.0, 0.0),
        "margin-rank": cfg(0.7, 0.3, unc="margin", norm="rank"),
        "quota": cfg(0.7, 0.3, quotas=True),
        # typicality candidates (TypiClust's density among the same modality's recent items;
        # round 4: diversity-typicality-rank became the default)
        "lc-0.7-typicality-0.3": cfg(0.7, 0.3, unc="least_confidence", tw=0.3),
        "lc-0.35-typicality-0.35": cfg(0.35, 0.3, unc="least_confidence", tw=0.35),
        "lc-0.5-typicality-0.5": cfg(0.5, 0.0, unc="least_confidence", tw=0.5),
        "diversity-typicality": cfg(0.0, 0.5, unc="least_confidence", tw=0.5),
        "lc-0.7-typicality-0.7": cfg(0.7, 0.3, unc="least_confidence", tw=0.7),
        "diversity-typicality-rank": cfg(0.0, 0.5, unc="least_confidence", tw=0.5, norm="rank"),
        "diversity-0.7-typicality-0.3": cfg(0.0, 0.7, unc="least_confidence", tw=0.3),
        "diversity-0.3-typicality-0.7": cfg(0.0, 0.3, unc="least_confidence", tw=0.7),
        "lc-0.2-diversity-typicality": cfg(0.2, 0.4, unc="least_confidence", tw=0.4),
        "lc-0.7-rank": cfg(0.7, 0.3, unc="least_confidence", norm="rank"),
        "lc-0.3-diversity-typicality-rank": cfg(0.3, 0.35, unc="least_confidence", tw=0.35,
                                                norm="rank"),
        "diversity-0.7-typicality-0.3-rank": cfg(0.0, 0.7, unc="least_confidence", tw=0.3,
                                                 norm="rank"),
        "diversity-rank": cfg(0.0, 1.0, 0.0, norm="rank"),
        # drift (bench-long-stream): the default without its cache half-life (4000 items) and
        # the other half-lives of the tuning run
        "default-no-decay": lambda b: replace(SelectorConfig(budget=b), cache_half_life=None),
        "decay-1000": lambda b: replace(SelectorConfig(budget=b), cache_half_life=1000.0),
        "decay-16000": lambda b: replace(SelectorConfig(budget=b), cache_half_life=16000.0),
        # round 5: a stronger pull towards the modality farther from its selected set (rank
        # normalisation per modality holds the stream near 50/50; the pool default is not held)
        "coverage-0.3": lambda b: SelectorConfig(
            budget=b, acquisition=replace(AcquisitionConfig(), coverage_weight=0.3)),
        "coverage-0.6": lambda b: SelectorConfig(
            budget=b, acquisition=replace(AcquisitionConfig(), coverage_weight=0.6)),
        # round 8: the default without its random tail (the stream default up to round 7)
        "default-no-random-tail": no_tail,
        # round 7: the default until a share of the budget is spent, random after it
        # (_STREAM_SWITCH_TO_RANDOM, in the simulator; [TypiClust]: typical items suit low
        # budgets only). The core's own random tail is off in them, so they run as in round 7.
        **{name: no_tail for name in _STREAM_SWITCH_TO_RANDOM},
    }


# Stream strategies that defer each decision until a window of W offered items is in, then take
# the pool default's top picks among them (round 6 of reports/stream-tuning.md): what a selector
# could do if the service held events for W arrivals instead of deciding each as it comes.
_STREAM_WINDOWS = {"window-256": 256, "window-1024": 1024}


def list_strategies() -> dict[str, list[str]]:
    """Strategy names per mode (``random`` and ``default`` always included)."""
    pool = sorted(set(_pool_strategies()) | {"random"})
    return {"pool": pool, "stream": sorted(set(_stream_configs()) | set(_STREAM_WINDOWS))}


@dataclass(frozen=True)
class SimConfig:
    """Settings of one simulation run."""

    strategy: str = "default"
    mode: str = "pool"
    budget: int = 300
    seed: int = 0
    strategy_seed: int | None = None  # randomness of the strategy only (None: = seed)
    test_size: int = 500
    round_size: int = 25  # pool: acquisitions per round
    warmup: int = TUNED_WARMUP_ACCEPTS  # random acquisitions before any strategy acts (both modes)
    # stream: share of the budget the selector spends by utility before its random tail
    # (BudgetConfig.random_after; None: utility to the end)
    random_after: float | None = TUNED_RANDOM_AFTER
    retrain_every: int = DEFAULT_RETRAIN_EVERY  # stream: acquisitions between retrains
    batch_size: int = 32  # stream: micro-batch size
    explore: float = 0.05
    stream_order: str = "shuffled"  # stream: "shuffled", or "dataset" (row order, e.g. books)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # stream: what the learner knows as unpaired data (whitening, principal directions,
    # self-learning's items). "pool": the whole pool from the start (what the committed reports
    # use; optimistic: a service has only what it has seen, and self-learning feeds on it);
    # "seen": refitted at each retrain on the items offered so far, as the service does
    stream_unpaired: str = "pool"
    # "pairsieve" (``trainer``) or "ridge-baseline" (issue 13's plain two-map ridge,
    # service/evaluation/ridge_baseline.py; with ``strategy="random"`` only: a reference curve)
    learner: str = "pairsieve"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        names = list_strategies()[self.mode]
        if self.strategy not in names:
            raise ValueError(f"unknown {self.mode} strategy {self.strategy!r}; known: {names}")
        for name in ("budget", "round_size", "retrain_every", "batch_size", "test_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.stream_order not in ("shuffled", "dataset"):
            raise ValueError(f"stream_order must be 'shuffled' or 'dataset', got "
                             f"{self.stream_order!r}")
        if self.stream_unpaired not in ("pool", "seen"):
            raise ValueError(f"stream_unpaired must be 'pool' or 'seen', got "
                             f"{self.stream_unpaired!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        check_random_after(self.random_after)
        if self.learner not in ("pairsieve", "ridge-baseline"):
            raise ValueError(f"learner must be 'pairsieve' or 'ridge-baseline', got "
                             f"{self.learner!r}")
        if self.learner == "ridge-baseline" and self.strategy != "random":
            raise ValueError(f"the ridge baseline is a reference for random selection only, got "
                             f"strategy {self.strategy!r}")


class _Oracle:
    """Holds the hidden pairing of the pool; answers acquisitions."""

    def __init__(self, ds: Dataset, rows: np.ndarray):
        self.ds = ds
        self.rows = rows
        paired = ds.paired if ds.paired is not None else np.ones(len(ds.a), dtype=bool)
        self.paired = paired
        self.revealed_rows: list[int] = []
        self.open = {0: np.ones(len(rows), dtype=bool), 1: np.ones(len(rows), dtype=bool)}
        self.spent = 0
        self.no_match = 0
        self.wasted = 0
        self.per_modality = {0: 0, 1: 0}

    def acquire(self, side: int, k: int) -> int | None:
        """Acquire item k (position in ``rows``) of modality ``side``; return the row if paired.

        An item whose pair was already revealed (its partner was acquired in the same round or
        micro-batch: the selector cannot know they are partners) costs an acquisition and
        reveals nothing new.
        """
        if not self.open[side][k]:
            self.spent += 1
            self.per_modality[side] += 1
            self.wasted += 1
            return None
        self.spent += 1
        self.per_modality[side] += 1
        self.open[side][k] = False
        row = int(self.rows[k])
        if self.paired[row]:
            self.open[1 - side][k] = False
            self.revealed_rows.append(row)
            return row
        self.no_match += 1
        return None


def _split(ds: Dataset, cfg: SimConfig, rng: np.random.Generator):
    n = len(ds.a)
    paired = ds.paired if ds.paired is not None else np.ones(n, dtype=bool)
    perm = rng.permutation(n)
    paired_perm = perm[paired[perm]]
    test_size = min(cfg.test_size, len(paired_perm) // 4)
    if test_size < 10:
        raise ValueError(f"dataset {ds.name!r} has too few paired rows ({len(paired_perm)}) "
                         "for a test split")
    test = paired_perm[:test_size]
    pool = np.setdiff1d(perm, test, assume_unique=False)
    pool = pool[rng.permutation(len(pool))]
    return test, pool


def simulate(ds: Dataset, config: SimConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run one strategy on one dataset; return the result dict (see ``pairsieve simulate``)."""
    t0 = time.perf_counter()
    cfg = config
    rng = np.random.default_rng(cfg.seed)
    test, pool = _split(ds, cfg, rng)
    if cfg.budget > len(pool):
        raise ValueError(f"budget {cfg.budget} exceeds the pool of {len(pool)} rows")
    ma, mb = ds.modality_a, ds.modality_b
    trainer = AlignmentTrainer({ma: ds.a.shape[1], mb: ds.b.shape[1]}, cfg.trainer, seed=cfg.seed)
    if cfg.trainer.self_learning == "off":
        trainer.fit_unpaired({ma: ds.a[pool], mb: ds.b[pool]})
    else:
        # each modality's pool in its own random order: self-learning matches the last items it
        # is given, and the row order of the pool would tell it which items are partners
        order = np.random.default_rng([cfg.seed, 3])
        trainer.fit_unpaired({ma: ds.a[order.permutation(pool)],
                              mb: ds.b[order.permutation(pool)]})
    oracle = _Oracle(ds, pool)
    run = _run_pool if cfg.mode == "pool" else _run_stream
    sseed = cfg.seed if cfg.strategy_seed is None else cfg.strategy_seed
    cost: list[dict] = []
    curve = run(ds, cfg, trainer, oracle, test, np.random.default_rng([cfg.seed, 1]),
                np.random.default_rng([sseed, 2]), progress, cost)
    return {
        "dataset": ds.name, "strategy": cfg.strategy, "mode": cfg.mode, "seed": cfg.seed,
        "budget": cfg.budget, "curve": curve,
        "stream_order": cfg.stream_order if cfg.mode == "stream" else None,
        "learner": cfg.trainer.method if cfg.learner == "pairsieve" else cfg.learner,
        "self_learning": cfg.trainer.self_learning, "embedding_dim": cfg.trainer.dim_out,
        "stream_unpaired": cfg.stream_unpaired if cfg.mode == "stream" else None,
        "acquisitions_per_modality": {ma: oracle.per_modality[0], mb: oracle.per_modality[1]},
        "no_match": oracle.no_match, "wasted": oracle.wasted,
        "unique_pairs": len(oracle.revealed_rows),
        "test_size": int(len(test)), "pool_rows": int(len(pool)),
        "wall_seconds": round(time.perf_counter() - t0, 3),
        # stream: one entry per curve point (items offered so far, cumulative seconds spent in
        # propose + commit and in retrain + evaluation); empty in pool mode
        "cost": cost,
    }


def _evaluate(cfg, trainer, model, ds, oracle, test, prev):
    rows = np.asarray(oracle.revealed_rows, dtype=np.int64)
    if cfg.learner == "ridge-baseline":
        # the selection keeps the cold model (random ignores it); recall from the baseline
        rec = (recall_from_scores(RidgeBaseline(ds.a[rows], ds.b[rows]).scores(ds.a[test],
                                                                               ds.b[test]))
               if len(rows) >= 2 else retrieval_recall(model, ds.a[test], ds.b[test]))
        return model, {"pairs": oracle.spent, "unique_pairs": int(len(rows)),
                       "r1": round(rec["r1"], 5), "r5": round(rec["r5"], 5)}
    if len(rows):
        model = trainer.fit(ds.a[rows], ds.b[rows], init=prev)
    elif prev is not None:  # nothing acquired yet (warm-up 0): the cold model stays
        model = prev
    rec = retrieval_recall(model, ds.a[test], ds.b[test])
    point = {"pairs": oracle.spent, "unique_pairs": int(len(rows)),
             "r1": round(rec["r1"], 5), "r5": round(rec["r5"], 5)}
    fit = trainer.last_fit
    if len(rows) and fit.get("pairs") == len(rows):  # what the learner chose for this point
        point["fit"] = fit["method"] + (f"+self({fit['pseudo_pairs']})"
                                        if "pseudo_pairs" in fit else "")
    return model, point


def _warmup_picks(oracle: _Oracle, n: int, rng: np.random.Generator) -> None:
    for _ in range(n):
        open_items = np.concatenate([np.flatnonzero(oracle.open[0]) * 2,
                                     np.flatnonzero(oracle.open[1]) * 2 + 1])
        if len(open_items) == 0:
            return
        it = int(rng.choice(open_items))
        oracle.acquire(it % 2, it // 2)


def _pool_state(ds: Dataset, oracle: _Oracle, model, cand: dict[int, np.ndarray]) -> PoolState:
    """What a pool strategy sees: the candidates ``cand[side]`` (positions in the pool of each
    modality's open items, in the order the strategy's picks index), every revealed pair as the
    selected set, the current model."""
    mods, raws = (ds.modality_a, ds.modality_b), (ds.a, ds.b)
    rows = np.asarray(oracle.revealed_rows, dtype=np.int64)
    return PoolState(
        modalities=mods,
        raw={mods[s]: raws[s][oracle.rows[cand[s]]] for s in (0, 1)},
        embedded={mods[s]: model.embed(mods[s], raws[s][oracle.rows[cand[s]]]) for s in (0, 1)},
        selected={mods[s]: model.embed(mods[s], raws[s][rows]) if len(rows)
                  else np.zeros((0, model.dim_out), np.float32) for s in (0, 1)},
        model=model,
        acquired_per_modality={mods[s]: oracle.per_modality[s] for s in (0, 1)},
    )


def _run_pool(ds, cfg, trainer, oracle, test, rng, srng, progress, cost):
    mods = (ds.modality_a, ds.modality_b)
    strategy = _pool_strategies()[cfg.strategy]()
    _warmup_picks(oracle, min(cfg.warmup, cfg.budget), rng)
    order_rng, rng = rng, srng
    model, point = _evaluate(cfg, trainer, trainer.cold_model(), ds, oracle, test, None)
    curve = [point]
    while oracle.spent < cfg.budget:
        k = min(cfg.round_size, cfg.budget - oracle.spent)
        # Each modality's candidates in an independent random order: row j of one modality must
        # not be the partner of row j of the other (that would leak the hidden pairing).
        cand = {s: order_rng.permutation(np.flatnonzero(oracle.open[s])) for s in (0, 1)}
        picks = strategy.select(_pool_state(ds, oracle, model, cand), k, rng)
        if not picks:
            break
        for m, j in picks:
            s = mods.index(m)
            oracle.acquire(s, cand[s][j])
        model, point = _evaluate(cfg, trainer, model, ds, oracle, test, model)
        curve.append(point)
        if progress:
            progress(f"{cfg.strategy}/{cfg.mode} seed {cfg.seed}: {oracle.spent}/{cfg.budget} "
                     f"r1={point['r1']:.3f}")
    return curve


class _StreamAhead:
    """How many open items the stream still holds after the current position: the denominator of
    selection sampling and of a window's share. An acquisition through :meth:`acquire` that
    closes a partner still ahead in the stream takes that partner off (it will not be offered)."""

    def __init__(self, oracle: _Oracle, stream: np.ndarray, start: int = 0):
        self.oracle = oracle
        self.position = np.empty(len(stream), dtype=np.int64)
        self.position[stream] = np.arange(len(stream))
        # open items at the current position or later
        self.left = int(sum(bool(oracle.open[it % 2][it // 2]) for it in stream[start:].tolist()))
        self.p = start

    def offer(self, p: int) -> None:
        """The open item at stream position ``p`` is being offered (it leaves ``left``)."""
        self.p = p
        self.left -= 1

    def acquire(self, side: int, k: int) -> None:
        oracle = self.oracle
        partner_open = oracle.open[1 - side][k]
        oracle.acquire(side, k)
        if partner_open and not oracle.open[1 - side][k] \
                and self.position[2 * k + 1 - side] > self.p:
            self.left -= 1  # the partner, still ahead in the stream, will not be offered


def _stream_budget(cfg: SimConfig, rate: float) -> BudgetConfig:
    """The stream selector's budget: the run's budget at ``rate``, the warm-up, exploration and
    random tail of ``cfg``, and a 1,024-utility threshold window (sized for the short streams)."""
    return BudgetConfig(total=cfg.budget, target_rate=rate, warmup_accepts=cfg.warmup,
                        explore=cfg.explore, window=1024, random_after=cfg.random_after)


def _run_stream(ds, cfg, trainer, oracle, test, rng, srng, progress, cost):
    mods = (ds.modality_a, ds.modality_b)
    n = len(oracle.rows)
    stream = rng.permutation(2 * n)  # item = 2*k + side (never shown to the selector)
    if cfg.stream_order == "dataset":
        # rows in dataset order (the pool's k-th item is row oracle.rows[k]); both modalities of
        # nearby rows interleaved in a random order within each window of 64 items
        by_row = np.argsort(oracle.rows, kind="stable")
        items = np.stack([2 * by_row, 2 * by_row + 1], axis=1).ravel()
        for start in range(0, len(items), 64):
            items[start:start + 64] = rng.permutation(items[start:start + 64])
        stream = items
    # Opaque ids: partners' ids must not be related (2k and 2k+1 would leak the pairing).
    opaque = rng.permutation(2 * n)
    item_of = np.empty(2 * n, dtype=np.int64)
    item_of[opaque] = np.arange(2 * n)
    # Items whose partner was already acquired are not offered, so about `budget` fewer arrive.
    rate = min(1.0, cfg.budget / max(1, len(stream) - cfg.budget))
    rng = srng
    factory = _stream_configs().get(cfg.strategy)
    if cfg.stream_unpaired == "seen":  # the cold model's whitening from the first events only
        _refit_unpaired_on_seen(trainer, ds, oracle, stream[:2 * cfg.batch_size])
    model = trainer.cold_model()
    _, point = _evaluate(cfg, trainer, model, ds, oracle, test, model)
    point["pairs"] = 0
    curve = [point]
    clock = {"offered": 0, "select": 0.0, "train": 0.0, "position": 0}

    def log_cost():
        cost.append({"pairs": curve[-1]["pairs"], "offered": clock["offered"],
                     "select_seconds": round(clock["select"], 6),
                     "train_seconds": round(clock["train"], 6)})

    def retrain(model):
        t = time.perf_counter()
        if cfg.stream_unpaired == "seen":
            _refit_unpaired_on_seen(trainer, ds, oracle, stream[:clock["position"]])
        out = _evaluate(cfg, trainer, model, ds, oracle, test, model)
        clock["train"] += time.perf_counter() - t
        return out

    log_cost()
    next_retrain = cfg.retrain_every
    raws = (ds.a, ds.b)

    def retrain_if_due(model):
        """Retrain once ``retrain_every`` more acquisitions were made; (model, retrained?)."""
        nonlocal next_retrain
        if oracle.spent < next_retrain:
            return model, False
        model, point = retrain(model)
        curve.append(point)
        log_cost()
        next_retrain = (oracle.spent // cfg.retrain_every + 1) * cfg.retrain_every
        return model, True

    def random_from(start: int, model):
        """Random from stream position ``start`` on: selection sampling (Knuth's Algorithm S)
        over the items actually offered, accept with probability (budget left) / (offered items
        left), so every run spends exactly the budget on a uniform random subset. (A fixed
        acceptance probability ended 20 % of the runs up to 6 % short of a 300 budget, and the
        reference curve's last point then averaged only the runs that got there.)"""
        ahead = _StreamAhead(oracle, stream, start)
        u = rng.random(len(stream) - start)
        for p, (it, ui) in enumerate(zip(stream[start:], u, strict=True), start):
            if oracle.spent >= cfg.budget:
                break
            s, k = int(it % 2), int(it // 2)
            if not oracle.open[s][k]:  # its partner was acquired: not offered (already uncounted)
                continue
            accept = ui * ahead.left < cfg.budget - oracle.spent
            ahead.offer(p)
            clock["offered"] += 1
            clock["position"] = p + 1
            if accept:
                ahead.acquire(s, k)
                model, _ = retrain_if_due(model)
        return model

    if cfg.strategy in _STREAM_WINDOWS:
        model = _stream_windowed(ds, cfg, model, oracle, stream, rng, _STREAM_WINDOWS[cfg.strategy],
                                 retrain_if_due, clock)
    elif factory is None:
        model = random_from(0, model)
    else:
        selector = StreamingSelector(model, factory(_stream_budget(cfg, rate)),
                                     seed=int(srng.integers(2**31)),
                                     device="cpu")
        pos = 0
        stop = round(cfg.budget * _STREAM_SWITCH_TO_RANDOM.get(cfg.strategy, 1.0))
        while pos < len(stream) and oracle.spent < stop:
            batch, pos = [], pos
            while len(batch) < cfg.batch_size and pos < len(stream):
                it = int(stream[pos])
                pos += 1
                s, k = it % 2, it // 2
                if oracle.open[s][k]:  # already-aligned items are known to the service: not offered
                    batch.append(FeatureItem(f"item-{opaque[it]}", mods[s],
                                             raws[s][oracle.rows[k]]))
            if not batch:
                break
            t = time.perf_counter()
            proposal = selector.propose(batch)
            selector.commit(proposal)  # the simulator "publishes" instantly
            clock["select"] += time.perf_counter() - t
            clock["offered"] += len(batch)
            clock["position"] = pos
            for d in proposal.accepted:
                it = int(item_of[int(d.item_id.removeprefix("item-"))])
                s, k = it % 2, it // 2
                no_match = oracle.no_match
                row = oracle.acquire(s, k)
                if row is not None:
                    selector.reveal_partner(mods[1 - s], raws[1 - s][row])
                elif oracle.no_match > no_match:  # the annotator answered NO_MATCH
                    selector.mark_partnerless(mods[s], raws[s][oracle.rows[k]])
            model, retrained = retrain_if_due(model)
            if retrained:
                selector.set_model(model)
                if progress:
                    progress(f"{cfg.strategy}/stream seed {cfg.seed}: {oracle.spent}/{cfg.budget} "
                             f"r1={curve[-1]['r1']:.3f}")
        if oracle.spent < cfg.budget and pos < len(stream):  # a switch to random
            model = random_from(pos, model)
    if curve[-1]["pairs"] != oracle.spent:
        model, point = retrain(model)
        curve.append(point)
        log_cost()
    return curve


def _stream_windowed(ds, cfg, model, oracle, stream, rng, window, retrain_if_due, clock):
    """Stream mode, decisions deferred to windows of ``window`` offered items (see
    ``_STREAM_WINDOWS``); returns the last model.

    The first ``cfg.warmup`` acquisitions are taken at random as items arrive (selection sampling,
    about the target rate, like the selector's warm-up). After them, offered items are held until
    ``window`` are in (or the stream ends); the pool default then picks among the held items only
    (never one that has not arrived), as many as the budget left times the window's share of the
    open items still to come (stochastic rounding; the last window gets the rest). Its selected
    set is every revealed pair so far; the model is retrained between windows.
    """
    mods = (ds.modality_a, ds.modality_b)
    strategy = POOL_DEFAULT()
    codes = stream.tolist()
    ahead = _StreamAhead(oracle, stream)

    def decide(held: list[int], last: bool) -> None:
        """Pick among the ``held`` item codes: their share of the budget left, all of it when
        ``last``; picks that were a held partner of an earlier pick are made up for."""
        held = [h for h in held if oracle.open[h % 2][h // 2]]
        need = cfg.budget - oracle.spent
        share = len(held) / max(1, len(held) + ahead.left)
        goal = oracle.spent + min(len(held), need if last else int(np.floor(need * share
                                                                            + rng.random())))
        while oracle.spent < goal and held:
            cand = {side: np.array([h // 2 for h in held if h % 2 == side], dtype=np.int64)
                    for side in (0, 1)}
            state = _pool_state(ds, oracle, model, cand)
            t = time.perf_counter()
            picks = strategy.select(state, goal - oracle.spent, rng)
            clock["select"] += time.perf_counter() - t
            for m, j in picks:
                side = mods.index(m)
                if oracle.open[side][cand[side][j]]:  # not the partner of an earlier pick
                    ahead.acquire(side, int(cand[side][j]))
            held = [h for h in held if oracle.open[h % 2][h // 2]]

    held: list[int] = []
    for p, it in enumerate(codes):
        if oracle.spent >= cfg.budget:
            break
        s, k = it % 2, it // 2
        if not oracle.open[s][k]:  # its partner was acquired: not offered (already uncounted)
            continue
        ahead.offer(p)
        clock["offered"] += 1
        clock["position"] = p + 1
        if oracle.spent < cfg.warmup:
            # selection sampling over the items still to come, as random does: about the
            # target rate, and exactly the budget when it is all warm-up
            if rng.random() * (ahead.left + 1) < cfg.budget - oracle.spent:
                ahead.acquire(s, k)
        else:
            held.append(it)
        if len(held) >= window or (held and ahead.left == 0):
            decide(held, last=ahead.left == 0)
            held = []
        model, _ = retrain_if_due(model)
    return model


def _refit_unpaired_on_seen(trainer: AlignmentTrainer, ds: Dataset, oracle: _Oracle,
                            seen: np.ndarray) -> None:
    """``SimConfig.stream_unpaired="seen"``: the trainer's unpaired statistics from the stream
    items offered so far (``seen``: item codes ``2 k + side`` in arrival order, oldest first)."""
    views = (ds.a, ds.b)
    items = {}
    for side, m in enumerate((ds.modality_a, ds.modality_b)):
        ks = seen[seen % 2 == side] // 2
        items[m] = views[side][oracle.rows[ks]]
    if all(len(v) >= 2 for v in items.values()):
        trainer.fit_unpaired(items)


def plot_result(result: dict, path: Path) -> Path:
    """Write one run's learning curve (R@1 and R@5 against acquisitions) as a PNG.

    Parameters
    ----------
    result : dict
        A ``simulate`` result (``curve`` of ``{"pairs", "r1", "r5"}`` points).
    path : Path
        Destination ``.png``; parent folders are created.

    Returns
    -------
    Path
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = [p["pairs"] for p in result["curve"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [p["r1"] for p in result["curve"]], marker=".", label="R@1")
    ax.plot(x, [p["r5"] for p in result["curve"]], marker=".", label="R@5")
    ax.set_xlabel("acquisitions (pairs paid for)")
    ax.set_ylabel(f"recall among {result['test_size']} held-out pairs")
    ax.set_title(f"{result['strategy']}/{result['mode']} on {result['dataset']}, "
                 f"seed {result['seed']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
