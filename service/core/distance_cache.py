"""Bounded per-modality cache of selected items, for k-center style diversity.

The diversity of a candidate is its distance to the nearest already-selected item of the same
modality in the shared embedding space. The cache keeps at most ``capacity`` vectors, so that cost
is O(C·k) per candidate, computed for a whole batch in one matmul.

Eviction keeps coverage: when full, the most *redundant* point goes (the one with the smallest
distance to its nearest neighbour in the cache, the new point included). Removing point ``e`` can
raise a candidate's min-distance by at most ``nn_dist(e)`` (triangle inequality), the smallest such
loss available; plain FIFO would drop the oldest outliers, which are exactly what coverage needs.

The nearest-neighbour distances are maintained lazily: when a point's nearest neighbour is
evicted, its stored distance is kept as a lower bound and the point is marked stale; it is
recomputed only if it becomes the eviction candidate (the smallest stored value). Because stale
values only underestimate, the first *fresh* minimum is the true minimum, so the evictions are
exactly those of eager maintenance, with never more refreshes (one matrix-vector product per
stale point that reaches the minimum, instead of one per stale point). On the CPU a refresh runs
through numpy views of the cache, a third of torch's per-call cost for such small products.

**Drift.** On a drifting stream (a corpus in book order, a sensor in a new regime) a region covered
long ago would keep its new arrivals out forever. With a ``half_life`` (in items offered, the
caller's clock), :meth:`DistanceCache.min_distance` inflates the distance to each cached point by
``2 ** (age / half_life)``: an old selection covers a shrinking ball, and after a few half-lives
its region counts as uncovered again. The result is never below the plain distance and never
inflated above ``max(empty_value, plain distance)``. Without a half-life nothing changes (the same
single fused pass).

The cache also keeps the raw (pre-projection) vectors, tagged with the model version that embedded
them, so a new alignment model re-projects the cache instead of comparing across spaces.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from service.core.validation import as_matrix


def pairwise_sq_dist(x: torch.Tensor, c: torch.Tensor, c_sqnorm: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances in one fused matmul (``|c|^2 - 2 x c^T`` by ``addmm``, then
    ``+ |x|^2`` in place). x: (B, k), c: (C, k), c_sqnorm: (C,) -> (B, C), clamped >= 0."""
    d = torch.addmm(c_sqnorm[None, :], x, c.T, alpha=-2.0)
    return d.add_((x * x).sum(dim=1, keepdim=True)).clamp_min_(0.0)


def min_distances(x: torch.Tensor, c: torch.Tensor, empty_value: float,
                  c_sqnorm: torch.Tensor | None = None) -> torch.Tensor:
    """Distance of each row of x to its nearest row of c. (B, k), (C, k) -> (B,).

    The row minimum is taken over ``|c|^2 - 2 x c^T`` (one ``addmm`` output, one pass); ``|x|^2``
    is added to the (B,) minima only. ``c_sqnorm`` (C,) = ``|c|^2`` when the caller keeps it.
    """
    if c.shape[0] == 0:
        return torch.full((x.shape[0],), float(empty_value), dtype=x.dtype, device=x.device)
    sq = (c * c).sum(dim=1) if c_sqnorm is None else c_sqnorm
    part = torch.addmm(sq[None, :], x, c.T, alpha=-2.0).amin(dim=1)  # amin: no index pass
    return part.add_((x * x).sum(dim=1)).clamp_min_(0.0).sqrt_()


