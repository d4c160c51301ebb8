"""Learning-curve metrics of the quality benchmark (pure numpy).

A curve is a list of ``{"pairs": acquisitions spent, "r1": recall@1, ...}`` points with
increasing ``pairs``. Headline: **% of pairs saved vs random** =
``1 - (pairs the strategy needs to reach R*) / budget``, where R* is the R@1 that random reaches at
the full budget (the mean over seeds of random's final R@1, so the target itself is not one noisy
run). When a strategy never reaches R*, the saving is negative:
``pairs_random(R_final) / budget - 1``,
where ``pairs_random(r)`` reads the mean random curve backwards (how much less it achieved,
expressed as budget).
"""

from __future__ import annotations

import numpy as np


def curve_xy(curve: list[dict], key: str = "r1") -> tuple[np.ndarray, np.ndarray]:
    x = np.array([p["pairs"] for p in curve], dtype=float)
    y = np.array([p[key] for p in curve], dtype=float)
    if len(x) == 0 or np.any(np.diff(x) < 0):
        raise ValueError(f"curve must be non-empty with non-decreasing pairs, got {x.tolist()}")
    return x, y


def on_grid(curve: list[dict], grid: np.ndarray, key: str = "r1") -> np.ndarray:
    """Linear interpolation of a curve on ``grid``; NaN outside the curve's first..last point."""
    x, y = curve_xy(curve, key)
    out = np.interp(grid, x, y)
    out[(grid > x[-1] + 1e-9) | (grid < x[0] - 1e-9)] = np.nan
    return out


def first_crossing(x: np.ndarray, y: np.ndarray, target: float) -> float:
    """Smallest x at which the piecewise-linear curve reaches ``target``; inf if never."""
    if y[0] >= target:
        return float(x[0])
    for i in range(1, len(x)):
        if y[i] >= target:
            y0, y1 = y[i - 1], y[i]
            return float(x[i - 1] + (target - y0) / (y1 - y0) * (x[i] - x[i - 1]))
    return float("inf")


def savings(curve: list[dict], ref_x: np.ndarray, ref_y: np.ndarray, budget: int,
            key: str = "r1") -> float:
    """Fraction of the budget saved vs the reference (random) curve; see module docstring."""
    x, y = curve_xy(curve, key)
    target = float(ref_y[-1])
    need = first_crossing(x, y, target)
    if np.isfinite(need):
        return 1.0 - need / budget
    reached = float(np.nanmax(y))
    ref_need = first_crossing(ref_x, np.maximum.accumulate(ref_y), reached)
    return (ref_need if np.isfinite(ref_need) else float(ref_x[-1])) / budget - 1.0


def auc(curve: list[dict], budget: int, key: str = "r1") -> float:
    """Area under the curve over [first pairs, budget], divided by that width (a mean R@1).

    A curve that stops early is extended flat at its last value (no credit for unspent budget
    beyond what it reached).
    """
    x, y = curve_xy(curve, key)
    if x[-1] < budget:
        x, y = np.append(x, budget), np.append(y, y[-1])
    keep = x <= budget
    x, y = x[keep], y[keep]
    width = x[-1] - x[0]
    if width <= 0:
        return float(y[-1])
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / width)


def mean_curve(curves: list[list[dict]], grid: np.ndarray, key: str = "r1") -> np.ndarray:
    """Mean over curves on ``grid`` (NaN where any curve has ended)."""
    return np.mean(np.stack([on_grid(c, grid, key) for c in curves]), axis=0)
