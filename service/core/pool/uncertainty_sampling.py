"""Top-``budget`` cross-modal uncertainty sampling: entropy and margin, over both modalities.

Classic uncertainty sampling (entropy [Settles], the Entropy baseline of [BMMAL] §4.2; margin
[TongKoller], the classification margin of [VeCAF] §2.1) adapted to unaligned data as in [MMAL]: an
item has no class label, so its "prediction" is the softmax (temperature ``tau``) of its
similarities to the *other* modality's candidates
(:func:`service.core.pool.base.other_modality_sims`), i.e. the model's belief about which of them
is its partner. The scores themselves come from :mod:`service.core.uncertainty`.

Adaptation: the two modalities' scores are computed against different banks (``n_1`` vs ``n_0``
items), so their scales differ and raw top-k would let one modality take the whole batch. Each
modality's scores are therefore rank-normalised to ``[0, 1]`` (average ranks for ties) before the
two lists are merged; ties after rank normalisation are broken by the raw score, then by joint
index. With fewer than two candidates in the other modality the partner belief is degenerate
(certain), and every score of that modality is 0.
"""

from __future__ import annotations

import numpy as np

from service.core.pool.base import Pick, PoolState, check_budget, other_modality_sims
from service.core.pool.random import to_picks
from service.core.uncertainty import uncertainty


def cross_modal_scores(
    state: PoolState, modality: str, kind: str, tau: float = 0.05, rows: np.ndarray | None = None
) -> np.ndarray:
    """Uncertainty of each candidate of ``modality`` against the other modality's candidates.

    Parameters
    ----------
    state : PoolState
    modality : str
    kind : {"margin", "entropy", "least_confidence"}
        Passed to :func:`service.core.uncertainty.uncertainty` ("higher = less sure").
    tau : float
        Softmax temperature.
    rows : ndarray of int of shape (r,), optional
        Score only these candidates (the similarity matrix is restricted to these rows, which is
        cheaper than slicing the full :func:`other_modality_sims` matrix).

    Returns
    -------
    ndarray of shape (n_modality,) or (r,), float64
    """
    other = state.other(modality)
    n_rows = state.size(modality) if rows is None else len(rows)
    if n_rows == 0 or state.size(other) < 2:
        return np.zeros(n_rows)
    if rows is None:
        sims = other_modality_sims(state, modality)
    else:
        sims = state.embedded[modality][np.asarray(rows, dtype=np.intp)] @ state.embedded[other].T
    return uncertainty(kind, sims, tau)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the mean of their ranks.

    Shape: (n,) -> (n,) float64. The same numbers as ``scipy.stats.rankdata(values,
    method="average")`` (the core depends on numpy and torch only): a run of ``c`` equal values
    starting at sorted position ``i`` (0-based) gets ``i + 1 + (c - 1) / 2``, exact in float64.
    Any NaN makes every rank NaN (scipy's default ``nan_policy="propagate"``).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if np.isnan(x).any():
        return np.full(n, np.nan)
    order = np.argsort(x, kind="stable")
    y = x[order]
    starts = np.flatnonzero(np.concatenate(([True], y[1:] != y[:-1])))
    counts = np.diff(np.append(starts, n))
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(starts + 1 + (counts - 1) / 2.0, counts)
    return ranks


def rank_normalise(scores: np.ndarray) -> np.ndarray:
    """Map scores to ``(rank - 1) / (n - 1)`` in [0, 1] (average ranks for ties).

    Shape: (n,) -> (n,). A single score maps to 0.5.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return s.copy()
    if s.size == 1:
        return np.full(1, 0.5)
    return (average_ranks(s) - 1.0) / (s.size - 1.0)


class _CrossModalUncertaintyStrategy:
    """Top-``budget`` by rank-normalised cross-modal uncertainty (see the module docstring)."""

    name = ""
    kind = ""

    def __init__(self, tau: float = 0.05):
        if not tau > 0:
            raise ValueError(f"temperature tau must be > 0, got {tau}")
        self.tau = float(tau)

    def scores(self, state: PoolState) -> tuple[np.ndarray, np.ndarray]:
        """Rank-normalised and raw scores in joint-index order, each of shape (n_0 + n_1,)."""
        raw = [cross_modal_scores(state, m, self.kind, self.tau) for m in state.modalities]
        ranked = [rank_normalise(r) for r in raw]
        return np.concatenate(ranked), np.concatenate(raw)

    def select(self, state: PoolState, budget: int, rng: np.random.Generator) -> list[Pick]:
        """The ``budget`` most uncertain candidates; deterministic (``rng`` is not needed)."""
        budget = check_budget(state, budget)
        if budget == 0:
            return []
        ranked, raw = self.scores(state)
        order = np.lexsort((np.arange(ranked.size), -raw, -ranked))
        return to_picks(state, order[:budget])


class EntropyStrategy(_CrossModalUncertaintyStrategy):
    """Highest normalised entropy of the partner belief first."""

    name = "entropy"
    kind = "entropy"


class MarginStrategy(_CrossModalUncertaintyStrategy):
    """Smallest gap between the two most likely partners (highest ``margin_uncertainty``) first."""

    name = "margin"
    kind = "margin"