class DistanceCache:
    """The selected set of one modality, capped at ``capacity`` vectors.

    Parameters
    ----------
    dim : int
        Embedding dimension ``k``.
    capacity : int
        Maximum number of cached vectors ``C``.
    raw_dim : int or None
        Dimension of the raw vectors kept for re-projection (None: keep none; then a model change
        can only :meth:`invalidate`). Shorter raw vectors are zero-padded; each cached row also
        keeps an integer ``tag`` (e.g. which modality's encoder produced it) so a re-projection
        can embed every row with the right head.
    empty_value : float
        The distance reported while the cache is empty (2.0 = the diameter of the unit sphere).
    model_version : int
        Version of the model whose space the cached embeddings live in.
    device : str or torch.device
    """

    def __init__(self, dim: int, capacity: int, raw_dim: int | None = None, *,
                 empty_value: float = 2.0, model_version: int = 0,
                 device: str | torch.device = "cpu"):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim, self.capacity, self.raw_dim = int(dim), int(capacity), raw_dim
        self.empty_value = float(empty_value)
        self.model_version = int(model_version)
        self.device = torch.device(device)
        self._emb = torch.zeros((capacity, dim), dtype=torch.float32, device=self.device)
        self._sq = torch.zeros(capacity, dtype=torch.float32, device=self.device)
        # numpy views of the same memory, for the per-point upkeep on the CPU (module doc)
        self._host = (self._emb.numpy(), self._sq.numpy()) if self.device.type == "cpu" else None
        self._raw = np.zeros((capacity, raw_dim), dtype=np.float32) if raw_dim else None
        self._raw_len = np.zeros(capacity, dtype=np.int64)
        self._tag = np.zeros(capacity, dtype=np.int64)
        self._born = np.zeros(capacity, dtype=np.float64)  # the caller's clock at insertion
        self._nn = np.full(capacity, np.inf)  # distance of each cached point to its nearest other
        self._nn_idx = np.full(capacity, -1, dtype=np.int64)
        self._stale = np.zeros(capacity, dtype=bool)  # _nn is only a lower bound (see module doc)
        self.size = 0
        self.evictions = 0

    # ---------------------------------------------------------------- queries
    @property
    def embeddings(self) -> torch.Tensor:
        """The cached embeddings, shape (size, k) (a view; do not modify)."""
        return self._emb[: self.size]

    def fill(self) -> float:
        """Fraction of the capacity in use."""
        return self.size / self.capacity

    def neighbour_distances(self) -> np.ndarray:
        """Exact distance of each cached point to its nearest other cached point, (size,) float64
        (inf for a single point). Refreshes the lazily kept stale entries first."""
        stale = np.flatnonzero(self._stale[: self.size])
        if len(stale):
            with torch.inference_mode():
                self._recompute_nn(stale)
        return self._nn[: self.size].copy()

    def min_distance(self, x, clock: float | None = None,
                     half_life: float | None = None) -> np.ndarray:
        """Distance of each row to the nearest cached vector. x: (B, k) -> (B,) float64.

        With ``half_life`` (and the current ``clock``, same unit as the ``clock`` given to
        :meth:`add`), each cached point's distance is inflated by ``2 ** (age / half_life)``
        (module doc: drift), capped at ``max(empty_value, plain distance)``.
        """
        t = self._as_tensor(x)
        n = self.size
        with torch.inference_mode():
            if half_life is None or n == 0:
                return min_distances(t, self.embeddings, self.empty_value,
                                     self._sq[:n]).double().cpu().numpy()
            if clock is None or not half_life > 0:
                raise ValueError(f"decay needs a clock and a half_life > 0, got clock={clock!r}, "
                                 f"half_life={half_life!r}")
            age = np.maximum(float(clock) - self._born[:n], 0.0)
            grow = torch.from_numpy(np.exp2(np.minimum(age / float(half_life), 60.0))) \
                .to(self.device, torch.float32)
            d = pairwise_sq_dist(t, self._emb[:n], self._sq[:n]).sqrt_()  # (B, n)
            plain = d.amin(dim=1)
            aged = d.mul_(grow[None, :]).amin(dim=1)
            cap = plain.clamp_min(self.empty_value)
            return torch.minimum(aged, cap).double().cpu().numpy()

    def ages(self, clock: float) -> np.ndarray:
        """Age of each cached point at ``clock`` (the caller's unit), shape (size,) float64."""
        return np.maximum(float(clock) - self._born[: self.size], 0.0)

    def _as_tensor(self, x) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            if x.ndim != 2 or x.shape[1] != self.dim:
                raise ValueError(
                    f"embeddings: expected shape (n, {self.dim}), got {tuple(x.shape)}")
            return x.to(self.device, torch.float32)
        return torch.from_numpy(as_matrix(x, self.dim, name="embeddings")).to(self.device)

    # ---------------------------------------------------------------- updates
    def add(self, x, raw=None, tag: int = 0, clock=0.0) -> int:
        """Insert rows of x (n, k); returns the number of evictions made.

        raw : (n, d) with d <= raw_dim, required when the cache keeps raw vectors.
        tag : int stored with every inserted row (see :meth:`reproject`).
        clock : float or (n,) array, the caller's clock at insertion (for the decay of
            :meth:`min_distance`); kept across :meth:`reproject`.
        """
        born = np.broadcast_to(np.asarray(clock, dtype=np.float64), (len(x),))
        t = self._as_tensor(x)
        r = None
        if self._raw is not None:
            if raw is None:
                raise ValueError("this cache keeps raw vectors: pass raw=(n, d)")
            r = as_matrix(raw, None, name="raw")
            if len(r) != len(t) or r.shape[1] > self.raw_dim:
                raise ValueError(f"raw has shape {r.shape}; expected ({len(t)}, <= {self.raw_dim})")
        before = self.evictions
        with torch.inference_mode():
            if self.size + t.shape[0] <= self.capacity:
                self._add_bulk(t, r, int(tag), born)
            else:
                self._add_sequential(t, r, int(tag), born)
        return self.evictions - before

    def _add_sequential(self, x: torch.Tensor, raw: np.ndarray | None, tag: int,
                        born: np.ndarray) -> None:
        """Insert rows one by one (evictions depend on order), with every distance the loop
        needs precomputed in two matmuls: new-to-cache (n, size) and new-to-new (n, n).

        ``dist`` holds each row's distances to the cache as it is *now* (when row i takes slot
        s, column s becomes row i's column of the new-to-new distances) and ``near`` their row
        minima, kept up to date (a row whose minimum was the overwritten slot is re-read).

        A full cache turns a row away when it is no farther from the cache than the most
        redundant point is from its nearest neighbour (the new row is then itself the most
        redundant point), and a turned-away row changes nothing. So the rows up to the next one
        that goes in are decided together against one eviction candidate, instead of four
        passes over the cache per row. The evictions are those of :meth:`_add_one` row by row
        (``tests/unit/test_distance_cache.py`` compares the two)."""
        n, m0 = x.shape[0], self.size
        dist = np.full((n, self.capacity), np.inf)
        if m0:
            dist[:, :m0] = pairwise_sq_dist(x, self._emb[:m0], self._sq[:m0]) \
                .sqrt_().double().cpu().numpy()
        d_xx = pairwise_sq_dist(x, x, (x * x).sum(dim=1)).sqrt_().double().cpu().numpy()
        sq = (x * x).sum(dim=1)
        near = dist.min(axis=1)  # (n,) each row's distance to its nearest cached point now
        i = 0
        while i < n:
            size = self.size
            if size == self.capacity:
                e = self._eviction_candidate()  # unchanged by rows turned away
                goes_in = np.flatnonzero(near[i:] > self._nn[e])
                away = n - i if len(goes_in) == 0 else int(goes_in[0])
                self.evictions += away  # each of them was the most redundant point
                i += away
                if i == n:
                    break
            # row i's distances are read for the last time here: _add_one may overwrite them
            slot = self._add_one(x[i], None if raw is None else raw[i], tag, dist[i, :size],
                                 sq[i])
            if slot is not None:
                self._born[slot] = born[i]
                later = slice(i + 1, n)
                lost = dist[later, slot] == near[later]  # their nearest may have been evicted
                dist[later, slot] = d_xx[later, i]
                near[later] = np.minimum(near[later], d_xx[later, i])
                if lost.any():
                    rows = np.flatnonzero(lost) + i + 1
                    near[rows] = dist[rows].min(axis=1)
            i += 1

    def _add_bulk(self, x: torch.Tensor, raw: np.ndarray | None, tag: int,
                  born: np.ndarray) -> None:
        """Insert rows that all fit (no eviction): two matmuls instead of n sequential updates."""
        n, m = x.shape[0], self.size
        if n == 0:
            return
        sq = (x * x).sum(dim=1)
        d_xx = pairwise_sq_dist(x, x, sq)
        d_xx.fill_diagonal_(float("inf"))
        new_nn, new_idx = d_xx.min(dim=1)
        new_idx = new_idx + m
        if m:
            d_xe = pairwise_sq_dist(x, self._emb[:m], self._sq[:m])  # (n, m)
            best_e, best_e_idx = d_xe.min(dim=1)
            use_e = best_e < new_nn
            new_nn = torch.where(use_e, best_e, new_nn)
            new_idx = torch.where(use_e, best_e_idx, new_idx)
            col_min_t, col_idx = d_xe.min(dim=0)  # for existing points
            col_min = col_min_t.sqrt().double().cpu().numpy()
            closer = col_min < self._nn[:m]  # exact for stale rows too (theirs underestimate)
            self._nn[:m][closer] = col_min[closer]
            self._nn_idx[:m][closer] = col_idx.cpu().numpy()[closer] + m
            self._stale[:m][closer] = False
        self._emb[m:m + n] = x
        self._sq[m:m + n] = sq
        self._nn[m:m + n] = new_nn.sqrt().double().cpu().numpy()
        self._nn_idx[m:m + n] = new_idx.cpu().numpy()
        self._stale[m:m + n] = False
        self._tag[m:m + n] = tag
        self._born[m:m + n] = born
        if self._raw is not None and raw is not None:
            self._raw[m:m + n, : raw.shape[1]] = raw
            self._raw[m:m + n, raw.shape[1]:] = 0.0
            self._raw_len[m:m + n] = raw.shape[1]
        self.size += n

    def _add_one(self, v: torch.Tensor, raw: np.ndarray | None, tag: int = 0,
                 d_new: np.ndarray | None = None, v_sq: torch.Tensor | None = None) -> int | None:
        """Insert one vector; ``d_new`` (size,) are its distances to the cached ones if known
        (the caller's array, which this may overwrite: the evicted slot's entry becomes inf).
        Returns the slot it went to, or None when it was itself the most redundant point."""
        n = self.size
        if n:
            if d_new is None:
                d_new = pairwise_sq_dist(v[None, :], self._emb[:n], self._sq[:n])[0] \
                    .sqrt().double().cpu().numpy()
            j = int(np.argmin(d_new))
            nn_new, nn_new_idx = float(d_new[j]), j
        else:
            d_new, nn_new, nn_new_idx = np.zeros(0), np.inf, -1
        if n < self.capacity:
            slot = n
            self.size += 1
        else:
            # Evict the most redundant point of cache ∪ {new}; the new point may be it.
            e = self._eviction_candidate()
            if nn_new <= self._nn[e]:
                self.evictions += 1
                return None
            slot = e
            self.evictions += 1
            d_new[e] = np.inf  # the evicted point is gone
            j = int(np.argmin(d_new))
            nn_new, nn_new_idx = float(d_new[j]), j
        self._emb[slot] = v
        self._sq[slot] = (v * v).sum() if v_sq is None else v_sq
        self._tag[slot] = tag
        if self._raw is not None and raw is not None:
            self._raw[slot, : len(raw)] = raw
            self._raw[slot, len(raw):] = 0.0
            self._raw_len[slot] = len(raw)
        m = len(d_new)
        if m:
            # Points whose nearest neighbour was the evicted one keep that distance as a lower
            # bound (stale); points now closer to the new one get an exact value.
            orphans = np.flatnonzero(self._nn_idx[:m] == slot)
            closer = np.flatnonzero(d_new < self._nn[:m])
            self._stale[orphans] = True
            self._nn[closer] = d_new[closer]
            self._nn_idx[closer] = slot
            self._stale[closer] = False
        self._nn[slot], self._nn_idx[slot], self._stale[slot] = nn_new, nn_new_idx, False
        return slot

    def _eviction_candidate(self) -> int:
        """Slot with the smallest exact nearest-neighbour distance: stale minima are refreshed
        until the minimum is fresh (stale values only underestimate, so that one is the true
        minimum)."""
        n = self.size
        while True:
            e = int(np.argmin(self._nn[:n]))
            if not self._stale[e]:
                return e
            self._recompute_nn(np.array([e]))

    def _recompute_nn(self, rows: np.ndarray) -> None:
        m = self.size
        at = np.arange(len(rows))
        if self._host is not None:
            emb, sq = self._host[0][:m], self._host[1][:m]
            d = sq[None, :] - 2.0 * (emb[rows] @ emb.T)  # (r, m) = |c|^2 - 2 x.c
            d[at, rows] = np.inf
            idx = d.argmin(axis=1)
            self._nn[rows] = np.sqrt(np.maximum(d[at, idx].astype(np.float64) + sq[rows], 0.0))
            self._nn_idx[rows] = idx
            self._stale[rows] = False
            return
        sel = torch.as_tensor(rows, device=self.device)
        d = pairwise_sq_dist(self._emb[sel], self._emb[:m], self._sq[:m])
        d[torch.arange(len(rows), device=self.device), sel] = float("inf")
        vals, idx = d.min(dim=1)
        self._nn[rows] = vals.sqrt().double().cpu().numpy()
        self._nn_idx[rows] = idx.cpu().numpy()
        self._stale[rows] = False

    # ---------------------------------------------------------------- model changes
    def invalidate(self, model_version: int) -> None:
        """Drop everything (the old embedding space is meaningless under the new model)."""
        self.size = 0
        self._nn[:] = np.inf
        self._nn_idx[:] = -1
        self._stale[:] = False
        self.model_version = int(model_version)

    def reproject(self, embed: Callable[[np.ndarray, int], torch.Tensor | np.ndarray],
                  model_version: int) -> None:
        """Re-embed the cached raw vectors with a new model and rebuild the neighbour cache.

        ``embed(raw, tag)`` maps the raw rows (n, d) of one tag to (n, k); ``d`` is the length
        they were inserted with. Raises ``ValueError`` if no raw vectors are kept.
        """
        if self._raw is None:
            raise ValueError("cache keeps no raw vectors; use invalidate() on a model change")
        n = self.size
        raw, lens, tags = self._raw[:n].copy(), self._raw_len[:n].copy(), self._tag[:n].copy()
        born = self._born[:n].copy()
        self.invalidate(model_version)
        # All rows fit again (same count), so re-inserting evicts nothing.
        for tag in np.unique(tags):
            for d in np.unique(lens[tags == tag]):
                sel = (tags == tag) & (lens == d)
                self.add(embed(raw[sel, :d], int(tag)), raw[sel, :d], tag=int(tag),
                         clock=born[sel])
