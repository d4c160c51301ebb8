"""``make bench-quality``: strategies x datasets x seeds x modes, and the report.

Runs every combination with :func:`service.evaluation.simulator.simulate` in worker processes (one
torch and one BLAS thread each, set in each worker by :func:`_init_worker`). ``random`` runs
``random_draws`` times per seed (same split, independent random choices); its curve and its
savings per seed are the mean over those draws, so the baseline every strategy is compared with
is not one lucky or unlucky draw. It adds one more independent random run per seed
(``random-replicate``: what a single random draw gives, the noise floor), and writes
``reports/quality.md``, learning curve PNGs and the raw results
(``reports/quality-results.json.gz``, gzip: the raw curves of 5,200 runs are 8 MB as JSON).
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.core.budget import TUNED_RANDOM_AFTER
from service.evaluation import curves
from service.evaluation.datasets import BUILTIN, QUALITY_REAL, REAL, describe, get_dataset
from service.evaluation.simulator import SimConfig, list_strategies, simulate
from service.threads import limit_compute_threads

REPLICATE = "random-replicate"
# issue 13's plain learner as a named strategy: random picks (draw 0's, so paired with random's
# learner), scored by two ridge maps (service/evaluation/ridge_baseline.py). What a user gets
# without pairsieve; the "end to end" table measures pairsieve against it.
BASELINE = "ridge-baseline"
CHECKPOINTS = (50, 100, 200, 300)  # budgets at which the learner table compares R@1
RANDOM_DRAWS = 4  # random runs per seed in the baseline (each ~0.1 s: a cheap variance cut)
REPLICATE_SEED_OFFSET = 10_000
DRAW_SEED_OFFSET = 20_000  # strategy seed of draw k > 0: seed + k * DRAW_SEED_OFFSET

TOY_DATASETS = ("digits", "digits-lr", "synthetic", "synthetic-imbalanced",
                    "synthetic-longtail-dup", "synthetic-missing", "synthetic-unique",
                    "synthetic-synergy")
DEFAULT_DATASETS = QUALITY_REAL + TOY_DATASETS  # the real sets lead the report


def ordered(datasets) -> list[str]:
    """The real datasets first (in ``REAL`` order), then the others sorted by name."""
    names = set(datasets)
    return [d for d in REAL if d in names] + sorted(names - set(REAL))
DEFAULT_STRATEGIES = {
    "pool": ("random", REPLICATE, BASELINE, "default", "margin-0.7", "hybrid-zscore", "mmal",
             "entropy", "margin", "coreset", "badge", "bmmal", "vecaf"),
    "stream": ("random", REPLICATE, BASELINE, "default", "entropy-0.7", "entropy", "diversity",
               "margin-rank", "quota"),
}


def select_strategies(names, modes) -> dict[str, tuple[str, ...]]:
    """``--strategies``: each mode gets the given names that are registered for it.

    A name registered for none of ``modes`` is an error (not silently dropped); one registered
    for only some of them runs where it exists (``coreset`` is pool-only).
    """
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("--strategies is empty")
    known = {m: set(list_strategies()[m]) | {REPLICATE, BASELINE} for m in modes}
    unknown = [n for n in names if not any(n in known[m] for m in modes)]
    if unknown:
        raise ValueError(f"unknown strategies {unknown} for modes {list(modes)}; known: "
                         + "; ".join(f"{m}: {sorted(known[m])}" for m in modes))
    chosen = {m: tuple(dict.fromkeys(n for n in names if n in known[m])) for m in modes}
    for m, got in chosen.items():
        if "random" not in got:
            raise ValueError(f"{m}: savings are measured against random; add 'random' to "
                             f"--strategies (got {list(names)})")
    return chosen


@dataclass(frozen=True)
class Job:
    dataset: str
    mode: str
    strategy: str
    seed: int
    budget: int
    draw: int = 0  # which random draw (random only; 0 = the strategy seed is the seed itself)
    stream_unpaired: str = "seen"  # stream mode: SimConfig.stream_unpaired
    random_after: float | None = TUNED_RANDOM_AFTER  # stream mode: SimConfig.random_after


def _init_worker() -> None:
    """Each worker computes on one thread (torch and BLAS), so ``jobs`` workers use ``jobs`` cores.

    Setting ``OPENBLAS_NUM_THREADS`` in the parent is not enough: forked workers inherit the BLAS
    pool the parent loaded at import. Before this, each of 2 workers on a 2-core box ran 2 BLAS
    threads, and every run took 3-4x its single-process time (2 workers finished later than 1).
    """
    limit_compute_threads(1)


def _run_job(job: Job) -> dict:
    ds = get_dataset(job.dataset, seed=job.seed)
    replicate = job.strategy == REPLICATE
    sseed: int | None
    if replicate:
        sseed = job.seed + REPLICATE_SEED_OFFSET
    else:
        sseed = job.seed + job.draw * DRAW_SEED_OFFSET if job.draw else None
    baseline = job.strategy == BASELINE
    cfg = SimConfig(strategy="random" if replicate or baseline else job.strategy, mode=job.mode,
                    budget=job.budget, seed=job.seed, strategy_seed=sseed,
                    learner="ridge-baseline" if baseline else "pairsieve",
                    stream_unpaired=job.stream_unpaired, random_after=job.random_after)
    res = simulate(ds, cfg)
    res["strategy"] = job.strategy
    res["draw"] = job.draw
    return res


def run_matrix(datasets, modes, strategies: dict, seeds: int, budget: int, jobs: int,
               log=print, first_seed: int = 0, random_draws: int = RANDOM_DRAWS,
               stream_unpaired: str = "seen",
               random_after: float | None = TUNED_RANDOM_AFTER) -> list[dict]:
    """Run every (dataset, mode, strategy, seed, random draw) on ``jobs`` processes.

    ``stream_unpaired`` is :attr:`SimConfig.stream_unpaired` of the stream runs: "seen" (the
    default: the learner knows only the items offered so far, as the service does) or "pool".
    ``random_after`` is their :attr:`SimConfig.random_after` (the selector's random tail; None:
    none, as every stream run before round 8 of reports/stream-tuning.md).
    """
    if random_draws < 1:
        raise ValueError(f"random_draws must be >= 1, got {random_draws}")
    if stream_unpaired not in ("seen", "pool"):
        raise ValueError(f"stream_unpaired must be 'seen' or 'pool', got {stream_unpaired!r}")
    todo = [Job(d, m, s, seed, budget, draw, stream_unpaired, random_after)
            for d in datasets for m in modes
            for s in strategies[m] for seed in range(first_seed, first_seed + seeds)
            for draw in range(random_draws if s == "random" else 1)]
    for d in datasets:
        if d not in BUILTIN:
            raise ValueError(f"unknown dataset {d!r}; known: {sorted(BUILTIN)}")
    results = []
    t0 = time.perf_counter()

    def finished(i: int, j: Job, res: dict) -> None:
        results.append(res)
        el = time.perf_counter() - t0
        eta = el / i * (len(todo) - i)
        name = f"{j.strategy} #{j.draw}" if j.draw else j.strategy
        log(f"[{i:4d}/{len(todo)}] {j.dataset:24s} {j.mode:6s} {name:17s} seed {j.seed}"
            f"  r1={res['curve'][-1]['r1']:.3f}  ({res['wall_seconds']:.1f}s, "
            f"elapsed {el/60:.1f} min, eta {eta/60:.1f} min)")

    if jobs == 1:  # in this process (what it has patched or loaded applies)
        for i, j in enumerate(todo, 1):
            finished(i, j, _run_job(j))
        return results
    # "spawn", not fork: a caller that already ran torch (a test session, the demo) holds thread
    # pools a forked child inherits half-initialised; its first parallel op can spin forever
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker,
                             mp_context=multiprocessing.get_context("spawn")) as ex:
        futs = {ex.submit(_run_job, j): j for j in todo}
        for i, f in enumerate(as_completed(futs), 1):
            finished(i, futs[f], f.result())
    return results


def summarize(results: list[dict]) -> list[dict]:
    """One row per (dataset, mode, strategy): savings, AUC, final R@1, modality fraction."""
    rows = []
    keys = sorted({(r["dataset"], r["mode"]) for r in results})
    for dataset, mode in keys:
        group = [r for r in results if r["dataset"] == dataset and r["mode"] == mode]
        rand = [r for r in group if r["strategy"] == "random"]
        if not rand:
            raise ValueError(f"no random runs for {dataset}/{mode}: cannot compute savings")
        budget = rand[0]["budget"]
        grid = np.unique(np.concatenate([curves.curve_xy(r["curve"])[0] for r in rand]))
        grid = grid[grid <= budget]
        ref = np.array([np.nanmean([curves.on_grid(r["curve"], np.array([g]))[0] for r in rand])
                        for g in grid])
        base = [r for r in group if r["strategy"] == BASELINE]
        base_ref = (np.array([np.nanmean([curves.on_grid(r["curve"], np.array([g]))[0]
                                          for r in base]) for g in grid]) if base else None)
        for strategy in sorted({r["strategy"] for r in group}):
            runs = [r for r in group if r["strategy"] == strategy]
            by_seed: dict[int, list[dict]] = {}
            for r in runs:
                by_seed.setdefault(r["seed"], []).append(r)
            seeds = sorted(by_seed)
            # per seed: the mean over its draws (one draw per seed for all but random)
            sv = np.array([np.mean([curves.savings(r["curve"], grid, ref, budget)
                                    for r in by_seed[k]]) for k in seeds])
            au = np.array([np.mean([curves.auc(r["curve"], budget) for r in by_seed[k]])
                           for k in seeds])
            # end to end: pairs needed to reach what random + the ridge baseline reach at the
            # full budget (its mean over seeds), the same metric as the savings vs random
            e2e = (np.array([np.mean([curves.savings(r["curve"], grid, base_ref, budget)
                                      for r in by_seed[k]]) for k in seeds])
                   if base_ref is not None else None)
            # R@1 at the checkpoints, per seed (mean over draws): the learner table
            at = np.array([[np.mean([curves.on_grid(r["curve"], np.array([float(c)]))[0]
                                     for r in by_seed[k]]) for c in CHECKPOINTS]
                           for k in seeds])
            fin = np.array([r["curve"][-1]["r1"] for r in runs])
            mods = list(runs[0]["acquisitions_per_modality"])
            frac0 = np.mean([r["acquisitions_per_modality"][mods[0]]
                             / max(1, sum(r["acquisitions_per_modality"].values())) for r in runs])
            rows.append({"dataset": dataset, "mode": mode, "strategy": strategy,
                         "seeds": len(seeds), "draws": len(runs) // max(1, len(seeds)),
                         "savings_mean": float(sv.mean()),
                         "savings_std": float(sv.std(ddof=1)) if len(sv) > 1 else 0.0,
                         "auc_mean": float(au.mean()), "final_r1_mean": float(fin.mean()),
                         "frac_first_modality": float(frac0), "first_modality": mods[0],
                         "budget": budget, "target_r1": float(ref[-1]),
                         "per_seed": {"seed": [int(k) for k in seeds],
                                      "savings": sv.tolist(), "auc": au.tolist(),
                                      "r1_at": at.tolist(),
                                      **({"vs_baseline": e2e.tolist()} if e2e is not None
                                         else {})},
                         **({"baseline_target_r1": float(base_ref[-1])}
                            if base_ref is not None else {}),
                         "wall_seconds_mean": float(np.mean([r["wall_seconds"] for r in runs]))})
    return rows


def paired_vs_random(rows: list[dict], mode: str, dataset: str, strategy: str) -> dict | None:
    """``strategy`` minus ``random`` seed by seed (same split and stream order for both).

    Returns mean and standard error of the savings and AUC differences over the seeds both ran,
    and on how many of them the strategy's AUC was higher; None when either has no runs.
    """
    def find(name):
        return next((r for r in rows if r["mode"] == mode and r["dataset"] == dataset
                     and r["strategy"] == name), None)

    mine, rand = find(strategy), find("random")
    if mine is None or rand is None:
        return None

    def by_seed(row):
        ps = row["per_seed"]
        return dict(zip(ps["seed"], zip(ps["savings"], ps["auc"], strict=True), strict=True))

    ours, theirs = by_seed(mine), by_seed(rand)
    common = sorted(set(ours) & set(theirs))
    if not common:
        return None
    d = np.array([[ours[k][0] - theirs[k][0], ours[k][1] - theirs[k][1]] for k in common])
    sem = d.std(axis=0, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.zeros(2)
    return {"n": len(d), "savings_diff": float(d[:, 0].mean()), "savings_sem": float(sem[0]),
            "auc_diff": float(d[:, 1].mean()), "auc_sem": float(sem[1]),
            "auc_wins": int(np.sum(d[:, 1] > 0))}


def plot_curves(results: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for mode in sorted({r["mode"] for r in results}):
        dsets = ordered({r["dataset"] for r in results if r["mode"] == mode})
        cols = min(4, len(dsets))
        rows_n = (len(dsets) + cols - 1) // cols
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
        # the grid has rows_n * cols >= len(dsets) cells; the spare ones stay empty
        for ax, d in zip(axes.ravel(), dsets, strict=False):
            group = [r for r in results if r["mode"] == mode and r["dataset"] == d]
            budget = group[0]["budget"]
            grid = np.linspace(0, budget, 61)
            for s in sorted({r["strategy"] for r in group}):
                cs = [r["curve"] for r in group if r["strategy"] == s]
                y = curves.mean_curve(cs, grid)
                style = dict(lw=2.4, color="k") if s == "default" else \
                    dict(lw=1.6, color="0.5", ls="--") if s.startswith("random") else dict(lw=1.0)
                ax.plot(grid, y, label=s, **style)
            ax.set_title(d + (" (real)" if d in REAL else ""), fontsize=10)
            ax.set_xlabel("pairs acquired")
            ax.set_ylabel("R@1 (held out)")
            ax.grid(alpha=0.3)
        for ax in axes.ravel()[len(dsets):]:
            ax.axis("off")
        handles, labels = axes.ravel()[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
        fig.suptitle(f"pairsieve quality benchmark, {mode} mode: mean R@1 over seeds")
        fig.tight_layout(rect=(0, 0.06, 1, 0.96))
        p = out_dir / f"quality-{mode}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def _find(rows, mode, dataset, strategy):
    return next((x for x in rows if x["mode"] == mode and x["dataset"] == dataset
                 and x["strategy"] == strategy), None)


def _real_lead(rows: list[dict]) -> list[str]:
    """The report's first table: ``default`` and one random draw vs ``random`` on the real sets."""
    real = [d for d in ordered({r["dataset"] for r in rows}) if d in REAL]
    if not real:
        return []
    lines = ["## Real data (pretrained encoders) at a glance", "",
             "Per mode and real dataset: the service default and `random-replicate` (one more "
             "random draw: the noise floor) against `random`, paired by seed (mean ± standard "
             "error over seeds); final R@1 at the full budget.", "",
             "| mode | dataset | strategy | % saved | Δ savings vs random (points) | "
             "Δ AUC vs random (x1000) | AUC wins | final R@1 (random) |",
             "|---|---|---|---|---|---|---|---|"]
    for mode in sorted({r["mode"] for r in rows}):
        for d in real:
            rand = _find(rows, mode, d, "random")
            for s in ("default", REPLICATE):
                r, p = _find(rows, mode, d, s), paired_vs_random(rows, mode, d, s)
                if r is None or p is None or rand is None:
                    continue
                lines.append(
                    f"| {mode} | {d} | {s} | {100*r['savings_mean']:+.0f} ± "
                    f"{100*r['savings_std']:.0f} | {100*p['savings_diff']:+.1f} ± "
                    f"{100*p['savings_sem']:.1f} | {1000*p['auc_diff']:+.1f} ± "
                    f"{1000*p['auc_sem']:.1f} | {p['auc_wins']}/{p['n']} | "
                    f"{r['final_r1_mean']:.3f} ({rand['final_r1_mean']:.3f}) |")
    return lines + [""]


