"""Core value types (frozen dataclasses): what goes into the selector and what comes out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

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


DECISION_FIELDS = tuple(f.name for f in fields(Decision))


def decisions_from_columns(columns: Mapping[str, Sequence]) -> list[Decision]:
    """One :class:`Decision` per row of ``columns`` (field name -> one value per item).

    The batch constructor of the selector: the same objects as ``Decision(**row)`` (equal,
    frozen to their users), at about half the cost of the generated ``__init__``, which sets
    each of the 16 fields through ``object.__setattr__`` (a frozen dataclass's way).

    Raises
    ------
    ValueError
        ``columns`` does not name exactly the fields of :class:`Decision`, or the columns'
        lengths differ.
    """
    if set(columns) != set(DECISION_FIELDS):
        raise ValueError(f"decision columns {sorted(columns)} are not the fields "
                         f"{sorted(DECISION_FIELDS)}")
    cols = [columns[name] for name in DECISION_FIELDS]
    lengths = {len(c) for c in cols}
    if len(lengths) > 1:
        raise ValueError("decision columns differ in length: "
                         + ", ".join(f"{name}={len(c)}"
                                     for name, c in zip(DECISION_FIELDS, cols, strict=True)))
    new, names = object.__new__, DECISION_FIELDS
    out = []
    for row in zip(*cols, strict=True):  # lengths checked above
        d = new(Decision)
        d.__dict__.update(zip(names, row, strict=True))
        out.append(d)
    return out
