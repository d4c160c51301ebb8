"""Objective-aware data selection (ODS) of VeCAF ([VeCAF]), adapted to unaligned items.

[VeCAF] §3.1 picks a subset whose finetuning most reduces the training objective. It assumes
that a point with a larger loss helps convergence more (principle 1: sample with probability
``p_L ∝ L``, eq. 3) while keeping the subset diverse (principle 2, the regulariser ``R`` of
eq. 6). The selection model is a set of ``K`` centroids in an embedding space, each selecting its
nearest data point (eq. 4); they are optimised by gradient descent on eq. 7, a loss-weighted
k-means-like objective plus a repulsion between centroids.

Adaptations for unaligned multimodal pools (no labels, no captions; the CEA part of VeCAF does
not apply):

* **Objective.** The loss of candidate ``x`` is the cross-modal matching loss the model would
  incur with its own best guess as label: ``L = -log p(top-1 pseudo-partner)``, where ``p`` is the
  softmax (temperature ``tau``) of its similarities to the other modality's candidates,
  obtained as ``-log(1 - least_confidence)`` from :mod:`service.core.uncertainty`. Higher =
  harder. ``L = 0`` when the other modality has fewer than two candidates.
* **Loss distribution.** ``p_L ∝ exp(L / T)`` (temperature ``T``, default 1) instead of eq. 3's
  ``p_L ∝ L``: it stays positive when ``L`` is 0 and ``T`` tunes how greedy it is.
* **Centroids.** Instead of gradient descent on eq. 7 with an ensemble de-biasing step, the
  ``budget`` centroids are found by a few Lloyd iterations of *loss-weighted* k-means (weights
  ``p_L``, weighted k-means++ init, given ``rng``) in the shared embedding space over the
  candidates of both modalities; weighted k-means minimises the same loss-weighted
  distortion that eq. 5 expresses through ``p_S``.
* **Diversity.** Eq. 6's centroid repulsion is replaced by an explicit minimum distance:
  centroids (heaviest loss mass first) each take their nearest not-yet-picked candidate, skipping
  candidates closer than ``min_dist`` (default: half the median nearest-neighbour distance among
  the candidates) to an already-acquired item of either modality or to a pick of this round.
  A centroid with no admissible candidate is served last, by its nearest unpicked candidate.
  The distances to "acquired ∪ picked" are kept in a cache refreshed in ``O(n·k)`` per pick
  (:mod:`service.core.pool.kcenter`).
"""

from __future__ import annotations

import numpy as np

from service.core.pool.badge import weighted_kmeans
from service.core.pool.base import Pick, PoolState, check_budget
from service.core.pool.kcenter import sq_min_dist_to
from service.core.pool.random import joint_embedded, to_picks
from service.core.pool.uncertainty_sampling import cross_modal_scores

_MAX_ROWS = 1024


def pseudo_loss(state: PoolState, tau: float = 0.05) -> np.ndarray:
    """``-log p(top-1 pseudo-partner)`` of every candidate, joint-index order, shape (N,)."""
    parts = []
    for m in state.modalities:
        lc = cross_modal_scores(state, m, "least_confidence", tau)
        parts.append(-np.log(np.maximum(1.0 - lc, 1e-300)))
    return np.maximum(np.concatenate(parts), 0.0)