def _seed_values(row: dict, key: str) -> dict[int, Any]:
    ps = row["per_seed"]
    return dict(zip(ps["seed"], ps[key], strict=True)) if key in ps else {}


def _mean_sem(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def _baseline_tables(rows: list[dict]) -> list[str]:
    """Issue 13's two readings against the plain ridge baseline (strategy ``ridge-baseline``):
    the learner alone (same random picks, R@1 at each checkpoint, paired by seed) and end to end
    (pairs pairsieve needs to reach the baseline's R@1 at the full budget)."""
    have = {(r["mode"], r["dataset"]) for r in rows if r["strategy"] == BASELINE}
    pairs = [(m, d) for m in sorted({m for m, _ in have})
             for d in ordered({d for _, d in have}) if (m, d) in have]
    if not pairs:
        return []
    lines = ["## Against the plain ridge baseline (issue 13)", "",
             f"`{BASELINE}`: random picks (the same as `random`'s first draw), two ridge maps "
             "a->b and b->a, lambda by leave-one-out on the acquired pairs, a pair scored by the "
             "mean of both cosines (`service/evaluation/ridge_baseline.py`).", "",
             "**The learner alone**: mean R@1 of `random` (pairsieve's learner, mean of its "
             "draws) and of the baseline at each number of acquisitions; Δ paired by seed, "
             "± standard error.", "",
             "| mode | dataset | " + " | ".join(f"R@1 at {c}: pairsieve / baseline (Δ)"
                                              for c in CHECKPOINTS) + " |",
             "|---|---|" + "---|" * len(CHECKPOINTS)]
    for mode, d in pairs:
        ours, base = _find(rows, mode, d, "random"), _find(rows, mode, d, BASELINE)
        if ours is None or base is None or "r1_at" not in ours["per_seed"]:
            continue
        a, b = _seed_values(ours, "r1_at"), _seed_values(base, "r1_at")
        common = sorted(set(a) & set(b))
        cells = []
        for i in range(len(CHECKPOINTS)):
            x = np.asarray([a[k][i] for k in common], dtype=np.float64)
            y = np.asarray([b[k][i] for k in common], dtype=np.float64)
            ok = ~(np.isnan(x) | np.isnan(y))  # a checkpoint past the budget or the curve
            if not ok.any():
                cells.append("–")
                continue
            m, se = _mean_sem(x[ok] - y[ok])
            cells.append(f"{x[ok].mean():.3f} / {y[ok].mean():.3f} ({m:+.3f} ± {se:.3f})")
        lines.append(f"| {mode} | {d} | " + " | ".join(cells) + " |")
    lines += ["", "**End to end** (what a user saves): % fewer acquisitions than the budget "
              "that pairsieve (its learner + the strategy) needs to reach the R@1 that random "
              "pairs + the baseline reach at the full budget; mean ± standard error over seeds. "
              "Issue 13's goal: >= 40 % on every real set, pool and stream.", "",
              "| mode | dataset | baseline's R@1 at the budget | default | random | "
              "random-replicate |", "|---|---|---|---|---|---|"]
    for mode, d in pairs:
        cells = []
        target = None
        for s in ("default", "random", REPLICATE):
            r = _find(rows, mode, d, s)
            v = list(_seed_values(r, "vs_baseline").values()) if r is not None else []
            if not v:
                cells.append("–")
                continue
            target = r.get("baseline_target_r1", target)
            m, se = _mean_sem(v)
            cells.append(f"{100*m:+.0f} ± {100*se:.0f}")
        tgt = f"{target:.3f}" if target is not None else "–"
        lines.append(f"| {mode} | {d} | {tgt} | " + " | ".join(cells) + " |")
    return lines + [""]


_UNPAIRED = {"seen": "the items offered so far, as in the service",
             "pool": "the whole pool from the start (optimistic)"}


def _tail_words(random_after: float | None) -> str:
    """The header's words for the stream selector's random tail (results written before it
    existed have no ``random_after``: no tail)."""
    if random_after is None:
        return "no random tail"
    return f"random tail after {random_after:.3g} of the budget"


def write_report(results: list[dict], rows: list[dict], out_dir: Path, meta: dict) -> Path:
    learnable = {d: describe(get_dataset(d)).get("learnable", True)
                 for d in ordered({r["dataset"] for r in results})}
    lines = ["# pairsieve quality benchmark", "",
             f"Generated by `{meta['command']}` on {meta['machine']} in {meta['minutes']:.1f} min "
             f"({meta['runs']} runs, {meta['seeds']} seeds, budget {meta['budget']} acquisitions, "
             f"{meta.get('random_draws', 1)} random draws per seed; stream learner's unpaired "
             f"data: {_UNPAIRED[meta.get('stream_unpaired', 'pool')]}; stream selector: "
             f"{_tail_words(meta.get('random_after'))})."
             + "".join(f" Then `{r['command']}` re-ran {r['runs']} of them ({r['minutes']:.1f} "
                       "min)." for r in meta.get("reruns", [])),
             "",
             "**% pairs saved vs random** = 1 - (acquisitions the strategy needs to reach the R@1 "
             "that random reaches at the full budget) / budget; mean ± std over seeds. Negative = "
             "never reached it (the shortfall read off the random curve). `random` is the mean of "
             f"{meta.get('random_draws', 1)} independent random draws per seed (its curve and R@1 "
             "target too); `random-replicate` is one more independent draw on the same splits: "
             "what a single random run gives, the noise floor. AUC = mean R@1 "
             "over the budget. `a-share` = fraction of acquisitions that picked an item of the "
             "first modality. Real datasets (marked *real*) come first in every table.", ""]
    lines += _real_lead(rows)
    lines += _baseline_tables(rows)
    for mode in sorted({r["mode"] for r in rows}):
        lines += [f"## {mode} mode", ""]
        dsets = ordered({r["dataset"] for r in rows if r["mode"] == mode})
        real = [d for d in dsets if d in REAL and learnable[d]]
        strategies = sorted({r["strategy"] for r in rows if r["mode"] == mode},
                            key=lambda s: (s != "default", not s.startswith("random"), s))

        def label(d):
            return d + (" (real)" if d in REAL else "") + ("" if learnable[d] else " (control)")

        head = "| strategy | " + " | ".join(label(d) for d in dsets) + " |"
        means = " mean real | mean all |" if real else " mean |"
        lines += ["### % pairs saved vs random (mean ± std)", "", head + means,
                  "|" + "---|" * (len(dsets) + 1 + (2 if real else 1))]
        for s in strategies:
            cells, vals, real_vals = [], [], []
            for d in dsets:
                r = _find(rows, mode, d, s)
                if r is None:
                    cells.append("–")
                    continue
                if learnable[d]:
                    vals.append(r["savings_mean"])
                    if d in real:
                        real_vals.append(r["savings_mean"])
                cells.append(f"{100*r['savings_mean']:+.0f} ± {100*r['savings_std']:.0f}")
            fmt = lambda v: f"{100*np.mean(v):+.1f}" if v else "–"  # noqa: E731
            tail = f" {fmt(real_vals)} | {fmt(vals)} |" if real else f" {fmt(vals)} |"
            lines.append(f"| {s} | " + " | ".join(cells) + " |" + tail)
        lines += ["", "### AUC of R@1 / final R@1 / a-share", "", head,
                  "|" + "---|" * (len(dsets) + 1)]
        for s in strategies:
            cells = []
            for d in dsets:
                r = _find(rows, mode, d, s)
                cells.append("–" if r is None else
                             f"{r['auc_mean']:.3f} / {r['final_r1_mean']:.3f} / "
                             f"{r['frac_first_modality']:.2f}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines += ["", "### default and the noise floor vs random, paired by seed", "",
                  "Per seed, the strategy's value minus `random`'s on the same split and stream "
                  "order; mean ± standard error over seeds. `AUC wins` = seeds on which its AUC "
                  "is higher. `random-replicate` shows what pure chance gives.", "",
                  "| strategy | dataset | Δ savings (points) | Δ AUC (x1000) | AUC wins |",
                  "|---|---|---|---|---|"]
        for s in ("default", REPLICATE):
            for d in dsets:
                p = paired_vs_random(rows, mode, d, s) if learnable[d] else None
                if p is not None:
                    lines.append(f"| {s} | {label(d)} | {100*p['savings_diff']:+.1f} ± "
                                 f"{100*p['savings_sem']:.1f} | {1000*p['auc_diff']:+.1f} ± "
                                 f"{1000*p['auc_sem']:.1f} | {p['auc_wins']}/{p['n']} |")
        lines += ["", f"![learning curves, {mode} mode](quality-{mode}.png)", ""]
    lines += _orphan_lines(meta.get("orphans"))
    lines += ["## Datasets", ""]
    for d in learnable:
        info = describe(get_dataset(d))
        lines.append(f"- **{d}** ({info['n']} rows, d_a={info['d_a']}, d_b={info['d_b']}, "
                     f"paired {info['n_paired']}): {info['description']}")
    lines.append("")
    md_path = out_dir / "quality.md"
    md_path.write_text("\n".join(lines) + meta.get("notes", ""))
    return md_path


def main(argv_datasets=None, modes=("pool", "stream"), seeds=5, budget=300, jobs=2,
         out_dir="reports", strategies=None, command="make bench-quality", log=print,
         first_seed: int = 0, random_draws: int = RANDOM_DRAWS,
         stream_unpaired: str = "seen", random_after: float | None = TUNED_RANDOM_AFTER) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets = tuple(argv_datasets or DEFAULT_DATASETS)
    strategies = strategies or DEFAULT_STRATEGIES
    t0 = time.perf_counter()
    results = run_matrix(datasets, modes, strategies, seeds, budget, jobs, log, first_seed,
                         random_draws, stream_unpaired, random_after)
    rows = summarize(results)
    meta = {"command": command, "machine": _machine(), "minutes": (time.perf_counter() - t0) / 60,
            "runs": len(results), "seeds": seeds, "budget": budget, "random_draws": random_draws,
            "stream_unpaired": stream_unpaired, "random_after": random_after}
    _write_results(out / RESULTS, {"rows": rows, "runs": results, "meta": meta})
    plot_curves(results, out)
    p = write_report(results, rows, out, _with_notes(meta, out))
    log(f"wrote {p}")
    return p


RESULTS = "quality-results.json.gz"


def _write_results(path: Path, data: dict) -> None:
    # mtime=0: the same results give the same bytes (no spurious diff in git)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(json.dumps(data).encode())


def read_results(path: str | os.PathLike) -> dict:
    """The raw results of a run (``quality-results.json.gz``): ``rows``, ``runs``, ``meta``."""
    with gzip.open(path, "rt") as f:
        return json.load(f)


def _with_notes(meta: dict, out: Path) -> dict:
    notes_file = out / "quality-notes.md"
    return {**meta, "notes": ("\n" + notes_file.read_text()) if notes_file.exists() else ""}


def rewrite_report(out_dir="reports", log=print) -> Path:
    """Rebuild ``quality.md`` and its figures from ``quality-results.json.gz`` (and the current
    ``quality-notes.md``) without running anything: for editing the notes after a run.

    Raises
    ------
    ValueError
        No results file in ``out_dir``, or one without ``meta`` (written before it was
        recorded): rerun the benchmark.
    """
    out = Path(out_dir)
    path = out / RESULTS
    if not path.exists():
        raise ValueError(f"{path} not found: run `pairsieve bench-quality` first")
    data = read_results(path)
    if "meta" not in data:
        raise ValueError(f"{path} has no 'meta' (the command, machine and run time of the run): "
                         "rerun `pairsieve bench-quality`")
    plot_curves(data["runs"], out)
    p = write_report(data["runs"], data["rows"], out, _with_notes(data["meta"], out))
    log(f"rewrote {p} and its learning-curve figures from {path}")
    return p


def rerun_strategy(mode: str, strategy: str, out_dir="reports", jobs: int = 2,
                   command: str = "", log=print,
                   random_after: float | None = TUNED_RANDOM_AFTER) -> Path:
    """Re-run one ``strategy`` in one ``mode`` for every dataset and seed of the results in
    ``out_dir`` and rebuild the report: after a change that moves only that strategy (e.g. the
    pool default), the other arms' runs are deterministic and stay as they were.

    The report's header names both commands. ``random_after``: the stream selector's random tail
    in the new runs (the other stream arms of the report do not use the selector), recorded in
    the results' meta. Raises ``ValueError`` when there are no results or they hold no run of
    ``strategy`` in ``mode`` (nothing to replace).
    """
    out = Path(out_dir)
    path = out / RESULTS
    if not path.exists():
        raise ValueError(f"{path} not found: run `pairsieve bench-quality` first")
    if strategy == "random":
        raise ValueError("random is every strategy's reference (and has several draws): "
                         "re-run the whole matrix instead")
    data = read_results(path)
    old = [r for r in data["runs"] if r["mode"] == mode and r["strategy"] == strategy]
    if not old:
        raise ValueError(f"{path} has no {mode} runs of {strategy!r} to re-run")
    datasets = tuple(ordered({r["dataset"] for r in old}))
    seeds = sorted({r["seed"] for r in old})
    budgets = {r["budget"] for r in old}
    if seeds != list(range(seeds[0], seeds[0] + len(seeds))) or len(budgets) != 1:
        raise ValueError(f"{path}: {mode} runs of {strategy!r} have seeds {seeds} and budgets "
                         f"{sorted(budgets)}; --rerun needs one budget and consecutive seeds")
    t0 = time.perf_counter()
    # results written before the key existed ran the stream with the whole pool as unpaired data
    new = run_matrix(datasets, (mode,), {mode: (strategy,)}, len(seeds), budgets.pop(), jobs,
                     log, seeds[0], 1, data["meta"].get("stream_unpaired", "pool"), random_after)
    runs = [r for r in data["runs"] if not (r["mode"] == mode and r["strategy"] == strategy)]
    runs += sorted(new, key=lambda r: (r["dataset"], r["seed"]))  # completion order varies
    rows = summarize(runs)
    minutes = (time.perf_counter() - t0) / 60
    reruns = [*data["meta"].get("reruns", []),
              {"command": command, "runs": len(new), "minutes": round(minutes, 1)}]
    meta = {**data["meta"], "reruns": reruns, "random_after": random_after}
    _write_results(path, {"rows": rows, "runs": runs, "meta": meta})
    plot_curves(runs, out)
    p = write_report(runs, rows, out, _with_notes(meta, out))
    log(f"re-ran {len(new)} {mode} runs of {strategy}; wrote {p}")
    return p


ORPHAN_DATASET = "synthetic-missing"
ORPHAN_BUDGET = 150


def orphan_check(out_dir="reports", seeds: int = 20, jobs: int = 2, first_seed: int = 0,
                 command: str = "", log=print) -> Path:
    """Acquisitions spent on partnerless items (annotators answer NO_MATCH) by ``default`` and
    ``random`` on ``synthetic-missing`` (20 % of the rows are orphans), both modes, paired by
    seed; stored in the results' meta and rendered in ``quality.md`` (section "Orphan
    acquisitions"). The stream selector hears each NO_MATCH as the service does.

    Raises ``ValueError`` when ``out_dir`` has no results (run the benchmark first).
    """
    out = Path(out_dir)
    path = out / RESULTS
    if not path.exists():
        raise ValueError(f"{path} not found: run `pairsieve bench-quality` first")
    data = read_results(path)
    t0 = time.perf_counter()
    runs = run_matrix((ORPHAN_DATASET,), ("pool", "stream"),
                      {"pool": ("default", "random"), "stream": ("default", "random")}, seeds,
                      ORPHAN_BUDGET, jobs, log, first_seed, 1,
                      data["meta"].get("stream_unpaired", "pool"), data["meta"].get("random_after"))
    summary = sorted(({"mode": r["mode"], "strategy": r["strategy"], "seed": r["seed"],
                       "no_match": int(r["no_match"]), "wasted": int(r["wasted"])}
                      for r in runs), key=lambda r: (r["mode"], r["strategy"], r["seed"]))
    meta = {**data["meta"], "orphans": {
        "command": command, "dataset": ORPHAN_DATASET, "budget": ORPHAN_BUDGET,
        "minutes": round((time.perf_counter() - t0) / 60, 1), "runs": summary}}
    _write_results(path, {**data, "meta": meta})
    p = write_report(data["runs"], data["rows"], out, _with_notes(meta, out))
    log(f"orphan check: {len(runs)} runs; wrote {p}")
    return p


def _orphan_lines(orphans: dict | None) -> list[str]:
    """The report's section on acquisitions of partnerless items (empty without a check)."""
    if not orphans:
        return []
    lines = ["## Orphan acquisitions (missing modality)", "",
             f"`{orphans['command']}` ({orphans['minutes']:.1f} min): acquisitions spent on "
             f"items without a partner (the annotator answers NO_MATCH) out of "
             f"{orphans['budget']}, on `{orphans['dataset']}` (20 % of its rows are orphans); "
             "mean ± standard error over seeds, Δ = default − random paired by seed. The stream "
             "selector hears each NO_MATCH (items like it lose utility); the pool strategies do "
             "not.", "",
             "| mode | default | random | Δ (paired) | default fewer on |",
             "|---|---|---|---|---|"]
    for mode in ("pool", "stream"):
        by = {s: {r["seed"]: r["no_match"] for r in orphans["runs"]
                  if r["mode"] == mode and r["strategy"] == s} for s in ("default", "random")}
        seeds = sorted(set(by["default"]) & set(by["random"]))
        if not seeds:
            continue
        d = np.array([by["default"][k] for k in seeds], float)
        r = np.array([by["random"][k] for k in seeds], float)
        lines.append(f"| {mode} | {d.mean():.1f} ± {_sem(d):.1f} | {r.mean():.1f} ± "
                     f"{_sem(r):.1f} | {(d - r).mean():+.1f} ± {_sem(d - r):.1f} | "
                     f"{int((d < r).sum())}/{len(seeds)} |")
    return lines + [""]


def _sem(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0


def _machine() -> str:
    import platform

    return f"{platform.machine()} Linux, {os.cpu_count()} cores, Python {sys.version.split()[0]}"
