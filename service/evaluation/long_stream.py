"""``make bench-long-stream``: one long real stream in dataset order, learning curve + per-item
cost.

The whole Bible (``bible-en-es-full``: ~30k verse pairs, ~60k unimodal events) streamed in
canonical book order is a drifting stream: Genesis first, the Gospels late. Each seed draws its
own held-out test pairs (spread over all books) and streams the rest, both modalities of nearby
verses interleaved; ``default`` (the service's stream selector) and ``random`` (selection
sampling, exactly the budget) see the same stream for the same seed, so their curves are
paired. Along the stream it records, at every retrain, the items offered so far and the
seconds spent in the selector's propose + commit and in retrain + evaluation: the per-item
selection cost over tens of thousands of events, on the real data, not a synthetic stream.

Writes ``reports/long-stream.md``, ``reports/long-stream.png`` (R@1 against pairs, and
microseconds per offered item against the stream position) and the raw runs as JSON.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from service.core.selector import SelectorConfig
from service.evaluation import curves
from service.evaluation.datasets import describe, get_dataset
from service.evaluation.quality import _init_worker
from service.evaluation.simulator import SimConfig, simulate

# default: the service's stream selector (with its drift decay); default-no-decay: the same
# without the cache half-life (the drift comparison of issue 13); random: selection sampling
STRATEGIES = ("default", "default-no-decay", "random")


def run(dataset: str = "bible-en-es-full", budget: int = 3000,
        seeds: Sequence[int] = tuple(range(10)),
        retrain_every: int = 100, test_size: int = 500,
        log: Callable[[str], None] = print,
        strategies: Sequence[str] = STRATEGIES, jobs: int = 1) -> dict:
    """Stream ``dataset`` in its row order once per seed and strategy; return the raw runs.

    Parameters
    ----------
    dataset : str
        A built-in dataset name (its rows in a meaningful order, e.g. canonical book order).
    budget : int
        Acquisitions per run.
    seeds : sequence of int
        One run per seed and strategy; a seed fixes the test split and the stream.
    retrain_every : int
        Acquisitions between retrains (each is also a curve point and a cost sample).
    test_size : int
        Held-out pairs for recall.
    log : callable
        Progress lines.
    strategies : sequence of str
        Stream strategies; ``default`` and ``random`` are required (the report compares them).
    jobs : int
        Runs in parallel (processes, one compute thread each).

    Returns
    -------
    dict
        ``dataset``, ``info`` (:func:`describe`), ``budget``, ``seeds``, ``runs`` (simulate
        results, each with ``curve`` and ``cost``), ``minutes``.
    """
    if not seeds:
        raise ValueError("seeds is empty")
    missing = [s for s in ("default", "random") if s not in strategies]
    if missing:
        raise ValueError(f"strategies must include {missing}, got {list(strategies)}")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    ds = get_dataset(dataset)
    t0 = time.perf_counter()
    runs = []
    todo = [SimConfig(strategy=strategy, mode="stream", budget=budget, seed=seed,
                      stream_order="dataset", retrain_every=retrain_every, test_size=test_size)
            for seed in seeds for strategy in strategies]

    def done(res: dict) -> None:
        events = res["cost"][-1]["offered"]
        log(f"{dataset} {res['strategy']:16s} seed {res['seed']}: R@1 "
            f"{res['curve'][-1]['r1']:.3f} at {res['curve'][-1]['pairs']} pairs after {events} "
            f"events ({res['wall_seconds']:.0f}s, elapsed "
            f"{(time.perf_counter() - t0) / 60:.1f} min)")
        runs.append(res)

    if jobs == 1:
        for cfg in todo:
            done(simulate(ds, cfg, progress=None))
    else:
        # Fresh ("spawn") processes with one compute thread each, each loading the dataset once.
        # Not fork: a caller that already ran torch (a test session) holds thread pools that a
        # forked child inherits half-initialised, and its first parallel op can spin forever.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                                 initializer=_init_worker) as ex:
            for fut in as_completed([ex.submit(_simulate_named, dataset, cfg) for cfg in todo]):
                done(fut.result())
    runs.sort(key=lambda r: (r["seed"], list(strategies).index(r["strategy"])))
    return {"dataset": dataset, "info": describe(ds), "budget": budget, "seeds": list(seeds),
            "retrain_every": retrain_every, "strategies": list(strategies), "jobs": jobs,
            "half_life": SelectorConfig().cache_half_life, "runs": runs,
            "minutes": (time.perf_counter() - t0) / 60}


def per_item_cost(cost: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Microseconds of propose + commit per offered item between consecutive cost samples.

    Returns ``(offered_at_segment_end, us_per_item)``, both (m,), for the segments that
    offered at least one item.
    """
    off = np.array([c["offered"] for c in cost], dtype=np.float64)
    sec = np.array([c["select_seconds"] for c in cost], dtype=np.float64)
    d_off, d_sec = np.diff(off), np.diff(sec)
    keep = d_off > 0
    return off[1:][keep], 1e6 * d_sec[keep] / d_off[keep]


