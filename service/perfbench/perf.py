"""Performance benchmark (``pairsieve bench``): one run, one report, ``reports/perf.md``.

Sections (``--sections``, default all):

``engine``
    Items/s of :class:`~service.core.selector.StreamingSelector` (``propose`` + ``commit``) over a
    grid d x micro-batch B x (K = C), next to :class:`MatmulReference`, a plain torch pipeline
    doing the same arithmetic per batch (embed ``B x d @ d x k``; min-distance over the C cached
    vectors ``B x k @ k x C`` + min; similarities over the K indexed vectors ``B x k @ k x K`` +
    softmax; the default's typicality, ``B x k @ k x K`` + mean of the top ``typicality_k``),
    and the machine's measured peak fp32 matmul GFLOP/s. Selector and reference runs
    alternate (S, R, S, R, ...); each cell reports medians with min-max and the selector's share
    of the reference (median of the paired ratios).
``peers``
    :mod:`service.perfbench.peers`: scikit-activeml, modAL, apricot and river on the same stream.
``stream``
    Cost vs stream length: links ``reports/stream-cost.md`` and (full run only) re-runs a shorter
    :func:`service.perfbench.stream_cost.run`.
``profile``
    cProfile of the selector at B = 256, d = 512, K = C = 4096, top functions by own time.
``kafka``, ``grpc``
    End-to-end sections from :mod:`service.perfbench.e2e` (``run_kafka(quick)``,
    ``run_grpc(quick)``,
    each returning ``{"table_md": str, ...}``); skipped with a note while that module does not
    exist.
``gpu``
    When CUDA is available: the engine grid on the GPU (d = 512, B = 256/1024/4096, K = C =
    4k/16k) next to the same reference on the GPU, and CPU/GPU parity of the decisions on one
    stream (:func:`decision_parity`). Without CUDA the section says so and is not run (it is not
    an error: CI and the development machines have no GPU).

Everything on the CPU runs with ONE torch thread (``torch.set_num_threads(1)``) and one BLAS
thread (threadpoolctl), so numbers are per core and comparable across machines with more cores.
"""

from __future__ import annotations

import cProfile
import gc
import importlib
import os
import pstats
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from service.core.scorer import top_k_mean
from service.core.selector import StreamingSelector
from service.perfbench.fixtures import (
    EMB_DIM,
    TARGET_RATE,
    TwoViewStream,
    build_selector,
    fit_data,
    items_from,
    machine_info,
    single_thread,
    warm_selector,
)

SECTIONS = ("engine", "peers", "stream", "profile", "kafka", "grpc", "gpu")
SECTION_TITLES = {
    "engine": "1. Engine ceiling and efficiency",
    "peers": "2. Against peers on the same stream",
    "stream": "3. Cost vs stream length",
    "profile": "4. Where the time goes",
    "kafka": "5. End to end: Kafka",
    "grpc": "6. End to end: gRPC",
    "gpu": "7. GPU: engine on CUDA and CPU/GPU parity",
}
FULL_GRID = {"dims": (384, 512, 768), "batches": (1, 32, 256), "sizes": (1024, 4096, 16384)}
QUICK_GRID = {"dims": (512,), "batches": (1, 32, 256), "sizes": (1024, 4096)}
GPU_GRID = {"dims": (512,), "batches": (256, 1024, 4096), "sizes": (4096, 16384)}
GPU_TARGET_ITEMS_PER_S = 500_000   # on an H100 at K = C = 16k
PARITY_MIN_AGREEMENT = 0.99        # CPU/GPU accept/skip agreement on one stream
SHARE_TARGETS = {256: 0.80, 32: 0.50}  # issue 16: selector's share of the reference, by B
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------- setup
def _median_minmax(xs: Sequence[float]) -> dict:
    return {"median": float(statistics.median(xs)), "min": float(min(xs)), "max": float(max(xs)),
            "n": len(xs)}


