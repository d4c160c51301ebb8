"""Balanced multimodal active learning ([BMMAL]) adapted to unaligned items.

[BMMAL] §3.4-3.5 scores a multimodal sample by the Shapley value [Shapley] of each modality
feature for the model's outcome ``V`` = the largest predicted class probability (eq. 10;
two-player form eq. 11, with a missing modality replaced by the zero vector), turns them into
contributions ``Phi = |phi| / sum |phi|`` (eq. 12) and a dominance degree
``rho = |Phi_1 - Phi_2|``, weights the stronger modality by 1 and the weaker by ``1 - rho``
(eq. 14), scales the per-modality [BADGE] gradient embeddings ``(p - onehot(yhat)) ⊗ z_m``
(eq. 13) by these weights (eq. 15) and picks a batch by k-means++ seeding [KMeansPP] of the
modulated embeddings.

Adaptations to unaligned data, where there is neither a class label nor a paired sample:

* **Pseudo-pair.** A candidate of modality ``m`` is paired with its top-1 match in the other
  modality's candidates (highest embedding similarity). With no candidate left in the other
  modality, the partner is missing (zero vector).
* **Pseudo-classes.** The "classifier" is a set of prototypes: k-means (k-means++ init plus a few
  Lloyd iterations, with the given ``rng``; ``n_proto = min(10, #points)`` clusters,
  re-normalised to unit length) of the acquired items' embeddings. The acquired sets of the two
  modalities are not row-aligned in :class:`~service.core.pool.base.PoolState`, so each acquired
  item contributes its own embedding (its fused embedding with only one modality available, i.e.
  itself). Without any acquired item, the candidates' embeddings are clustered instead.
* **Fusion and outcome.** ``fused = normalize(mean(z_1, z_2))`` (the zero vector stays zero, so
  both modalities missing gives uniform probabilities), logits ``<fused, prototypes> / tau``,
  ``V`` = the max softmax probability.
* Gradient embeddings are laid out in the fixed modality order ``(m_0 part, m_1 part)`` for
  every candidate, whichever side it is on, so an item and its pseudo-partner get nearby
  embeddings and k-means++ rarely spends two picks on one pair. Seeding reuses
  :func:`service.core.pool.badge.kmeans_pp` over the candidates of both modalities.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from service.core.pool.badge import kmeans_pp, weighted_kmeans
from service.core.pool.base import Pick, PoolState, check_budget, other_modality_sims
from service.core.pool.random import to_picks

_EPS = 1e-12


class Contributions(NamedTuple):
    """Per-sample Shapley attribution between two modalities; every field has shape (n,)."""

    phi_first: np.ndarray  #: Shapley value of the first modality (eq. 11)
    phi_second: np.ndarray  #: Shapley value of the second modality (eq. 11)
    contrib_first: np.ndarray  #: Phi of the first modality (eq. 12)
    contrib_second: np.ndarray  #: Phi of the second modality (eq. 12)
    rho: np.ndarray  #: dominance degree |Phi_1 - Phi_2|
    w_first: np.ndarray  #: gradient weight of the first modality (eq. 14)
    w_second: np.ndarray  #: gradient weight of the second modality (eq. 14)


def modality_contributions(v_both, v_first_only, v_second_only, v_none) -> Contributions:
    """Shapley values (eq. 11), contributions (eq. 12), dominance and weights (eq. 14).

    Parameters
    ----------
    v_both : array-like of shape (n,)
        ``V(z_1, z_2)``.
    v_first_only : array-like of shape (n,)
        ``V(z_1, ∅)``: the second modality zeroed.
    v_second_only : array-like of shape (n,)
        ``V(∅, z_2)``: the first modality zeroed.
    v_none : array-like of shape (n,) or scalar
        ``V(∅, ∅)``.

    Returns
    -------
    Contributions
        ``contrib_first + contrib_second == 1`` (0.5 each when both Shapley values are 0);
        the modality with the larger contribution (the first one on ties) gets weight 1, the
        other ``1 - rho``.
    """
    vb = np.asarray(v_both, dtype=np.float64)
    v1 = np.asarray(v_first_only, dtype=np.float64)
    v2 = np.asarray(v_second_only, dtype=np.float64)
    v0 = np.broadcast_to(np.asarray(v_none, dtype=np.float64), vb.shape)
    phi1 = 0.5 * ((vb - v2) + (v1 - v0))
    phi2 = 0.5 * ((vb - v1) + (v2 - v0))
    a1, a2 = np.abs(phi1), np.abs(phi2)
    total = a1 + a2
    safe = np.where(total > 0, total, 1.0)
    c1 = np.where(total > 0, a1 / safe, 0.5)
    c2 = np.where(total > 0, a2 / safe, 0.5)
    rho = np.abs(c1 - c2)
    first_strong = c1 >= c2
    w1 = np.where(first_strong, 1.0, 1.0 - rho)
    w2 = np.where(first_strong, 1.0 - rho, 1.0)
    return Contributions(phi1, phi2, c1, c2, rho, w1, w2)


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit-norm rows; (near-)zero rows become exactly zero. Shape (n, k) -> (n, k)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    ok = norms > _EPS
    return np.where(ok, x / np.where(ok, norms, 1.0), 0.0)


def fused_probs(z_first: np.ndarray, z_second: np.ndarray, prototypes: np.ndarray,
                tau: float) -> np.ndarray:
    """Pseudo-class probabilities of fused embeddings.

    Shape: z_first (n, k), z_second (n, k), prototypes (C, k) -> (n, C). A zero row in an input
    means "modality missing"; both missing gives the uniform distribution.
    """
    fused = _normalize_rows(0.5 * (z_first + z_second))
    with torch.inference_mode():
        return torch.softmax(torch.from_numpy(fused @ prototypes.T) / tau, dim=1).numpy()


def pseudo_pairs(state: PoolState) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of both sides of every candidate's pseudo-pair, in joint-index order.

    Returns
    -------
    z_first, z_second : ndarray of shape (n_0 + n_1, k), float64
        ``z_first`` holds the ``modalities[0]`` side (the candidate itself for rows of
        ``modalities[0]``, its top-1 match otherwise); likewise ``z_second``. A missing partner
        is a zero row.
    """
    m0, _ = state.modalities
    firsts, seconds = [], []
    for m in state.modalities:
        own = np.asarray(state.embedded[m], dtype=np.float64)
        bank = np.asarray(state.embedded[state.other(m)], dtype=np.float64)
        if bank.shape[0] > 0 and own.shape[0] > 0:
            partner = bank[np.argmax(other_modality_sims(state, m), axis=1)]
        else:
            partner = np.zeros_like(own)
        if m == m0:
            firsts.append(own)
            seconds.append(partner)
        else:
            firsts.append(partner)
            seconds.append(own)
    return np.concatenate(firsts), np.concatenate(seconds)


