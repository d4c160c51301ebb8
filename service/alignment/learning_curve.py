"""The stopping signal: what the next pairs are expected to add to validation recall.

Every published model version records its point of the lineage's learning curve: the training
pairs it was fitted on and its R@1 on the validation pairs at gate time. Over the recent points
the curve is fitted as ``R@1 = a + b ln(n)`` (least squares; a learning curve of a linear map is
close to log-linear in the pair count over a budget's range, and a straight line in ``ln n`` is
the most a handful of noisy points can support). The expected gain of the next ``N`` pairs is
``b ln((n + N) / n)`` at the newest ``n``, clipped to ``[0, 1 - R@1]``, with a standard error from
the fit's slope. When it stays near 0, further annotations buy little: a user decides to stop
paying annotators on it (alert ``AcquisitionPlateaued``).

The points are measured on the validation pairs *of their time* (the set grows with the pairs),
so they carry that set's sampling noise, about ``sqrt(r (1 - r) / n_val)``; the slope's standard
error includes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CurvePoint", "GainEstimate", "expected_gain", "MAX_HISTORY"]

MAX_HISTORY = 64
"""Points kept in a lineage's history (the newest); the fit uses the last ``window`` of them."""


@dataclass(frozen=True)
class CurvePoint:
    """One version on the learning curve: ``training_pairs`` -> ``recall`` (R@1, validation)."""

    training_pairs: int
    recall: float
    validation_pairs: int


@dataclass(frozen=True)
class GainEstimate:
    """Expected R@1 gain of the next ``horizon`` pairs, its standard error, points used."""

    gain: float
    se: float
    horizon: int
    points: int


def expected_gain(history: Sequence[CurvePoint], horizon: int, window: int = 8,
                  min_validation: int = 10) -> GainEstimate | None:
    """Fit the recent learning curve and extrapolate ``horizon`` pairs.

    Parameters
    ----------
    history : sequence of CurvePoint
        Oldest first.
    horizon : int
        The next N pairs (>= 1).
    window : int
        Most recent usable points fitted.
    min_validation : int
        Points measured on fewer validation pairs are too noisy to use.

    Returns
    -------
    GainEstimate or None
        None until three usable points with at least two distinct pair counts exist.

    Raises
    ------
    ValueError
        If ``horizon`` is below 1.
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    pts = [p for p in history if p.training_pairs > 0 and p.validation_pairs >= min_validation
           and math.isfinite(p.recall)][-window:]
    if len(pts) < 3 or len({p.training_pairs for p in pts}) < 2:
        return None
    x = np.log([p.training_pairs for p in pts])
    y = np.array([p.recall for p in pts])
    xm = x - x.mean()
    sxx = float(xm @ xm)
    b = float(xm @ (y - y.mean()) / sxx)
    resid = y - y.mean() - b * xm
    dof = len(pts) - 2
    # residual scatter, floored by the validation sampling noise of the points
    noise = float(np.mean([p.recall * (1 - p.recall) / p.validation_pairs for p in pts]))
    s2 = max(float(resid @ resid) / dof if dof > 0 else 0.0, noise)
    se_b = math.sqrt(s2 / sxx)
    n_now, r_now = pts[-1].training_pairs, pts[-1].recall
    step = math.log((n_now + horizon) / n_now)
    gain = min(max(b * step, 0.0), max(0.0, 1.0 - r_now))
    return GainEstimate(gain=gain, se=se_b * step, horizon=int(horizon), points=len(pts))