def _sync(device: torch.device) -> None:
    """Wait for queued kernels (CUDA is asynchronous; a timing must include its work)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_matmul_gflops(n: int = 2048, reps: int = 5, device: str | torch.device = "cpu") -> dict:
    """Measured fp32 GFLOP/s of an ``n x n @ n x n`` torch matmul (median, min-max): one thread on
    the CPU (inside :func:`single_thread`), the whole device on CUDA (TF32 off, torch's default)."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dev)
    b = torch.randn(n, n, generator=g).to(dev)
    out = torch.empty(n, n, device=dev)
    torch.matmul(a, b, out=out)  # warm-up
    _sync(dev)
    rates = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b, out=out)
        _sync(dev)
        rates.append(2.0 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return {**_median_minmax(rates), "n": n, "device": str(dev)}


class MatmulReference:
    """The selector's arithmetic as plain torch, one pass per batch, no bookkeeping.

    ``z = normalize(x @ W + b)`` (B x d @ d x k); min-distance of z to C cached vectors
    (``addmm(|c|^2, z, c.T, alpha=-2)``, B x k @ k x C, + ``amin`` + ``|z|^2`` + sqrt);
    similarities to K indexed vectors ((z / tau) @ index.T, B x k @ k x K) + softmax; with
    ``typicality_k`` > 0 (the selector's default, whose utility has a typicality term) also the
    typicality: similarities to K vectors of the same modality's index (B x k @ k x K) and the
    mean of each row's ``typicality_k`` largest
    (:func:`~service.core.scorer.top_k_mean`). Cache and index hold unit vectors. These are the
    cheapest primitives for the arithmetic (the selector uses the same ones), so the share
    measures bookkeeping, not a slow reference.
    """

    def __init__(self, d: int, k: int, index_size: int, cache_size: int, tau: float = 0.05,
                 seed: int = 0, device: str | torch.device = "cpu", typicality_k: int = 0):
        if typicality_k < 0:
            raise ValueError(f"typicality_k must be >= 0, got {typicality_k}")
        g = torch.Generator().manual_seed(seed)
        self.d, self.k, self.K, self.C, self.tau = d, k, index_size, cache_size, tau
        self.typicality_k = int(typicality_k)
        self.device = dev = torch.device(device)
        self.weight = (torch.randn(d, k, generator=g) / d ** 0.5).to(dev)
        self.bias = torch.zeros(k, device=dev)
        self.cache = torch.nn.functional.normalize(torch.randn(cache_size, k, generator=g),
                                                   dim=1).to(dev)
        self.cache_sq = (self.cache * self.cache).sum(dim=1)
        self.index = torch.nn.functional.normalize(torch.randn(index_size, k, generator=g),
                                                   dim=1).to(dev)
        self.own_index = torch.nn.functional.normalize(torch.randn(index_size, k, generator=g),
                                                       dim=1).to(dev)

    def __call__(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                               np.ndarray | None]:
        """x: (B, d) float32 -> (embeddings (B, k), min distances (B,), probabilities (B, K),
        typicality (B,) float64 or None without ``typicality_k``), on the reference's device;
        the host-to-device copy of x is part of the work, as it is for the selector."""
        with torch.inference_mode():
            xt = torch.from_numpy(x).to(self.device)
            z = torch.nn.functional.normalize(torch.addmm(self.bias, xt, self.weight), dim=1)
            part = torch.addmm(self.cache_sq[None, :], z, self.cache.T, alpha=-2.0).amin(dim=1)
            mind = part.add_((z * z).sum(dim=1)).clamp_min_(0.0).sqrt_()
            probs = torch.softmax((z * (1.0 / self.tau)) @ self.index.T, dim=1)
            typ = (top_k_mean(z @ self.own_index.T, self.typicality_k)
                   if self.typicality_k else None)
        return z, mind, probs, typ

    def shapes(self, batch: int) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
        """The matmuls of one batch: name -> (left shape, right shape)."""
        out = {"embed": ((batch, self.d), (self.d, self.k)),
               "min_distance": ((batch, self.k), (self.k, self.C)),
               "similarities": ((batch, self.k), (self.k, self.K))}
        if self.typicality_k:
            out["typicality"] = ((batch, self.k), (self.k, self.K))
        return out

    def flops_per_item(self) -> float:
        return flops_per_item(self.d, self.k, self.K, self.C, typicality=bool(self.typicality_k))


def flops_per_item(d: int, k: int, index_size: int, cache_size: int,
                   typicality: bool = False) -> float:
    """Multiply-adds x 2 of the matmuls per item (elementwise work not counted); with
    ``typicality`` one more (k x K) product."""
    return 2.0 * (d * k + k * cache_size + k * index_size * (2 if typicality else 1))


def reference_typicality_k(sel: StreamingSelector) -> int:
    """The ``typicality_k`` the reference needs to do the selector's matmuls: the selector's own
    when its utility weighs typicality (the default), else 0."""
    acq = sel.config.acquisition
    return int(acq.typicality_k) if acq.typicality_weight > 0 else 0


def selector_shapes(sel: StreamingSelector,
                    batch: int) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """The same matmuls as the selector sees them (summed over the two modalities' rows)."""
    m0 = sel.modalities[0]
    d, k = sel.model.dims[m0], sel.model.dim_out
    cap = sel.caches[m0].capacity
    out = {"embed": ((batch, d), (d, k)),
           "min_distance": ((batch, k), (k, cap)),
           "similarities": ((batch, k), (k, sel.scorer.index_size))}
    if reference_typicality_k(sel):
        out["typicality"] = ((batch, k), (k, sel.scorer.index_size))
    return out


def engine_selector(d: int, size: int, seed: int = 0, device: str | torch.device = "cpu"
                    ) -> tuple[StreamingSelector, TwoViewStream]:
    """The engine sections' selector (:func:`~service.perfbench.fixtures.build_selector`, K = C =
    ``size``, fit on :func:`~service.perfbench.fixtures.fit_data` of a d x d stream) and that
    stream, which then supplies the timed rows."""
    stream = TwoViewStream(d, seed=seed)
    return build_selector(fit_data(stream), index_size=size, seed=seed, device=device), stream


# ---------------------------------------------------------------------------------------- engine
def _calibrate(step: Callable[[int], None], target_s: float) -> int:
    """Number of steps that take about ``target_s`` (doubling until a quarter of it is seen)."""
    n, i = 1, 0
    while True:
        t = time.perf_counter()
        for _ in range(n):
            step(i)
            i += 1
        dt = time.perf_counter() - t
        if dt >= target_s / 4 or n >= 1 << 16:
            return max(1, int(round(target_s * n / max(dt, 1e-9))))
        n *= 2


def _timed(step: Callable[[int], None], n: int, start: int) -> float:
    t = time.perf_counter()
    for i in range(start, start + n):
        step(i)
    return time.perf_counter() - t


def run_engine(dims: Sequence[int] = FULL_GRID["dims"],
               batches: Sequence[int] = FULL_GRID["batches"],
               sizes: Sequence[int] = FULL_GRID["sizes"], reps: int = 3, target_s: float = 0.3,
               pool_items: int = 8192, seed: int = 0, log: Callable[[str], None] = print,
               device: str | torch.device = "cpu") -> dict:
    """The engine grid. One row per (d, B, K = C) cell; see the module doc. ``device`` runs
    selector, reference and peak matmul there (CUDA timings synchronise after every step)."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    dev = torch.device(device)
    rows = []
    t_all = time.perf_counter()
    with single_thread():
        peak = peak_matmul_gflops(n=8192 if dev.type == "cuda" else 2048, device=dev)
        log(f"peak fp32 matmul ({dev}, n={peak['n']}): {peak['median']:.1f} GFLOP/s")
        for d in dims:
            for size in sizes:
                sel, stream = engine_selector(d, size, seed, device=dev)
                warm = warm_selector(sel, stream.mixed)
                x_pool, b_pool = stream.mixed(max(pool_items, 4 * max(batches)))
                items = items_from(x_pool, b_pool, sel.modalities)
                ref = MatmulReference(d, sel.model.dim_out, sel.scorer.index_size,
                                      sel.caches[sel.modalities[0]].capacity, sel.scorer.tau, seed,
                                      device=dev, typicality_k=reference_typicality_k(sel))
                fpi = ref.flops_per_item()
                for bsz in batches:
                    nb = len(items) // bsz
                    item_batches = [items[j * bsz:(j + 1) * bsz] for j in range(nb)]
                    arr_batches = [x_pool[j * bsz:(j + 1) * bsz] for j in range(nb)]

                    def sel_step(i, _b=item_batches, _sel=sel):
                        _sel.commit(_sel.propose(_b[i % len(_b)]))
                        _sync(dev)

                    def ref_step(i, _b=arr_batches, _ref=ref):
                        _ref(_b[i % len(_b)])
                        _sync(dev)

                    n_sel = _calibrate(sel_step, target_s)
                    n_ref = _calibrate(ref_step, target_s)
                    s_rates, r_rates, shares = [], [], []
                    pos_s = pos_r = 0
                    for _ in range(reps):
                        dt = _timed(sel_step, n_sel, pos_s)
                        pos_s += n_sel
                        s = n_sel * bsz / dt
                        dt = _timed(ref_step, n_ref, pos_r)
                        pos_r += n_ref
                        r = n_ref * bsz / dt
                        s_rates.append(s)
                        r_rates.append(r)
                        shares.append(s / r)
                    row = {"d": d, "batch": bsz, "K": size, "C": size, "k": ref.k,
                           "flops_per_item": fpi, "typicality_k": ref.typicality_k,
                           "selector": _median_minmax(s_rates),
                           "reference": _median_minmax(r_rates),
                           "share": _median_minmax(shares),
                           "selector_gflops": statistics.median(s_rates) * fpi / 1e9,
                           "reference_gflops": statistics.median(r_rates) * fpi / 1e9,
                           "items_per_run": {"selector": n_sel * bsz, "reference": n_ref * bsz},
                           "cache_fill": warm["cache_fill"], "index_fill": warm["index_fill"],
                           "device": str(dev)}
                    rows.append(row)
                    log(f"engine d={d} B={bsz} K=C={size}: "
                        f"selector {row['selector']['median']:.0f} "
                        f"items/s, reference {row['reference']['median']:.0f} items/s, share "
                        f"{row['share']['median']:.2f} (fill {warm['cache_fill']:.2f})")
                # free before the next cell (rebinding to None, not del: the names may be unbound)
                sel = items = item_batches = arr_batches = None  # type: ignore[assignment]
                gc.collect()
    return {"rows": rows, "peak": peak, "reps": reps, "target_s": target_s,
            "pool_items": max(pool_items, 4 * max(batches)), "k": EMB_DIM,
            "target_rate": TARGET_RATE, "seconds": time.perf_counter() - t_all,
            "grid": {"dims": list(dims), "batches": list(batches), "sizes": list(sizes)},
            "device": str(dev)}


# ---------------------------------------------------------------------------------------- gpu
def decision_parity(devices: Sequence[str | torch.device] = ("cpu", "cuda"), d: int = 512,
                    size: int = 4096, batch: int = 256, n_batches: int = 40, seed: int = 0,
                    warm_items: int = 4096) -> dict:
    """Accept/skip parity of two selectors that differ only in their device.

    Both are built and warmed identically (same seed, same rows), then see the same
    ``n_batches`` micro-batches of ``batch`` items; each proposes, the two proposals are compared,
    and each commits its own. Float32 sums run in a different order on another device, so a
    utility next to the threshold can fall on the other side; once one decision differs the two
    states (caches, budget window) differ too, which is why the first divergence is reported
    beside the overall agreement.

    Returns
    -------
    dict
        ``agreement`` (fraction of identical accept/skip decisions), ``n_decisions``,
        ``n_disagree``, ``accepts`` (per device), ``max_abs_utility_diff`` and
        ``median_abs_utility_diff`` (over all decisions), ``first_divergence_batch`` (None when
        every decision agreed), ``devices``.
    """
    sels = []
    for dev in devices:
        sel, stream = engine_selector(d, size, seed, device=dev)
        warm_selector(sel, stream.mixed, batch=batch, extra_items=warm_items)
        sels.append(sel)
    x, is_b = TwoViewStream(d, seed=seed + 1).mixed(n_batches * batch)
    items = items_from(x, is_b, sels[0].modalities, prefix="p")
    agree = total = 0
    accepts = [0, 0]
    diffs: list[float] = []
    first = None
    for j in range(n_batches):
        b = items[j * batch:(j + 1) * batch]
        props = [sel.propose(b) for sel in sels]
        for da, db in zip(props[0].decisions, props[1].decisions, strict=True):
            total += 1
            agree += da.accept == db.accept
            accepts[0] += da.accept
            accepts[1] += db.accept
            diffs.append(abs(da.utility - db.utility))
        if first is None and any(da.accept != db.accept
                                 for da, db in zip(props[0].decisions, props[1].decisions,
                                                   strict=True)):
            first = j
        for sel, prop in zip(sels, props, strict=True):
            sel.commit(prop)
    return {"devices": [str(torch.device(v)) for v in devices], "d": d, "K": size, "C": size,
            "batch": batch, "n_batches": n_batches, "n_decisions": total,
            "n_disagree": total - agree, "agreement": agree / total if total else 1.0,
            "accepts": accepts, "max_abs_utility_diff": max(diffs) if diffs else 0.0,
            "median_abs_utility_diff": statistics.median(diffs) if diffs else 0.0,
            "first_divergence_batch": first}


def run_gpu(quick: bool, log: Callable[[str], None] = print) -> dict:
    """The engine grid on CUDA plus CPU/GPU decision parity; ``{"skipped": why}`` without CUDA."""
    if not torch.cuda.is_available():
        note = ("no CUDA device on this machine (`torch.cuda.is_available()` is False), so the GPU "
                "engine grid and the CPU/GPU parity check were not run; `pairsieve bench "
                "--sections gpu` runs them where a GPU is present")
        log(f"gpu: {note}")
        return {"skipped": note}
    name = torch.cuda.get_device_name(0)
    grid = {**GPU_GRID, **({"sizes": (16384,), "batches": (256, 4096)} if quick else {})}
    log(f"gpu: {name}")
    eng = run_engine(grid["dims"], grid["batches"], grid["sizes"], reps=3, target_s=0.25,
                     pool_items=16384, log=log, device="cuda")
    par = decision_parity(("cpu", "cuda"), d=512, size=max(grid["sizes"]),
                          n_batches=10 if quick else 40)
    log(f"gpu parity: agreement {par['agreement']:.4f} over {par['n_decisions']} decisions, "
        f"max |utility diff| {par['max_abs_utility_diff']:.2e}")
    return {"device_name": name, "engine": eng, "parity": par}


# ---------------------------------------------------------------------------------------- profile
def _func_label(key: tuple) -> str:
    file, line, name = key
    if file == "~":
        return name
    p = Path(file)
    parts = p.parts
    if "site-packages" in parts:
        return f"{Path(*parts[parts.index('site-packages') + 1:])}:{line}({name})"
    try:
        return f"{p.resolve().relative_to(REPO)}:{line}({name})"
    except ValueError:
        return f"{p.name}:{line}({name})"


def run_profile(d: int = 512, batch: int = 256, size: int = 4096, n_batches: int = 60,
                top: int = 15, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """cProfile of ``n_batches`` propose+commit calls at steady state; top functions by tottime."""
    with single_thread():
        sel, stream = engine_selector(d, size, seed)
        warm_selector(sel, stream.mixed)
        x, is_b = stream.mixed(n_batches * batch)
        items = items_from(x, is_b, sel.modalities)
        batches = [items[i * batch:(i + 1) * batch] for i in range(n_batches)]
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        for b in batches:
            sel.commit(sel.propose(b))
        prof.disable()
        wall = time.perf_counter() - t
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]  # typeshed omits Stats.stats
    total = sum(v[2] for v in stats.values())
    ranked = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    rows = [{"function": _func_label(k), "ncalls": v[1], "tottime": v[2],
             "share": v[2] / total if total else 0.0, "cumtime": v[3]} for k, v in ranked]
    groups: dict[str, float] = {}
    for k, v in stats.items():
        g = _func_label(k).split(":", 1)[0] if k[0] != "~" else _builtin_group(k[2])
        groups[g] = groups.get(g, 0.0) + v[2]
    by_file = [{"where": g, "tottime": t, "share": t / total if total else 0.0}
               for g, t in sorted(groups.items(), key=lambda kv: kv[1], reverse=True)[:8]]
    log(f"profile: {n_batches} batches of {batch} in {wall:.2f}s under cProfile; top: "
        f"{rows[0]['function']} {rows[0]['share']:.0%}")
    return {"d": d, "batch": batch, "K": size, "C": size, "n_batches": n_batches, "wall_s": wall,
            "total_tottime": total, "items_per_s_profiled": n_batches * batch / wall, "rows": rows,
            "by_file": by_file}


def _builtin_group(name: str) -> str:
    if "torch" in name:
        return "torch kernels (built-in)"
    if "numpy" in name:
        return "numpy (built-in)"
    return "other built-ins"


# ---------------------------------------------------------------------------------------- stream
def run_stream_section(quick: bool, items: int = 300_000, warmup_items: int = 100_000,
                       segment: int = 50_000, log: Callable[[str], None] = print) -> dict:
    """Full run: a shorter :func:`service.perfbench.stream_cost.run`; quick run: link only."""
    existing = (REPO / "reports" / "stream-cost.md").exists()
    if quick:
        return {"rerun": False, "existing_report": existing}
    from service.perfbench import stream_cost

    with single_thread():
        res = stream_cost.run(items=items, segment=segment, warmup_items=warmup_items, log=log)
    return {"rerun": True, "existing_report": existing, "result": res}


# ---------------------------------------------------------------------------------------- e2e
def _load_e2e():
    """The e2e module, or None when it does not exist (any other import error propagates).
    Looked up by name, so the module registered in ``sys.modules`` is the one used (the
    package attribute ``service.perfbench.e2e`` is set by whoever imported it first)."""
    try:
        return importlib.import_module("service.perfbench.e2e")
    except ModuleNotFoundError as exc:
        if exc.name in ("service.perfbench.e2e",):
            return None
        raise


def run_e2e(kind: str, quick: bool, log: Callable[[str], None] = print) -> dict:
    e2e = _load_e2e()
    if e2e is None:
        note = ("skipped: service.perfbench.e2e does not exist yet "
                f"(it provides run_{kind}(quick) -> "
                "{'table_md': ...})")
        log(f"{kind}: {note}")
        return {"skipped": note}
    fn = getattr(e2e, f"run_{kind}", None)
    if fn is None:
        note = f"skipped: service.perfbench.e2e has no run_{kind}()"
        log(f"{kind}: {note}")
        return {"skipped": note}
    return dict(fn(quick))


# ---------------------------------------------------------------------------------------- all
def parse_sections(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    if spec is None:
        return SECTIONS
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        raise ValueError(f"unknown bench section(s) {bad or names}; "
                         f"choose from {', '.join(SECTIONS)}")
    return tuple(s for s in SECTIONS if s in names)


def run_all(sections: Sequence[str] = SECTIONS, quick: bool = False, grid: dict | None = None,
            log: Callable[[str], None] = print) -> dict:
    """Run the chosen sections; a section that raises is recorded (with its traceback tail) and
    the others still run. Returns the results dict :func:`render` takes."""
    grid = {**(QUICK_GRID if quick else FULL_GRID), **{k: v for k, v in (grid or {}).items() if v}}
    res: dict = {"quick": quick, "sections": list(sections), "machine": machine_info(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "errors": {}}
    t0 = time.perf_counter()
    for name in sections:
        t = time.perf_counter()
        log(f"== {name} ==")
        try:
            if name == "engine":
                res["engine"] = run_engine(grid["dims"], grid["batches"], grid["sizes"], reps=3,
                                           target_s=0.15 if quick else 0.25, log=log)
            elif name == "peers":
                from service.perfbench import peers
                res["peers"] = peers.run(quick=quick, log=log)
            elif name == "stream":
                res["stream"] = run_stream_section(quick, log=log)
            elif name == "profile":
                res["profile"] = run_profile(n_batches=20 if quick else 60, log=log)
            elif name in ("kafka", "grpc"):
                res[name] = run_e2e(name, quick, log=log)
            elif name == "gpu":
                res["gpu"] = run_gpu(quick, log=log)
        except Exception as exc:  # keep the other sections; the CLI exits non-zero
            tb = traceback.format_exc()
            res["errors"][name] = f"{type(exc).__name__}: {exc}\n" + "\n".join(tb.splitlines()[-8:])
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
        res.setdefault("section_seconds", {})[name] = time.perf_counter() - t
    res["seconds"] = time.perf_counter() - t0
    res["machine_end_loadavg"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return res


# ---------------------------------------------------------------------------------------- report
def _mm(x: dict, fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(x['median'])} ({fmt.format(x['min'])}–{fmt.format(x['max'])})"


def _render_engine(e: dict) -> list[str]:
    peak = e["peak"]
    g = e["grid"]
    typ_k = e["rows"][0].get("typicality_k", 0) if e["rows"] else 0
    typ_text = (f"; the default's typicality over the same modality's K (`B×k @ k×K` + mean of "
                f"the {typ_k} largest, `top_k_mean` as in the selector)" if typ_k else "")
    out = [f"Grid: d = {', '.join(map(str, g['dims']))}; micro-batch B = "
           f"{', '.join(map(str, g['batches']))}; K = C = {', '.join(map(str, g['sizes']))} "
           f"({len(e['rows'])} cells), shared-space dimension k = {e['k']}, two modalities "
           f"(half the items each, both d-dimensional), target acceptance {e['target_rate']:.0%}, "
           "no total budget.", "",
           "**Selector**: `StreamingSelector.propose` + `commit` per micro-batch "
           "(FeatureItem lists "
           "built beforehand, not timed). Before timing, the distance caches are filled to "
           "capacity (`observe_external`), both K-item indexes are filled, and 4,096 items are "
           "streamed, so every timed batch runs at steady state (full caches, evictions). "
           "**Reference** (`MatmulReference`): the same arithmetic on the same rows as "
           "plain torch, "
           "per batch: embed `B×d @ d×k` + normalise; min-distance over C (`B×k @ k×C` + min); "
           "similarities over K (`B×k @ k×K` + softmax)" + typ_text + ". **Peak**: fp32 "
           f"`{peak['n']}×{peak['n']}` matmul = {_mm(peak, '{:.1f}')} GFLOP/s "
           f"({'1 thread' if e.get('device', 'cpu') == 'cpu' else e['device']}).", "",
           f"Timing: per cell, runs alternate selector, reference, selector, reference, ... "
           f"({e['reps']} each, about {e['target_s']:.2f} s each, run length calibrated per side); "
           "items/s are medians (min–max); share = median of the paired ratios selector/reference "
           "(min–max). GFLOP/s counts the matmuls only: 2·(d·k + k·C + k·K"
           + (" + k·K" if typ_k else "") + ") per item.", "",
           "| d | B | K = C | selector items/s | reference items/s | share of reference | "
           "selector GFLOP/s | reference GFLOP/s | reference % of peak |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in e["rows"]:
        out.append(f"| {r['d']} | {r['batch']} | {r['K']:,} | {_mm(r['selector'])} | "
                   f"{_mm(r['reference'])} | {_mm(r['share'], '{:.2f}')} | "
                   f"{r['selector_gflops']:.2f} | {r['reference_gflops']:.2f} | "
                   f"{100 * r['reference_gflops'] / peak['median']:.0f}% |")
    out.append("")
    for bsz, target in SHARE_TARGETS.items():
        cells = [r for r in e["rows"] if r["batch"] == bsz]
        if not cells:
            out.append(f"No cell with B = {bsz} in this grid; its target is not evaluated.")
            continue
        bad = [f"d={r['d']} K=C={r['K']} ({r['share']['median']:.2f})"
               for r in cells if r["share"]["median"] < target]
        out.append(f"**Target (share >= {target:.0%} of the reference at B = {bsz}): "
                   f"{len(cells) - len(bad)} of {len(cells)} cells meet it.**"
                   + (f" Below: {', '.join(bad)}." if bad else ""))
    out.append(f"Section time: {e['seconds']:.0f} s.")
    return out


def _render_profile(p: dict) -> list[str]:
    out = [f"`cProfile` of {p['n_batches']} steady-state `propose` + `commit` calls at B = "
           f"{p['batch']}, d = {p['d']}, K = C = {p['K']:,} (caches full): "
           f"{p['wall_s']:.2f} s wall "
           f"under the profiler ({p['items_per_s_profiled']:.0f} items/s; the profiler's own "
           "overhead inflates Python-heavy functions). Top functions by own time (tottime):", "",
           "| function | calls | tottime s | share of profiled time | cumtime s |",
           "|---|---:|---:|---:|---:|"]
    for r in p["rows"]:
        fn = r["function"].replace("|", "\\|")
        out.append(f"| `{fn}` | {r['ncalls']:,} | {r['tottime']:.3f} | {r['share']:.1%} | "
                   f"{r['cumtime']:.3f} |")
    if p.get("by_file"):
        out += ["", "Own time summed by file (built-ins grouped):", "",
                "| where | tottime s | share |", "|---|---:|---:|"]
        for g in p["by_file"]:
            out.append(f"| `{g['where']}` | {g['tottime']:.3f} | {g['share']:.1%} |")
    return out


def _render_stream(s: dict) -> list[str]:
    out = ["The full cost-vs-length benchmark (1M items) is `pairsieve bench-stream-cost`; its "
           "report is [stream-cost.md](stream-cost.md)"
           + ("" if s.get("existing_report") else " (not generated on this checkout yet)") + "."]
    if not s.get("rerun"):
        out += ["", "Quick run: not re-run here (a meaningful run needs a 150k-item warm-up "
                "to fill "
                "the caches); the full `pairsieve bench` re-runs a 300k-item version."]
        return out
    from service.perfbench import stream_cost

    r = s["result"]
    ok = "meets" if r["median_last_over_first"] >= 0.9 else "does NOT meet"
    out += ["", "Re-run here through `service.perfbench.stream_cost.run`: "
            f"{r['items']:,} measured items after a {r['warmup_items']:,}-item warm-up, "
            f"d = {stream_cost.D_A} / {stream_cost.D_B}, k = {EMB_DIM}, K = "
            f"{r['index_size']:,}, C = {r['capacity']:,}, micro-batch {r['batch']}, target rate "
            f"{stream_cost.TARGET_RATE:.0%}. "
            f"**Last / first segment throughput (medians of {r['median_window']} segments) = "
            f"{r['median_last_over_first']:.3f}** ({ok} the >= 0.9 target); median "
            f"{r['median_items_per_s']:.0f} items/s; "
            f"RSS change {r['rss_growth_mib']:+.1f} MiB.", "",
            "| items | items/s (segment) | RSS MiB | cache fill | evictions | acceptance |",
            "|---:|---:|---:|---:|---:|---:|"]
    for g in r["segments"]:
        out.append(f"| {g['end']:,} | {g['items_per_s']:.0f} | {g['rss_mib']:.0f} | "
                   f"{g['cache_fill']:.2f} | {g['evictions']} | {g['acceptance_rate']:.3f} |")
    return out


def _render_gpu(g: dict) -> list[str]:
    if "skipped" in g:
        return [f"Not run: {g['skipped']}."]
    eng, par = g["engine"], g["parity"]
    out = [f"Device: {g['device_name']}. The engine grid of section 1 on CUDA (same selector, same "
           "reference, each step synchronised before the clock is read):", ""]
    out += _render_engine(eng)
    big = [r for r in eng["rows"] if r["K"] >= 16384]
    if big:
        best = max(big, key=lambda r: r["selector"]["median"])
        verdict = ("meets" if best["selector"]["median"] >= GPU_TARGET_ITEMS_PER_S
                   else "does NOT meet")
        out += ["", "**Scorer + cache at K = C = 16k: "
                f"best {best['selector']['median']:,.0f} items/s "
                f"(B = {best['batch']}), {verdict} the {GPU_TARGET_ITEMS_PER_S:,} items/s target "
                "(stated for an H100).**"]
    ok = par["agreement"] >= PARITY_MIN_AGREEMENT
    out += ["", f"**CPU/GPU parity** ({par['devices'][0]} vs {par['devices'][1]}, d = {par['d']}, "
            f"K = C = {par['K']:,}, {par['n_batches']} batches of {par['batch']}): "
            f"{par['agreement']:.2%} of {par['n_decisions']:,} accept/skip decisions agree "
            f"({'meets' if ok else 'does NOT meet'} the {PARITY_MIN_AGREEMENT:.0%} tolerance); "
            f"accepts {par['accepts'][0]} vs {par['accepts'][1]}; |utility difference| median "
            f"{par['median_abs_utility_diff']:.1e}, max {par['max_abs_utility_diff']:.1e}; first "
            f"divergent batch: {par['first_divergence_batch']}."]
    return out


def _render_e2e(x: dict) -> list[str]:
    if "skipped" in x:
        return [f"Not run: {x['skipped']}."]
    out = [x.get("table_md", "(the e2e section returned no table)")]
    for key in ("notes", "summary"):
        if isinstance(x.get(key), str) and x[key]:
            out += ["", x[key]]
    return out


def render(res: dict, command: str = "pairsieve bench") -> str:
    """The Markdown report; every section header is present (with a note if not run)."""
    m = res["machine"]
    quick = res.get("quick")
    mem = f", {m['mem_gib']:.0f} GiB RAM" if m.get("mem_gib") else ""
    load = m.get("loadavg")
    lines = ["# pairsieve performance", "",
             f"Command: `{command}`" + ("  (**quick run**: reduced grid and prefixes, for "
                                        "development; not the reference numbers)" if quick else ""),
             "",
             f"Machine: {m['cpu']} ({m['arch']}), {m['cores']} cores ({m['usable_cores']} usable)"
             f"{mem}; Python {m['python']}, torch {m['torch']}, numpy {m['numpy']}. "
             f"**Threads: 1 torch intra-op thread (`torch.set_num_threads(1)`) and 1 BLAS thread "
             "(threadpoolctl) for everything, the selector, the reference, the peak matmul and the "
             "peers (numba: 1 thread).** "
             + (f"Load average at start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
                if load else "")
             + (f", at end {res['machine_end_loadavg'][0]:.1f}" if res.get("machine_end_loadavg")
                else "") + ": the machine is shared, so single runs vary; compare medians.", "",
             f"Started {res.get('started', '?')}; total {res.get('seconds', 0):.0f} s"
             + (" (" + ", ".join(f"{k} {v:.0f} s"
                                 for k, v in res.get("section_seconds", {}).items())
                + ")" if res.get("section_seconds") else "") + "."]
    for name in SECTIONS:
        lines += ["", f"## {SECTION_TITLES[name]}", ""]
        if name in res.get("errors", {}):
            lines += ["**FAILED** in this run:", "", "```", res["errors"][name], "```"]
            continue
        if name not in res:
            lines.append("Not run in this invocation (`--sections` "
                         f"{','.join(res.get('sections', []))}).")
            continue
        if name == "engine":
            lines += _render_engine(res["engine"])
        elif name == "peers":
            from service.perfbench.peers import render as render_peers
            lines += render_peers(res["peers"])
        elif name == "stream":
            lines += _render_stream(res["stream"])
        elif name == "profile":
            lines += _render_profile(res["profile"])
        elif name == "gpu":
            lines += _render_gpu(res["gpu"])
        else:
            lines += _render_e2e(res[name])
    return "\n".join(lines) + "\n"


def write_report(res: dict, path: str | os.PathLike, command: str) -> Path:
    """Write the report; a hand-written ``perf-notes.md`` beside it (findings, what limits each
    target) is appended, as ``quality-notes.md`` is to the quality report."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    notes = p.parent / "perf-notes.md"
    p.write_text(render(res, command) + ("\n" + notes.read_text() if notes.exists() else ""))
    return p


def main(quick: bool = False, out: str = "reports/perf.md", sections=None, grid: dict | None = None,
         command: str | None = None) -> int:
    secs = parse_sections(sections)
    command = command or ("pairsieve " + " ".join(sys.argv[1:]))
    res = run_all(secs, quick, grid, log=lambda s: print(s, flush=True))
    p = write_report(res, out, command)
    print(f"wrote {p} in {res['seconds']:.0f} s" + (f"; FAILED sections: {', '.join(res['errors'])}"
                                                    if res["errors"] else ""))
    return 1 if res["errors"] else 0