def _by_strategy(res: dict, strategy: str) -> list[dict]:
    return sorted((r for r in res["runs"] if r["strategy"] == strategy), key=lambda r: r["seed"])


def _at(curve: list[dict], pairs: int) -> float:
    """R@1 of ``curve`` at ``pairs`` (interpolated), or at its last point when it ended before."""
    if pairs >= curve[-1]["pairs"]:
        return float(curve[-1]["r1"])
    return float(curves.on_grid(curve, np.array([pairs]))[0])


@functools.lru_cache(maxsize=2)
def _dataset(name: str):
    return get_dataset(name)


def _simulate_named(dataset: str, cfg: SimConfig) -> dict:
    """One run in a worker process (the dataset loaded once per process)."""
    return simulate(_dataset(dataset), cfg)


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def checkpoints(budget: int) -> list[int]:
    """Pair counts the report's table reads the curves at (a rough doubling up to ``budget``)."""
    out = [p for p in (100, 250, 500, 1000, 2000, 3000, 5000, 10000) if p < budget]
    return out + [budget]


def write_report(res: dict, out: Path, command: str) -> Path:
    """Write ``out`` (markdown), ``out``'s ``.png`` and ``-results.json`` beside it; the
    hand-written findings in ``<out stem>-notes.md`` beside ``out``, if any, are appended."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res["command"] = command
    budget, info = res["budget"], res["info"]
    ours, rand = _by_strategy(res, "default"), _by_strategy(res, "random")
    flat = _by_strategy(res, "default-no-decay")  # empty in reports made before the decay
    seeds = [r["seed"] for r in ours]
    n = len(seeds)
    events = int(np.median([r["cost"][-1]["offered"] for r in ours]))
    lines = ["# pairsieve on one long real stream", "",
             f"Generated by `{command}` in {res['minutes']:.1f} min ({res.get('jobs', 1)} "
             f"run(s) at a time, one compute thread each). Dataset **{res['dataset']}** "
             f"({info['n']} pairs: {info['description']}), streamed in its row order (for the "
             f"Bible, canonical book order: a drifting stream), both modalities of nearby rows "
             f"interleaved; "
             f"{ours[0]['test_size']} held-out pairs per seed, drawn from all books. Budget "
             f"{budget} acquisitions, retrain every {res['retrain_every']}; seeds {seeds}; "
             f"`default` (the service's stream selector) and `random` (exactly the budget, "
             f"uniformly over the offered items) see the same stream per seed. `default` "
             f"consumed a median {events} events to spend its budget.", "",
             "## Learning curve (R@1 on the held-out pairs)", "",
             "Mean over seeds; Δ = default − random paired by seed, ± standard error. A run "
             "that ran out of stream a few pairs short of a checkpoint is read at its last "
             "point.", "",
             "| pairs | default | random | Δ (x1000) | default wins |"
             + (" no decay | Δ decay − no decay (x1000) |" if flat else ""),
             "|---|---|---|---|---|" + ("---|---|" if flat else "")]
    for p in checkpoints(budget):
        a = np.array([_at(r["curve"], p) for r in ours])
        b = np.array([_at(r["curve"], p) for r in rand])
        d = a - b
        row = (f"| {p} | {np.nanmean(a):.3f} | {np.nanmean(b):.3f} | "
               f"{1000 * np.nanmean(d):+.1f} ± {1000 * _se(d):.1f} | {int(np.sum(d > 0))}/{n} |")
        if flat:
            c = np.array([_at(r["curve"], p) for r in flat])
            row += (f" {np.nanmean(c):.3f} | {1000 * np.nanmean(a - c):+.1f} ± "
                    f"{1000 * _se(a - c):.1f} |")
        lines.append(row)
    auc = np.array([curves.auc(a["curve"], budget) - curves.auc(b["curve"], budget)
                    for a, b in zip(ours, rand, strict=True)])
    auc_se = _se(auc)
    saved = np.array([curves.savings(a["curve"], *curves.curve_xy(b["curve"]), budget)
                      for a, b in zip(ours, rand, strict=True)])
    saved_se = _se(saved)
    lines += ["", f"AUC of R@1 over the budget, default − random: {1000 * auc.mean():+.1f} ± "
              f"{1000 * auc_se:.1f} (x1000), higher on {int(np.sum(auc > 0))}/{n} seeds.", "",
              f"Pairs saved: default reaches the R@1 that random has at {budget} pairs with "
              f"**{100 * saved.mean():+.0f} ± {100 * saved_se:.0f} %** fewer acquisitions (mean ± "
              f"standard error over seeds, each seed against its own random run; negative = "
              f"never reached it).", ""]
    if flat:
        da = np.array([curves.auc(a["curve"], budget) - curves.auc(c["curve"], budget)
                       for a, c in zip(ours, flat, strict=True)])
        ds = np.array([curves.savings(a["curve"], *curves.curve_xy(c["curve"]), budget)
                       for a, c in zip(ours, flat, strict=True)])
        hl = res.get("half_life")
        lines += [f"**Drift decay.** `default` ages its selections (cache half-life "
                  f"{hl if hl else '?'} items offered); `default-no-decay` is the same selector "
                  f"without it. AUC of R@1, decay − no decay: {1000 * da.mean():+.1f} ± "
                  f"{1000 * _se(da):.1f} (x1000), higher on {int(np.sum(da > 0))}/{n} seeds; "
                  f"pairs saved against no decay at {budget}: {100 * ds.mean():+.0f} ± "
                  f"{100 * _se(ds):.0f} %.", ""]
    lines += ["## Per-item cost along the stream (default)", "",
              "Microseconds of `propose` + `commit` per offered item, per tenth of the stream "
              "(median over seeds of each tenth's mean; the model is swapped in at every "
              "retrain). Retrain + evaluation time is listed apart: it is paid per retrain, not "
              "per item.", "",
              "| stream tenth | events (end) | µs / item | retrain + eval s (cumulative) |",
              "|---|---|---|---|"]
    tenths = []
    for r in ours:
        c = r["cost"]
        off = np.array([x["offered"] for x in c], dtype=np.float64)
        sec = np.array([x["select_seconds"] for x in c])
        tr = np.array([x["train_seconds"] for x in c])
        edges = np.linspace(0, off[-1], 11)
        sel_at, tr_at = np.interp(edges, off, sec), np.interp(edges, off, tr)
        per = 1e6 * np.diff(sel_at) / np.maximum(np.diff(edges), 1)
        tenths.append((edges[1:], per, tr_at[1:]))
    for i in range(10):
        lines.append(f"| {i + 1} | {int(np.median([t[0][i] for t in tenths]))} | "
                     f"{np.median([t[1][i] for t in tenths]):.0f} | "
                     f"{np.median([t[2][i] for t in tenths]):.1f} |")
    first, last = (np.median([t[1][i] for t in tenths]) for i in (0, 9))
    lines += ["", f"Last tenth / first tenth (µs per item): {last / first:.2f}.", "",
              f"![learning curve and per-item cost]({out.with_suffix('.png').name})", ""]
    notes = out.parent / (out.stem + "-notes.md")  # findings written by hand, kept across runs
    out.write_text("\n".join(lines) + (("\n" + notes.read_text()) if notes.exists() else ""))
    (out.parent / (out.stem + "-results.json")).write_text(json.dumps(res))
    _plot(res, out.with_suffix(".png"))
    return out


def rerender(out: Path) -> Path:
    """Write ``out`` again from its ``-results.json`` (e.g. after editing the notes), keeping
    the command that produced the results (read from the report when the JSON predates it).

    Raises
    ------
    FileNotFoundError
        No results beside ``out``.
    """
    out = Path(out)
    res = json.loads((out.parent / (out.stem + "-results.json")).read_text())
    command = res.get("command")
    if command is None and out.exists():
        m = re.search(r"Generated by `([^`]+)`", out.read_text())
        command = m.group(1) if m else None
    return write_report(res, out, command or "pairsieve bench-long-stream (command unknown)")


def _plot(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = res["budget"]
    grid = np.linspace(0, budget, 101)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for s, style in (("default", dict(lw=2.2, color="k")),
                     ("default-no-decay", dict(lw=1.4, color="tab:orange")),
                     ("random", dict(lw=1.6, color="0.5", ls="--"))):
        runs = _by_strategy(res, s)
        if not runs:
            continue
        ax.plot(grid, curves.mean_curve([r["curve"] for r in runs], grid), label=s, **style)
    ax.set_xlabel("pairs acquired")
    ax.set_ylabel("R@1 (held out)")
    ax.set_title(f"{res['dataset']} in row order: mean over {len(res['seeds'])} seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    for r in _by_strategy(res, "default"):
        x, y = per_item_cost(r["cost"])
        bx.plot(x, y, lw=1.0, label=f"seed {r['seed']}")
    bx.set_xlabel("events offered")
    bx.set_ylabel("µs per item (propose + commit)")
    bx.set_title("default: per-item selection cost along the stream")
    bx.set_ylim(bottom=0)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
