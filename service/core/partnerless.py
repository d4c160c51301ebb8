"""Items annotators answered NO_MATCH: probably partnerless, and so are their near neighbours.

A NO_MATCH says the item has no partner among the candidates, or at all (a missing modality: an
image whose caption never arrives, a verse one translation lacks). Acquiring more items like it
buys nothing, so the selector lowers the utility of an item by

    penalty = weight * clip((s - radius) / (1 - radius), 0, 1)

where ``s`` is its largest cosine similarity to a remembered partnerless item of its own modality
in the model's shared space: full ``weight`` for a near-duplicate of one, nothing beyond the
``radius``. The memory is bounded (the newest ``capacity`` per modality) and keeps the raw
vectors, so a new model re-embeds them (the space changes with every version).

Shapes: ``raw`` (n, d_modality); :meth:`PartnerlessMemory.penalty` takes embeddings (B, k) of
unit norm and returns (B,).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["PartnerlessMemory"]


class PartnerlessMemory:
    """The newest ``capacity`` partnerless items of one modality and the penalty they give.

    Parameters
    ----------
    capacity : int
        Items kept (the oldest go first).
    weight : float
        Largest utility penalty (a near-duplicate of a partnerless item); 0 turns it off.
    radius : float
        Cosine similarity below which an item is not penalised, in [0, 1).

    Raises
    ------
    ValueError
        On a capacity below 1, a negative weight or a radius outside [0, 1).
    """

    def __init__(self, capacity: int = 1024, weight: float = 0.5, radius: float = 0.8):
        if capacity < 1:
            raise ValueError(f"partnerless capacity must be >= 1, got {capacity}")
        if not (np.isfinite(weight) and weight >= 0):
            raise ValueError(f"partnerless weight must be >= 0, got {weight!r}")
        if not (0.0 <= radius < 1.0):
            raise ValueError(f"partnerless radius must be in [0, 1), got {radius!r}")
        self.capacity, self.weight, self.radius = int(capacity), float(weight), float(radius)
        self._raw: list[np.ndarray] = []
        self._emb: torch.Tensor | None = None  # (n, k) for _version
        self._version: int | None = None

    def __len__(self) -> int:
        return len(self._raw)

    def add(self, raw: np.ndarray) -> None:
        """Remember partnerless items (n, d); the oldest beyond ``capacity`` are dropped."""
        self._raw.extend(np.asarray(raw, dtype=np.float32).reshape(len(raw), -1))
        del self._raw[:max(0, len(self._raw) - self.capacity)]
        self._emb = None

    def penalty(self, z: torch.Tensor, version: int,
                embed: Callable[[np.ndarray], torch.Tensor]) -> np.ndarray:
        """The utility penalty of each embedded item. z: (B, k) unit rows -> (B,) in [0, weight].

        ``embed(raw (n, d)) -> (n, k)`` embeds the remembered items with the model of
        ``version`` (done once per version and content).
        """
        if not self._raw or self.weight == 0.0:
            return np.zeros(z.shape[0])
        if self._emb is None or self._version != version:
            self._emb = embed(np.stack(self._raw)).to(dtype=z.dtype, device=z.device)
            self._version = version
        with torch.inference_mode():
            s = (z @ self._emb.T).amax(dim=1).double().cpu().numpy()
        return self.weight * np.clip((s - self.radius) / (1.0 - self.radius), 0.0, 1.0)
