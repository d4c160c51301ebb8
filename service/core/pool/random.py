"""Uniform random selection over the candidates of both modalities, plus the joint-index helpers.

This is the passive-learning baseline every paper pairsieve is built from compares against
(the "Random" baseline of [MMAL] §4 and [BMMAL] §4.2; the randomly sampled finetuning of
[VeCAF] §4.1; keys: ``docs/references.md``). No adaptation is needed beyond treating the
candidates of the two modalities as one pool: each unacquired item of either modality has the same
chance of being sent for alignment.

The helpers :func:`joint_embedded` and :func:`to_picks` define the *joint index* the other
strategies use: the candidates of ``modalities[0]`` come first (rows ``0 .. n_0 - 1``), then those
of ``modalities[1]`` (rows ``n_0 .. n_0 + n_1 - 1``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from service.core.pool.base import Pick, PoolState, check_budget


def joint_embedded(state: PoolState, dtype=np.float64) -> np.ndarray:
    """The candidates' embeddings of both modalities stacked in joint-index order.

    Returns
    -------
    ndarray of shape (n_0 + n_1, k)
        A new array (never a view of ``state``), ``dtype`` float64 by default.
    """
    m0, m1 = state.modalities
    return np.concatenate(
        [np.asarray(state.embedded[m0], dtype=dtype), np.asarray(state.embedded[m1], dtype=dtype)],
        axis=0,
    )


def to_picks(state: PoolState, flat: Iterable[int]) -> list[Pick]:
    """Map joint indices (see the module docstring) to ``(modality, row)`` picks, keeping order."""
    m0, m1 = state.modalities
    n0 = state.size(m0)
    return [(m0, int(i)) if int(i) < n0 else (m1, int(i) - n0) for i in flat]


class RandomStrategy:
    """Uniform sampling without replacement over all candidates of both modalities.

    ``select`` returns ``min(budget, n_0 + n_1)`` distinct picks drawn with ``rng`` only.
    """

    name = "random"

    def select(self, state: PoolState, budget: int, rng: np.random.Generator) -> list[Pick]:
        """Pick ``budget`` candidates uniformly at random. Shape of the result: ``budget`` picks."""
        budget = check_budget(state, budget)
        if budget == 0:
            return []
        total = sum(state.size(m) for m in state.modalities)
        flat = rng.choice(total, size=budget, replace=False)
        return to_picks(state, flat)
