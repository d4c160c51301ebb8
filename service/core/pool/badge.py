"""BADGE for cross-modal matching: gradient embeddings + k-means++ seeding, over both modalities.

BADGE [BADGE] embeds each candidate as the gradient of the loss *with the model's own prediction
as label* w.r.t. the last layer, then picks a batch by k-means++ seeding [KMeansPP], which favours
points that are both large-norm (uncertain) and far apart (diverse). [BMMAL] builds on exactly
this seeding; :func:`kmeans_pp` is shared.

Adaptation to unaligned data: there is no classifier. The "prediction" of candidate ``x`` of
modality ``m`` (embedding ``z``, shape (k,)) is its partner among the other modality's candidates
``e_j``: ``s_j = <z, e_j> / tau``, ``p = softmax(s)``, pseudo-label ``y = argmax p``. The matching
loss ``-log p_y`` has ``dL/dz = sum_j (p_j - 1[j = y]) e_j / tau``. The "last layer" is the item's
projection head (a linear map of the raw feature ``h``), so the gradient embedding is
``g = outer(dL/dz, h)`` flattened, with two simplifications: (a) ``h`` is the raw feature
projected on the first 32 principal directions of that modality's candidates (numpy SVD of the
covariance, or of the Gram matrix when ``d > n``), zero-padded to 32, so ``g`` has ``k*32``
entries for either modality; (b) each modality's ``h`` is rescaled to unit root-mean-square
norm, so neither modality's raw feature scale dominates the norm-driven k-means++ seeding. The
derivative of the L2 normalisation inside the head is ignored (as BADGE ignores everything
below its last layer).
"""

from __future__ import annotations

import numpy as np
import torch

from service.core.pool.base import Pick, PoolState, check_budget
from service.core.pool.random import to_picks

_DUP_RTOL = 1e-6  # squared distances below this fraction of the squared norms count as 0


