"""A budget in cost units, and the measured cost of aligning each modality.

With ``budget_unit="cost"`` the deployment's budget counts what the annotations cost
(``AlignmentLabel.cost``: minutes, money), not how many were requested. Each accept spends the
*expected* cost of its modality when it is decided (the answer, and its cost, comes later): the
mean cost of that modality's answers so far, shrunk towards ``prior_cost`` by ``prior_weight``
pseudo-answers, so the first requests spend the prior. An item whose expected cost no longer fits
is skipped with ``skip:budget_exhausted``; the budget is never overspent by more than the gap
between expected and actual costs of the requests in flight.

Measured costs also steer the choice of modality by value per unit of cost: a modality twice as
expensive as the mean needs twice the utility (:meth:`CostLedger.per_cost`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["CostLedger"]


class CostLedger:
    """Spend in cost units against ``total`` and the expected cost per modality.

    Parameters
    ----------
    total : float or None
        Budget in cost units (None: unlimited; costs still steer the modality choice).
    modalities : sequence of str
    prior_cost : float
        Expected cost of a modality before any of its answers (> 0).
    prior_weight : float
        Pseudo-answers the prior counts as (>= 0).

    Raises
    ------
    ValueError
        On a negative or non-finite total, or a non-positive prior cost.
    """

    def __init__(self, total: float | None, modalities: Sequence[str], prior_cost: float = 1.0,
                 prior_weight: float = 1.0):
        if total is not None and not (math.isfinite(total) and total >= 0):
            raise ValueError(f"cost budget total must be >= 0 or None, got {total!r}")
        if not (math.isfinite(prior_cost) and prior_cost > 0):
            raise ValueError(f"prior cost must be > 0, got {prior_cost!r}")
        if not (math.isfinite(prior_weight) and prior_weight >= 0):
            raise ValueError(f"prior weight must be >= 0, got {prior_weight!r}")
        self.total = None if total is None else float(total)
        self.modalities = tuple(modalities)
        self.prior_cost, self.prior_weight = float(prior_cost), float(prior_weight)
        self.spent = 0.0
        self._sum = {m: 0.0 for m in self.modalities}
        self._n = {m: 0 for m in self.modalities}

    def observe(self, modality: str, cost: float) -> None:
        """One answer about an item of ``modality`` cost ``cost`` (finite, >= 0)."""
        if not (math.isfinite(cost) and cost >= 0):
            raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
        self._sum[modality] += float(cost)
        self._n[modality] += 1

    def expected(self, modality: str) -> float:
        """Expected cost of one more answer about an item of ``modality``."""
        w = self.prior_weight
        return (self.prior_cost * w + self._sum[modality]) / (w + self._n[modality]) \
            if w + self._n[modality] > 0 else self.prior_cost

    @property
    def remaining(self) -> float | None:
        return None if self.total is None else max(0.0, self.total - self.spent)

    def affordable(self, modality: str, pending: float = 0.0) -> bool:
        """Whether one more accept of ``modality`` fits, ``pending`` already spent in the batch."""
        return self.total is None or \
            self.spent + pending + self.expected(modality) <= self.total + 1e-9

    def spend(self, amount: float) -> None:
        """Accepts were committed (this worker's or, read back, another's)."""
        self.spent += float(amount)

    def per_cost(self, modality: str, utility: np.ndarray) -> np.ndarray:
        """Utility per unit of relative cost: divided by (expected cost / mean expected cost)
        when positive, multiplied when negative (a costlier modality is always worth less)."""
        mean = float(np.mean([self.expected(m) for m in self.modalities]))
        r = self.expected(modality) / mean
        u = np.asarray(utility, dtype=np.float64)
        return np.where(u >= 0, u / r, u * r)