class BMMALStrategy:
    """Shapley-modulated BADGE over both modalities (see the module docstring).

    Parameters
    ----------
    tau : float
        Temperature of the prototype logits (default 0.05).
    n_proto : int
        Maximum number of pseudo-classes (default 10).
    n_iter : int
        Lloyd iterations of the prototype k-means (default 5).
    """

    name = "bmmal"

    def __init__(self, tau: float = 0.05, n_proto: int = 10, n_iter: int = 5):
        if not tau > 0:
            raise ValueError(f"temperature tau must be > 0, got {tau}")
        if int(n_proto) < 1:
            raise ValueError(f"n_proto must be >= 1, got {n_proto}")
        self.tau = float(tau)
        self.n_proto = int(n_proto)
        self.n_iter = int(n_iter)

    def prototypes(self, state: PoolState, rng: np.random.Generator) -> np.ndarray:
        """Unit-norm pseudo-class prototypes, shape (C, k) with ``C = min(n_proto, #points)``."""
        k = np.asarray(state.embedded[state.modalities[0]]).shape[1]
        src = np.concatenate(
            [np.asarray(state.selected[m], dtype=np.float64).reshape(-1, k)
             for m in state.modalities]
        )
        if src.shape[0] == 0:
            src = np.concatenate(
                [np.asarray(state.embedded[m], dtype=np.float64) for m in state.modalities]
            )
        centers, _ = weighted_kmeans(src, min(self.n_proto, src.shape[0]), rng,
                                     n_iter=self.n_iter)
        return _normalize_rows(centers)

    def gradient_embeddings(self, state: PoolState, rng: np.random.Generator) -> np.ndarray:
        """Modulated gradient embeddings (eq. 15) in joint-index order, shape (N, 2·C·k)."""
        z1, z2 = pseudo_pairs(state)
        protos = self.prototypes(state, rng)
        zero = np.zeros_like(z1)
        p = fused_probs(z1, z2, protos, self.tau)
        v_first = fused_probs(z1, zero, protos, self.tau).max(axis=1)
        v_second = fused_probs(zero, z2, protos, self.tau).max(axis=1)
        v_none = 1.0 / protos.shape[0]  # the zero vector's logits are all 0: uniform
        c = modality_contributions(p.max(axis=1), v_first, v_second, v_none)
        q = p.copy()
        q[np.arange(q.shape[0]), q.argmax(axis=1)] -= 1.0  # f_i - 1[yhat = i] (eq. 13)
        n = q.shape[0]
        g1 = (c.w_first[:, None, None] * q[:, :, None] * z1[:, None, :]).reshape(n, -1)
        g2 = (c.w_second[:, None, None] * q[:, :, None] * z2[:, None, :]).reshape(n, -1)
        return np.concatenate([g1, g2], axis=1)

    def select(self, state: PoolState, budget: int, rng: np.random.Generator) -> list[Pick]:
        """k-means++ seeding of the modulated embeddings; randomness from ``rng`` only."""
        budget = check_budget(state, budget)
        if budget == 0:
            return []
        g = self.gradient_embeddings(state, rng)
        return to_picks(state, kmeans_pp(g, budget, rng))