def loss_distribution(loss: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``p_L ∝ exp(L / T)``, normalised. Shape (N,) -> (N,)."""
    s = np.asarray(loss, dtype=np.float64) / temperature
    if s.size == 0:
        return s
    e = np.exp(s - s.max())
    return e / e.sum()


def median_nn_distance(points: np.ndarray, max_rows: int = _MAX_ROWS) -> float:
    """Median over points of the Euclidean distance to their nearest *other* point.

    Parameters
    ----------
    points : ndarray of shape (n, k)
    max_rows : int
        For ``n > max_rows`` the median is estimated on ``max_rows`` evenly spaced rows
        (deterministic), each still compared with all ``n`` points: ``O(max_rows·n·k)``.

    Returns
    -------
    float
        0.0 when ``n < 2``.
    """
    x = np.asarray(points, dtype=np.float32)
    n = x.shape[0]
    if n < 2:
        return 0.0
    rows = np.arange(n) if n <= max_rows else np.linspace(0, n - 1, max_rows).astype(np.intp)
    xn = np.einsum("ij,ij->i", x, x)
    d2 = xn[None, :] - 2.0 * (x[rows] @ x.T)  # + xn[rows] below, after the min
    d2[np.arange(rows.size), rows] = np.inf
    nn = d2.min(axis=1) + xn[rows]
    return float(np.sqrt(max(float(np.median(nn)), 0.0)))


class VeCAFStrategy:
    """Loss-weighted centroids + minimum-distance diversity (see the module docstring).

    Parameters
    ----------
    tau : float
        Temperature of the partner softmax in the pseudo-loss (default 0.05).
    temperature : float
        ``T`` of ``p_L ∝ exp(L / T)`` (default 1.0).
    min_dist : float or None
        Minimum distance between a pick and any acquired item or other pick; ``None`` = half the
        median nearest-neighbour distance among the candidates.
    n_iter : int
        Lloyd iterations of the weighted k-means (default 5).
    """

    name = "vecaf"

    def __init__(self, tau: float = 0.05, temperature: float = 1.0,
                 min_dist: float | None = None, n_iter: int = 5):
        if not tau > 0:
            raise ValueError(f"temperature tau must be > 0, got {tau}")
        if not temperature > 0:
            raise ValueError(f"temperature T must be > 0, got {temperature}")
        if min_dist is not None and not min_dist >= 0:
            raise ValueError(f"min_dist must be >= 0, got {min_dist}")
        self.tau = float(tau)
        self.temperature = float(temperature)
        self.min_dist = None if min_dist is None else float(min_dist)
        self.n_iter = int(n_iter)

    def effective_min_dist(self, points: np.ndarray) -> float:
        """``min_dist``, or its data-driven default for these candidates ``(N, k)``."""
        if self.min_dist is not None:
            return self.min_dist
        return 0.5 * median_nn_distance(points)

    def select(self, state: PoolState, budget: int, rng: np.random.Generator) -> list[Pick]:
        """Return up to ``budget`` distinct picks; randomness (k-means++ init) from ``rng``."""
        budget = check_budget(state, budget)
        if budget == 0:
            return []
        x = joint_embedded(state)
        weights = loss_distribution(pseudo_loss(state, self.tau), self.temperature)
        centers, labels = weighted_kmeans(x, budget, rng, weights=weights, n_iter=self.n_iter)
        mass = np.bincount(labels, weights=weights, minlength=centers.shape[0])
        order = np.argsort(-mass, kind="stable")

        k = x.shape[1]
        acquired = np.concatenate(
            [np.asarray(state.selected[m], dtype=np.float64).reshape(-1, k)
             for m in state.modalities]
        )
        cache = sq_min_dist_to(x, acquired)  # squared distance to acquired ∪ picked
        min_d2 = self.effective_min_dist(x) ** 2
        picked = np.zeros(x.shape[0], dtype=bool)
        picks: list[int] = []
        deferred: list[np.ndarray] = []

        def take(j: int) -> None:
            picks.append(j)
            picked[j] = True
            diff = x - x[j]
            np.minimum(cache, np.einsum("ij,ij->i", diff, diff), out=cache)

        for ci in order:
            diff = x - centers[ci]
            d2 = np.einsum("ij,ij->i", diff, diff)
            admissible = ~picked & (cache >= min_d2)
            if admissible.any():
                take(int(np.argmin(np.where(admissible, d2, np.inf))))
            else:
                deferred.append(d2)
        for d2 in deferred:
            take(int(np.argmin(np.where(picked, np.inf, d2))))
        return to_picks(state, picks)
