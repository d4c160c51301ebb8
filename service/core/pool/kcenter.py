"""k-center greedy (core-set) selection with a distance cache, jointly over both modalities.

Follows the core-set approach [CoreSet] in the linear-time form of the appendix of [MMAL]: the
minimum distance of every candidate to the selection set is cached; it is computed once against
the already-acquired set (``O(n·s)``) and then refreshed against each newly picked point only
(``O(n·k)`` per greedy step), instead of recomputing all candidate-to-selection distances at
every step. Distances are Euclidean in the shared
(unit-norm) embedding space; the cache holds *squared* distances (same argmax, no square roots).

Adaptations for unaligned data (:class:`CoresetStrategy`):

* candidates of both modalities compete in one greedy loop, but the cache of each modality's
  candidates starts from that modality's own acquired set (``selected[m]``): coverage is judged
  within a modality, where the embedding space is most trustworthy before alignment;
* once a point is picked, the cache of *all* candidates (both modalities) is refreshed against
  it. A picked item's partner is likely to lie close to it in the shared space, so this keeps
  the batch from spending two acquisitions on both sides of one pair;
* a candidate with no reference yet (its modality has no acquired items and nothing was picked)
  has an infinite cache entry; such candidates are seeded first, starting from the one farthest
  from their mean (the classic cold-start seed).
"""

from __future__ import annotations

import numpy as np

from service.core.pool.base import Pick, PoolState, check_budget
from service.core.pool.random import joint_embedded, to_picks

_CHUNK = 1024


def sq_min_dist_to(points: np.ndarray, ref: np.ndarray, chunk: int = _CHUNK) -> np.ndarray:
    """Squared Euclidean distance of each point to its nearest reference point.

    Parameters
    ----------
    points : ndarray of shape (n, k)
    ref : ndarray of shape (s, k)
        ``s`` may be 0, in which case every entry is ``+inf``.
    chunk : int
        References are processed ``chunk`` at a time to bound memory at ``O(n·chunk)``.

    Returns
    -------
    ndarray of shape (n,), float64
        Cost ``O(n·s·k)``; this is the one-off initialisation of the cache.
    """
    p = np.asarray(points, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    out = np.full(p.shape[0], np.inf)
    if p.shape[0] == 0 or r.shape[0] == 0:
        return out
    pn = np.einsum("ij,ij->i", p, p)
    for start in range(0, r.shape[0], chunk):
        rc = r[start:start + chunk]
        d2 = pn[:, None] + np.einsum("ij,ij->i", rc, rc)[None, :] - 2.0 * (p @ rc.T)
        np.minimum(out, d2.min(axis=1), out=out)
    return np.maximum(out, 0.0, out=out)


def greedy_from_cache(
    points: np.ndarray, sq_min_dist: np.ndarray, budget: int, first: int | None = None
) -> list[int]:
    """Farthest-first traversal starting from a given cache of squared min-distances.

    Parameters
    ----------
    points : ndarray of shape (n, k)
    sq_min_dist : ndarray of shape (n,), float64
        Squared distance of each point to the current selection (``inf`` = no reference yet).
        **Updated in place** to include the picks; pass a private array.
    budget : int
        Number of points to pick; capped at ``n``.
    first : int or None
        Index of the first pick; default: the point with the largest cache entry, or, while some
        entries are ``inf``, the ``inf`` point farthest from the mean of the ``inf`` points.

    Returns
    -------
    list of int
        Distinct indices into ``points``, in pick order. Cost ``O(n·k)`` per pick.
    """
    p = np.asarray(points, dtype=np.float64)
    n = p.shape[0]
    budget = min(int(budget), n)
    if budget <= 0:
        return []
    if sq_min_dist.shape != (n,):
        raise ValueError(f"sq_min_dist: expected shape ({n},), got {sq_min_dist.shape}")
    taken = np.zeros(n, dtype=bool)
    picks: list[int] = []
    for step in range(budget):
        if step == 0 and first is not None:
            j = int(first)
            if not 0 <= j < n:
                raise ValueError(f"first={first} is out of range for {n} points")
        else:
            masked = np.where(taken, -1.0, sq_min_dist)
            j = int(np.argmax(masked))
            if np.isinf(masked[j]):
                # No reference for these points yet: seed with the one farthest from their mean.
                unref = np.flatnonzero(np.isinf(masked))
                c = p[unref] - p[unref].mean(axis=0)
                j = int(unref[np.argmax(np.einsum("ij,ij->i", c, c))])
        picks.append(j)
        taken[j] = True
        diff = p - p[j]
        np.minimum(sq_min_dist, np.einsum("ij,ij->i", diff, diff), out=sq_min_dist)
    return picks


def k_center_greedy(
    points: np.ndarray,
    selected: np.ndarray,
    budget: int,
    first: int | None = None,
    *,
    return_min_dist: bool = False,
):
    """Greedy 2-approximation of k-center: repeatedly pick the point farthest from the selection.

    Parameters
    ----------
    points : ndarray of shape (n, k)
        Candidates.
    selected : ndarray of shape (s, k)
        Already-selected points (``s`` may be 0).
    budget : int
        Number of picks; capped at ``n``; ``<= 0`` gives ``[]``.
    first : int or None
        Optional index of the first pick. Without it and with ``s == 0`` the first pick is the
        point farthest from the mean of ``points``.
    return_min_dist : bool
        Also return the final cache: the Euclidean distance of each point to
        ``selected ∪ picks``, shape (n,).

    Returns
    -------
    list of int, or (list of int, ndarray of shape (n,))
        Distinct indices into ``points`` in pick order. Total cost ``O(n·s·k + budget·n·k)``.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"points: expected shape (n, k), got {p.shape}")
    sel = np.asarray(selected, dtype=np.float64).reshape(-1, p.shape[1])
    cache = sq_min_dist_to(p, sel)
    picks = greedy_from_cache(p, cache, budget, first)
    if return_min_dist:
        return picks, np.sqrt(cache)
    return picks


class CoresetStrategy:
    """k-center greedy jointly over both modalities' candidates (see the module docstring)."""

    name = "coreset"

    def select(self, state: PoolState, budget: int, rng: np.random.Generator) -> list[Pick]:
        """Return up to ``budget`` distinct picks; deterministic (``rng`` is not needed)."""
        budget = check_budget(state, budget)
        if budget == 0:
            return []
        points = joint_embedded(state)
        cache = np.concatenate(
            [sq_min_dist_to(state.embedded[m], state.selected[m]) for m in state.modalities]
        )
        return to_picks(state, greedy_from_cache(points, cache, budget))
