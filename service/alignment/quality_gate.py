"""Held-out validation pairs and the quality gate of new model versions.

A deterministic share of the acquired pairs is held out: a pair is a validation pair when a hash
of its key falls below the share, so every worker, every restart and ``pairsieve export-pairs``
agree on the split without storing it, and a pair never moves between the two sets. Validation
pairs are never trained on.

A candidate version is swapped in only if its R@1 on the validation pairs (mean of both
directions) is not below the current version's by more than a tolerance, both measured on the
same pairs now. Below ``min_pairs`` validation pairs the gate cannot tell a regression from noise
(one pair is worth ``1/n`` of recall) and lets the candidate through, saying so.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from service.alignment.evaluate import retrieval_recall
from service.alignment.model import AlignmentModel

__all__ = ["VALIDATION_KS", "GateConfig", "GateVerdict", "holdout_fraction", "is_validation",
           "validation_recall", "judge"]

VALIDATION_KS = (1, 5)
"""The k of the exported validation recall (``pairsieve_model_validation_recall{k}``)."""


def holdout_fraction(key: tuple[str, str]) -> float:
    """A pair key's position in [0, 1), uniform over keys and stable across processes.

    Parameters
    ----------
    key : tuple of (str, str)
        ``(item id of modality a, item id of modality b)``.
    """
    a, b = key
    h = hashlib.blake2b(f"{len(a)}:{a}|{b}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0 ** 64


def is_validation(key: tuple[str, str], share: float) -> bool:
    """Whether the pair ``key`` is held out for validation at ``share`` (in [0, 1))."""
    return holdout_fraction(key) < share


def validation_recall(model: AlignmentModel, a: np.ndarray, b: np.ndarray,
                      ks=VALIDATION_KS) -> dict[int, float]:
    """R@k among the validation pairs, mean of both directions.

    Parameters
    ----------
    model : AlignmentModel
    a : ndarray, shape (n, d_a)
        First-modality vectors of the validation pairs.
    b : ndarray, shape (n, d_b)
        Their partners, row for row.
    ks : iterable of int

    Returns
    -------
    dict[int, float]
        k -> recall in [0, 1]; empty when ``n < 2`` (retrieval among one candidate means
        nothing).
    """
    if len(a) < 2:
        return {}
    got = retrieval_recall(model, a, b, ks)
    return {int(k): float(got[f"r{k}"]) for k in ks}


@dataclass(frozen=True)
class GateConfig:
    """Parameters of :func:`judge`.

    Attributes
    ----------
    tolerance : float
        Largest R@1 drop (absolute, in [0, 1]) a candidate may show and still be swapped in.
    min_pairs : int
        Validation pairs needed before the gate rejects anything.
    """

    tolerance: float = 0.02
    min_pairs: int = 20

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tolerance) and 0.0 <= self.tolerance <= 1.0):
            raise ValueError(f"gate tolerance must be in [0, 1], got {self.tolerance!r}")
        if self.min_pairs < 0:
            raise ValueError(f"gate min_pairs must be >= 0, got {self.min_pairs!r}")


@dataclass(frozen=True)
class GateVerdict:
    """What the gate decided and why (``reason`` is one line for the log)."""

    accept: bool
    reason: str


def judge(candidate: Mapping[int, float], current: Mapping[int, float], n_validation: int,
          config: GateConfig = GateConfig()) -> GateVerdict:
    """Swap the candidate in or not.

    Parameters
    ----------
    candidate, current : Mapping[int, float]
        :func:`validation_recall` of both versions on the same validation pairs.
    n_validation : int
        How many validation pairs that was.
    config : GateConfig

    Returns
    -------
    GateVerdict
    """
    if n_validation < max(2, config.min_pairs) or 1 not in candidate or 1 not in current:
        return GateVerdict(True, f"{n_validation} validation pairs (gate from "
                                 f"{max(2, config.min_pairs)}): not gated")
    c, r = candidate[1], current[1]
    if c >= r - config.tolerance:
        return GateVerdict(True, f"R@1 {c:.3f} vs {r:.3f} now on {n_validation} validation pairs")
    return GateVerdict(False, f"R@1 {c:.3f} is below {r:.3f} now by more than "
                              f"{config.tolerance:g} on {n_validation} validation pairs")
