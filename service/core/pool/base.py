"""The shared interface of pool-based selection strategies.

A pool strategy sees the unacquired candidates of both modalities (raw features and their
embeddings under the current alignment model) and the embeddings of what was already acquired,
and returns which candidates to send for alignment next. Each strategy is one small module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.core.cross_modal_model import CrossModalModel


@dataclass(frozen=True)
class PoolState:
    """Everything a pool strategy may look at. Nothing in it reveals the hidden pairing.

    Attributes
    ----------
    modalities : tuple of str
        The two modality names ``(m0, m1)``.
    raw : dict of str to ndarray of shape (n_m, d_m)
        Raw features of the unacquired candidates of each modality.
    embedded : dict of str to ndarray of shape (n_m, k)
        The same candidates under the current model, rows L2-normalised.
    selected : dict of str to ndarray of shape (s_m, k)
        Embeddings of acquired items of each modality (both sides of every revealed pair),
        rows L2-normalised; ``s_m`` may be 0.
    model : CrossModalModel
        The current alignment model (version 0 = cold start, not yet aligned).
    acquired_per_modality : dict of str to int
        How many acquisitions so far were made by picking an item of each modality.
    """

    modalities: tuple[str, str]
    raw: dict[str, np.ndarray]
    embedded: dict[str, np.ndarray]
    selected: dict[str, np.ndarray]
    model: CrossModalModel
    acquired_per_modality: dict[str, int] = field(default_factory=dict)

    def other(self, modality: str) -> str:
        a, b = self.modalities
        return b if modality == a else a

    def size(self, modality: str) -> int:
        return int(self.embedded[modality].shape[0])


Pick = tuple[str, int]  # (modality, row index into that modality's candidates)


class PoolStrategy(Protocol):
    """``select`` returns up to ``budget`` distinct picks; it must not mutate ``state``."""

    name: str

    def select(self, state: PoolState, budget: int, rng: np.random.Generator) -> list[Pick]:
        ...


def check_budget(state: PoolState, budget: int) -> int:
    """Validate ``budget`` and cap it at the number of candidates."""
    if int(budget) < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    total = sum(state.size(m) for m in state.modalities)
    return min(int(budget), total)


def other_modality_sims(state: PoolState, modality: str) -> np.ndarray:
    """Cosine similarities of each candidate of ``modality`` to the OTHER modality's candidates.

    Shape: (n_modality, n_other). The uncertainty scores of :mod:`service.core.uncertainty` take
    this matrix (for a pool, the "bank of the other modality" is its unacquired candidates).
    """
    return state.embedded[modality] @ state.embedded[state.other(modality)].T
