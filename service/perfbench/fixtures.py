"""Benchmark fixtures: the one place the performance harness and the load drivers get their
streams, selectors, warm-up and machine facts from.

Used by :mod:`~service.perfbench.perf`, :mod:`~service.perfbench.peers`,
:mod:`~service.perfbench.stream_cost`, :mod:`~service.perfbench.e2e` and ``loadtests/*.py``.

* :class:`TwoViewStream`: seeded two-modality stream (two noisy views of a clustered latent), as
  float32 rows; :class:`VectorBank`: the load drivers' pre-packed clustered vectors (bytes);
* :func:`build_selector`: a :class:`~service.core.selector.StreamingSelector` as the service runs
  it (closed-form alignment model fit on unpaired + paired rows, unlimited budget at a target
  rate), every parameter explicit, one set of defaults (:data:`EMB_DIM`, :data:`TARGET_RATE`,
  :data:`BUDGET_WINDOW`, :data:`MODALITIES`); :func:`fit_data` draws its fit rows from a stream;
* :func:`warm_selector` (steady state before timing), :func:`items_from`;
* :func:`single_thread` (one torch and one BLAS thread) and :func:`machine_info`.

Importing this module does not import torch or the engine (the load drivers need neither):
those are imported inside the functions that use them.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from service.core.selector import StreamingSelector
    from service.core.types import FeatureItem

# k: the shared space of the benchmarks' selectors. Not the service's default any more
# (TrainerConfig.dim_out = 256 since the learner tuning of issue 13; the Kafka and gRPC sections
# run the service's own settings): the engine grid, the peers and the stream-cost runs keep 64,
# comparable with their earlier reports; the engine shares at 256: reports/perf-notes.md
EMB_DIM = 64
TARGET_RATE = 0.10      # selector acceptance target in the benchmarks
BUDGET_WINDOW = 2048    # the budget's rate window
MODALITIES = ("image", "text")
FIT_UNPAIRED = 4000     # rows per view drawn for the unpaired (PCA) fit by fit_data
FIT_PAIRED = 1000       # the first rows of those, as alignment pairs


# ---------------------------------------------------------------------------------------- streams
class TwoViewStream:
    """Seeded two-modality stream: two noisy views (``d_a`` and ``d_b`` dimensions, ``d_b``
    defaults to ``d_a``) of a shared latent drawn around ``clusters`` centres, so the caches see
    real structure. Rows are float32."""

    def __init__(self, d_a: int, d_b: int | None = None, latent: int = 32, clusters: int = 200,
                 seed: int = 0):
        d_b = d_a if d_b is None else d_b
        self.rng = np.random.default_rng(seed)
        self.ma = self.rng.normal(size=(latent, d_a)).astype(np.float32) / np.sqrt(latent)
        self.mb = self.rng.normal(size=(latent, d_b)).astype(np.float32) / np.sqrt(latent)
        self.centers = self.rng.normal(size=(clusters, latent)).astype(np.float32) * 2
        self.d_a, self.d_b = d_a, d_b
        self.d = d_a

    def pairs(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(a (n, d_a), b (n, d_b)) float32: row i of a and of b are views of one item."""
        z = self.centers[self.rng.integers(len(self.centers), size=n)]
        z = z + self.rng.normal(size=z.shape).astype(np.float32)
        a = z @ self.ma + 0.3 * self.rng.normal(size=(n, self.d_a)).astype(np.float32)
        b = z @ self.mb + 0.3 * self.rng.normal(size=(n, self.d_b)).astype(np.float32)
        return a.astype(np.float32, copy=False), b.astype(np.float32, copy=False)

    def mixed(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n rows, each view a or b at random (needs d_a == d_b): (X (n, d) float32, is_b (n,))."""
        if self.d_a != self.d_b:
            raise ValueError(f"mixed() needs equal view dimensions, got {self.d_a} and {self.d_b}")
        a, b = self.pairs(n)
        is_b = self.rng.random(n) < 0.5
        a[is_b] = b[is_b]
        return np.ascontiguousarray(a, dtype=np.float32), is_b


class VectorBank:
    """Pre-packed feature vectors (little-endian float32 bytes) per modality, for the load drivers.

    Clustered (``clusters`` Gaussian blobs in a shared latent, projected per modality, plus
    noise), so the service's diversity cache and uncertainty scores see some structure instead
    of isotropic noise. Vectors are reused cyclically: only the event and item ids are unique.
    """

    def __init__(self, modalities: Sequence[tuple[str, int]], size: int = 1024, seed: int = 0,
                 latent: int = 16, clusters: int = 64):
        rng = np.random.default_rng(seed)
        centers = rng.normal(size=(clusters, latent)) * 2.0
        self.size = int(size)
        self.packed: dict[str, list[bytes]] = {}
        self.dims = dict(modalities)
        for name, dim in modalities:
            proj = rng.normal(size=(latent, dim)) / math.sqrt(latent)
            z = (centers[rng.integers(clusters, size=self.size)]
                 + rng.normal(size=(self.size, latent)))
            x = (z @ proj + 0.3 * rng.normal(size=(self.size, dim))).astype("<f4")
            self.packed[name] = [row.tobytes() for row in x]

    def vector(self, modality: str, i: int) -> bytes:
        return self.packed[modality][i % self.size]


# ---------------------------------------------------------------------------------------- selector
class FitData(NamedTuple):
    """Rows the alignment model is fit on: ``unpaired`` (a, b) for the PCA, ``paired`` (a, b)
    with row i of a and b the same item."""

    unpaired: tuple[np.ndarray, np.ndarray]
    paired: tuple[np.ndarray, np.ndarray]


def fit_data(stream: TwoViewStream, n_unpaired: int = FIT_UNPAIRED,
             n_paired: int = FIT_PAIRED) -> FitData:
    """``n_unpaired`` pairs drawn from ``stream``; the first ``n_paired`` of them are the pairs."""
    a, b = stream.pairs(n_unpaired)
    return FitData((a, b), (a[:n_paired], b[:n_paired]))


def build_selector(fit: FitData, *, index_size: int, cache_capacity: int | None = None,
                   target_rate: float = TARGET_RATE, emb_dim: int = EMB_DIM,
                   budget_window: int = BUDGET_WINDOW, modalities: Sequence[str] = MODALITIES,
                   seed: int = 0, device="cpu") -> StreamingSelector:
    """A selector as the service runs it: closed-form alignment model (``dim_out = pca_dim =
    emb_dim``) fit on ``fit`` (PCA on ``fit.unpaired``, alignment on ``fit.paired``), index of
    ``index_size`` items, caches of ``cache_capacity`` (default ``index_size``) vectors, no total
    budget at ``target_rate`` over ``budget_window`` items, on ``device``. The only place the
    benchmarks construct a :class:`~service.core.selector.StreamingSelector`."""
    from service.alignment import AlignmentTrainer, TrainerConfig
    from service.core.budget import BudgetConfig
    from service.core.selector import SelectorConfig, StreamingSelector

    m0, m1 = modalities
    (ua, ub), (pa, pb) = fit
    dims = {m0: ua.shape[1], m1: ub.shape[1]}
    trainer = AlignmentTrainer(dims, TrainerConfig(dim_out=emb_dim, pca_dim=emb_dim), seed=seed)
    trainer.fit_unpaired({m0: ua, m1: ub})
    model = trainer.fit(pa, pb)
    cap = index_size if cache_capacity is None else cache_capacity
    cfg = SelectorConfig(index_size=index_size, cache_capacity=cap,
                         budget=BudgetConfig(total=None, target_rate=target_rate,
                                             window=budget_window))
    return StreamingSelector(model, cfg, seed=seed, device=device)


def items_from(x: np.ndarray, is_b: np.ndarray, modalities: Sequence[str], prefix: str = "i"
               ) -> list[FeatureItem]:
    """Row i of ``x`` as a FeatureItem of ``modalities[is_b[i]]``, id ``f"{prefix}{i}"``."""
    from service.core.types import FeatureItem

    return [FeatureItem(f"{prefix}{i}", modalities[int(is_b[i])], x[i]) for i in range(len(x))]


def warm_selector(sel: StreamingSelector, sample: Callable[[int], tuple[np.ndarray, np.ndarray]],
                  batch: int = 256, extra_items: int = 4096) -> dict:
    """Bring the selector to the steady state of a long stream before timing:

    1. the distance caches are filled to capacity with "selected elsewhere" items
       (``observe_external``, no budget counted) in chunks that fit (no eviction yet);
    2. both other-modality indexes are filled to K with recent items (``scorer.observe``, what
       ``commit`` does with every decided item; streaming 2K items through ``propose`` would do the
       same, at ~25 s for K = 16k);
    3. ``extra_items`` are streamed (``propose`` + ``commit``, micro-batch ``batch``) so that
       evictions, the budget window and the normalisers are at steady state.

    ``sample(n)`` returns ``(X (n, d), is_b (n,))``. Returns fill and timing facts.
    """
    import time

    t0 = time.perf_counter()
    mods = sel.modalities
    warm_selector_modalities(sel, lambda _m, n: sample(n)[0])  # steps 1 and 2
    done = 0
    while done < extra_items:
        x, is_b = sample(batch)
        sel.commit(sel.propose(items_from(x, is_b, mods, prefix=f"w{done}-")))
        done += batch
    st = sel.status()
    return {"cache_fill": min(st["cache_fill"].values()),
            "index_fill": min(sel.scorer.index_fill(m) for m in mods) / sel.scorer.index_size,
            "evictions": sum(st["cache_evictions"].values()), "streamed": done,
            "seconds": time.perf_counter() - t0}


def warm_selector_modalities(sel: StreamingSelector,
                             sample: Callable[[str, int], np.ndarray]) -> dict:
    """Fill every distance cache of ``sel`` to capacity (``observe_external``, no budget) and
    both K-item indexes, each modality from its own rows: ``sample(modality, n)`` -> (n, d_m).

    Steps 1 and 2 of :func:`warm_selector`, for modalities of any dimensions. Returns the fill
    reached.
    """
    mods = sel.modalities
    targets = {m: (mods if sel.config.cross_insert else (m,)) for m in mods}
    for _ in range(10_000):
        room = {m: c.capacity - c.size for m, c in sel.caches.items()}
        if max(room.values()) == 0:
            break
        for m in mods:
            n = min(1024, min(room[t] for t in targets[m]))
            if n > 0:
                sel.observe_external(m, sample(m, n), count_budget=False)
                room = {t: c.capacity - c.size for t, c in sel.caches.items()}
    k_full = sel.scorer.index_size
    for m in mods:
        done = 0
        while done < k_full:
            x = sample(m, min(4096, k_full - done))
            sel.scorer.observe(m, x, sel.scorer.embed(m, x))
            done += len(x)
    st = sel.status()
    return {"cache_fill": min(st["cache_fill"].values()),
            "index_fill": min(sel.scorer.index_fill(m) for m in mods) / k_full}


# ---------------------------------------------------------------------------------------- machine
@contextmanager
def single_thread():
    """One torch intra-op thread and one BLAS thread (numpy/scikit-learn) inside the block."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(1)
    except Exception:  # threadpoolctl ships with scikit-learn; never fail the bench on it
        limits = None
    try:
        yield
    finally:
        if limits is not None:
            limits.restore_original_limits()
        torch.set_num_threads(old)


def machine_info(torch_info: bool = True) -> dict:
    """CPU model, cores, memory, load, library versions; with ``torch_info`` (the default) also
    torch's version and thread settings (imports torch; the load drivers pass False)."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        cpu = platform.processor() or "unknown"
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = list(os.getloadavg())
    except (AttributeError, OSError):
        load = None
    info = {"cpu": cpu, "arch": platform.machine(), "platform": platform.platform(),
            "cores": os.cpu_count(), "cpus": os.cpu_count(), "usable_cores": usable,
            "mem_gib": mem, "loadavg": load, "python": platform.python_version(),
            "numpy": np.__version__}
    if torch_info:
        import torch

        info.update({"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                     "torch_interop_threads": torch.get_num_interop_threads()})
    return info