def _sample(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn with probability ∝ ``weights`` (non-negative, positive sum); one rng draw."""
    cum = np.cumsum(weights)
    j = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return min(j, weights.size - 1)


def kmeans_pp(
    g: np.ndarray,
    budget: int,
    rng: np.random.Generator,
    *,
    weights: np.ndarray | None = None,
    first: str = "norm",
) -> list[int]:
    """k-means++ seeding: distinct indices of ``budget`` rows of ``g``.

    The first center is sampled with probability ∝ ``||g_i||²`` (``first="norm"``, the BADGE
    choice used by this module: large gradients = uncertain items), or uniformly
    (``first="uniform"``, for plain clustering); every further center with probability ∝ ``D²``,
    the squared distance to the nearest chosen center (D² sampling). Optional ``weights``
    multiply both distributions (weighted k-means++). When every remaining candidate has zero
    probability (e.g. only duplicates of chosen rows, or all-zero rows, are left), the next center
    is drawn uniformly among the rows not yet chosen, so indices are always distinct.

    Parameters
    ----------
    g : ndarray of shape (n, D)
    budget : int
        Capped at ``n``; ``<= 0`` gives ``[]``.
    rng : numpy.random.Generator
        The only source of randomness.
    weights : ndarray of shape (n,), optional
        Non-negative sampling weights.
    first : {"norm", "uniform"}

    Returns
    -------
    list of int
        Distinct row indices in pick order. Cost ``O(n·D)`` per center.
    """
    x = np.asarray(g, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"g: expected shape (n, D), got {x.shape}")
    n = x.shape[0]
    budget = min(int(budget), n)
    if budget <= 0:
        return []
    if first not in ("norm", "uniform"):
        raise ValueError(f"first must be 'norm' or 'uniform', got {first!r}")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.all(w >= 0):
        raise ValueError("weights: expected non-negative values of shape (n,)")
    sq = np.einsum("ij,ij->i", x, x).astype(np.float64)
    chosen = np.zeros(n, dtype=bool)
    d2 = sq.copy() if first == "norm" else np.ones(n)
    picks: list[int] = []
    for _ in range(budget):
        p = np.where(chosen, 0.0, d2 * w)
        total = p.sum()
        if not total > 0:
            p = np.where(chosen, 0.0, 1.0)
        j = _sample(p, rng)
        picks.append(j)
        chosen[j] = True
        new = sq + sq[j] - 2.0 * (x @ x[j]).astype(np.float64)
        new[new <= _DUP_RTOL * (sq + sq[j])] = 0.0
        d2 = new if len(picks) == 1 else np.minimum(d2, new)
    return picks


def weighted_kmeans(
    points: np.ndarray,
    n_clusters: int,
    rng: np.random.Generator,
    *,
    weights: np.ndarray | None = None,
    n_iter: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """A few Lloyd iterations of (weighted) k-means from a weighted k-means++ initialisation.

    Parameters
    ----------
    points : ndarray of shape (n, k)
    n_clusters : int
        Capped at ``n`` (must be >= 1).
    rng : numpy.random.Generator
    weights : ndarray of shape (n,), optional
        Non-negative point weights (default: all 1).
    n_iter : int
        Lloyd iterations; a cluster that loses all its weight keeps its previous center.

    Returns
    -------
    centers : ndarray of shape (c, k), float64
    labels : ndarray of shape (n,), int
        Index of each point's nearest center.
    """
    x = np.asarray(points, dtype=np.float64)
    n = x.shape[0]
    c = min(int(n_clusters), n)
    if c < 1:
        raise ValueError(f"need at least one point and one cluster, got n={n}, c={n_clusters}")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    centers = x[kmeans_pp(x, c, rng, weights=w, first="uniform")].copy()
    xn = np.einsum("ij,ij->i", x, x)

    def assign(ctr: np.ndarray) -> np.ndarray:
        d2 = xn[:, None] + np.einsum("ij,ij->i", ctr, ctr)[None, :] - 2.0 * (x @ ctr.T)
        return np.argmin(d2, axis=1)

    labels = assign(centers)
    for _ in range(int(n_iter)):
        mass = np.bincount(labels, weights=w, minlength=c)
        member = np.zeros((n, c))
        member[np.arange(n), labels] = w
        sums = member.T @ x
        ok = mass > 0
        centers[ok] = sums[ok] / mass[ok, None]
        labels = assign(centers)
    return centers, labels


def pca_features(raw: np.ndarray, n_components: int = 32) -> np.ndarray:
    """Raw features projected on their first principal directions, zero-padded, unit RMS norm.

    Parameters
    ----------
    raw : ndarray of shape (n, d)
    n_components : int

    Returns
    -------
    ndarray of shape (n, n_components), float64
        PCA scores (first ``min(n, d, n_components)`` columns, the rest 0), scaled so that the
        mean squared row norm is 1 (left as is when all rows are equal).
    """
    x = np.asarray(raw, dtype=np.float64)
    n, d = x.shape
    out = np.zeros((n, n_components))
    if n == 0:
        return out
    xc = x - x.mean(axis=0)
    r = min(n, d, n_components)
    if d <= n:
        _, _, vt = np.linalg.svd(xc.T @ xc, hermitian=True)
        scores = xc @ vt[:r].T
    else:
        u, s, _ = np.linalg.svd(xc @ xc.T, hermitian=True)
        scores = u[:, :r] * np.sqrt(np.maximum(s[:r], 0.0))
    out[:, :r] = scores
    rms = np.sqrt(np.einsum("ij,ij->i", out, out).mean())
    if rms > 0:
        out /= rms
    return out


def matching_loss_grad(z: np.ndarray, bank: np.ndarray, tau: float) -> np.ndarray:
    """``dL/dz`` of ``L = -log softmax(<z, bank_j>/tau)_y`` with ``y`` = the argmax partner.

    Shape: z (n, k), bank (K, k) -> (n, k) float32. Zero when ``K < 2`` (the belief is certain).
    """
    zt = torch.as_tensor(np.asarray(z, dtype=np.float32))
    bt = torch.as_tensor(np.asarray(bank, dtype=np.float32))
    if bt.shape[0] < 2 or zt.shape[0] == 0:
        return np.zeros(tuple(zt.shape), dtype=np.float32)
    with torch.inference_mode():
        p = torch.softmax((zt @ bt.T) / tau, dim=1)
        p[torch.arange(p.shape[0]), p.argmax(dim=1)] -= 1.0
        return ((p @ bt) / tau).numpy()


def gradient_embeddings(state: PoolState, tau: float = 0.05, n_components: int = 32) -> np.ndarray:
    """BADGE gradient embeddings of all candidates in joint-index order.

    Returns
    -------
    ndarray of shape (n_0 + n_1, k * n_components), float32
        Row ``i`` is ``outer(dL/dz_i, h_i)`` flattened (see the module docstring).
    """
    parts = []
    for m in state.modalities:
        grad = matching_loss_grad(state.embedded[m], state.embedded[state.other(m)], tau)
        h = pca_features(state.raw[m], n_components).astype(np.float32)
        n = grad.shape[0]
        parts.append((grad[:, :, None] * h[:, None, :]).reshape(n, grad.shape[1] * n_components))
    return np.concatenate(parts, axis=0)


class BadgeStrategy:
    """BADGE over both modalities (see the module docstring).

    Parameters
    ----------
    tau : float
        Temperature of the partner softmax (default 0.05).
    n_components : int
        Dimensions kept of the raw features (default 32).
    """

    name = "badge"

    def __init__(self, tau: float = 0.05, n_components: int = 32):
        if not tau > 0:
            raise ValueError(f"temperature tau must be > 0, got {tau}")
        self.tau = float(tau)
        self.n_components = int(n_components)

    def select(self, state: PoolState, budget: int, rng: np.random.Generator) -> list[Pick]:
        """k-means++ seeding of the gradient embeddings; randomness from ``rng`` only."""
        budget = check_budget(state, budget)
        if budget == 0:
            return []
        g = gradient_embeddings(state, self.tau, self.n_components)
        return to_picks(state, kmeans_pp(g, budget, rng))
