"""Per-item cost of the streaming selector over a long stream (``pairsieve bench-stream-cost``).

Generates a seeded two-modality stream on the fly (nothing is held in memory but one batch),
pushes it through :class:`~service.core.selector.StreamingSelector` with a realistic
configuration (d = 384/256, k = 64, K = C = 4096, micro-batch 256, target rate 5%, no total
budget so the caches fill up and evict), and reports items/s and resident memory per segment.
The claim checked: the cost per item does not grow with the stream (last / first segment
throughput >= 0.9) and memory is flat after warm-up.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import numpy as np

from service.core.types import FeatureItem
from service.perfbench.fixtures import (
    EMB_DIM,
    TwoViewStream,
    build_selector,
    fit_data,
    machine_info,
)

D_A, D_B = 384, 256   # the two views' dimensions
TARGET_RATE = 0.05    # lower than the engine grid's: a long stream, a realistic rate


def _rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(items=1_000_000, segment=50_000, batch=256, capacity=4096, index_size=4096, seed=0,
        warmup_items=150_000, log=print) -> dict:
    """Stream ``warmup_items`` (reported, not measured), then ``items`` measured in segments.

    The warm-up fills the bounded structures (C-vector caches, K-item indexes, windows) so that
    the measured segments all run at steady state: before the caches are full a batch costs less
    (fewer cached vectors, no evictions), which says nothing about growth with stream length.
    """
    from service.threads import limit_compute_threads

    limit_compute_threads(1)  # torch and BLAS (the cache's numpy upkeep too), as the service
    stream = TwoViewStream(D_A, D_B, seed=seed)
    sel = build_selector(fit_data(stream), index_size=index_size, cache_capacity=capacity,
                         target_rate=TARGET_RATE, seed=seed)
    warm = 0
    t_w = time.perf_counter()
    while warm < warmup_items:
        xa, xb = stream.pairs(batch)
        side = stream.rng.random(batch) < 0.5
        sel.commit(sel.propose([FeatureItem(f"w{warm + i}", "image", xa[i]) if side[i]
                                else FeatureItem(f"w{warm + i}", "text", xb[i])
                                for i in range(batch)]))
        warm += batch
    st = sel.status()
    log(f"warm-up: {warm:,d} items in {time.perf_counter() - t_w:.1f}s, cache fill "
        f"{min(st['cache_fill'].values()):.2f}, evictions {sum(st['cache_evictions'].values())}, "
        f"rss {_rss_mib():.0f} MiB")
    segments = []
    done = 0
    seg_n, seg_time = 0, 0.0  # selector time only: generating the stream is not counted
    while done < items:
        n = min(batch, items - done)
        xa, xb = stream.pairs(n)
        side = stream.rng.random(n) < 0.5
        batch_items = [FeatureItem(str(done + i), "image", xa[i]) if side[i]
                       else FeatureItem(str(done + i), "text", xb[i]) for i in range(n)]
        t = time.perf_counter()
        sel.commit(sel.propose(batch_items))
        seg_time += time.perf_counter() - t
        seg_n += n
        done += n
        if seg_n >= segment or done == items:
            st = sel.status()
            segments.append({"end": done, "items_per_s": seg_n / seg_time, "rss_mib": _rss_mib(),
                             "cache_fill": min(st["cache_fill"].values()),
                             "evictions": sum(st["cache_evictions"].values()),
                             "acceptance_rate": st["acceptance_rate"]})
            s = segments[-1]
            log(f"{done:>9,d} items  {s['items_per_s']:8.0f} items/s  rss {s['rss_mib']:.0f} MiB  "
                f"cache fill {s['cache_fill']:.2f}  evictions {s['evictions']}  "
                f"accept {s['acceptance_rate']:.3f}")
            seg_n, seg_time = 0, 0.0
    rates = [s["items_per_s"] for s in segments]
    k = max(1, min(5, len(rates) // 4))
    return {"items": items, "segment": segment, "batch": batch, "capacity": capacity,
            "index_size": index_size, "warmup_items": warm, "segments": segments,
            "last_over_first": rates[-1] / rates[0],
            "median_last_over_first": float(np.median(rates[-k:]) / np.median(rates[:k])),
            "median_window": k,
            "median_items_per_s": float(np.median(rates)),
            "rss_growth_mib": segments[-1]["rss_mib"] - segments[0]["rss_mib"]}


def write_report(res: dict, path: str | os.PathLike, command: str) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ok = "meets" if res["median_last_over_first"] >= 0.9 else "does NOT meet"
    m = machine_info()
    lines = ["# Streaming selector: cost vs stream length", "",
             f"Command: `{command}`  ",
             f"Machine: {m['arch']}, {m['cores']} cores (shared, noisy), "
             f"torch {m['torch']} CPU, 1 thread.  ",
             f"Setup: d = {D_A} / {D_B}, k = {EMB_DIM}, K = {res['index_size']}, "
             f"C = {res['capacity']}, micro-batch {res['batch']}, target rate {TARGET_RATE:.0%}, "
             "no total budget (caches fill and evict). "
             f"A {res['warmup_items']:,}-item warm-up fills the caches first (not measured: a "
             f"half-empty cache is cheaper and says nothing about growth).", "",
             f"**last / first segment throughput: median of {res['median_window']} segments each "
             f"= {res['median_last_over_first']:.3f}** ({ok} the >= 0.9 target); single segments "
             f"{res['last_over_first']:.3f}. Median {res['median_items_per_s']:.0f} items/s. "
             f"RSS change over the measured 1M items: {res['rss_growth_mib']:+.1f} MiB.", "",
             "The machine is shared (2 cores, other jobs running), so single segments vary by "
             "+-20%; compare medians.", "",
             "| items | items/s (segment) | RSS MiB | cache fill | evictions | acceptance |",
             "|---:|---:|---:|---:|---:|---:|"]
    for s in res["segments"]:
        lines.append(f"| {s['end']:,} | {s['items_per_s']:.0f} | {s['rss_mib']:.0f} | "
                     f"{s['cache_fill']:.2f} | {s['evictions']} | {s['acceptance_rate']:.3f} |")
    p.write_text("\n".join(lines) + "\n")
    return p
