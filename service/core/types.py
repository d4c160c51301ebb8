"""Core value types (frozen dataclasses): what goes into the selector and what comes out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FeatureItem:
    """One unimodal item to decide on.

    Attributes
    ----------
    item_id : str
        Stable id of the item (dedup key across redeliveries).
    modality : str
    vector : ndarray of shape (d_modality,)
        The unimodal feature vector (raw encoder output).
    """

    item_id: str
    modality: str
    vector: np.ndarray


@dataclass(frozen=True)
class Decision:
    """The selector's verdict on one item, with every component that led to it.

    ``reason`` is a :class:`~service.core.reasons.Reason` (a ``str``: ``accept:utility``...).
    """

    item_id: str
    modality: str
    accept: bool
    utility: float
    uncertainty: float
    diversity: float
    coverage_bonus: float
    margin: float
    entropy: float
    least_confidence: float
    threshold: float
    model_version: int
    reason: str
    typicality: float = 0.0  # raw mean top-k cosine to its own modality's recent items (0: off)
    partnerless: float = 0.0  # utility penalty for resembling an item answered NO_MATCH
    cost: float = 0.0  # cost units an accept spends (budget_unit "cost": the expected cost)
