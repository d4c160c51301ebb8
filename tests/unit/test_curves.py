"""Unit tests for the learning-curve metrics (``service.evaluation.curves``)."""

from __future__ import annotations

import numpy as np
import pytest

from service.evaluation.curves import auc, curve_xy, first_crossing, mean_curve, on_grid, savings


def curve(xs, ys, key="r1"):
    return [{"pairs": int(x), key: float(y)} for x, y in zip(xs, ys, strict=True)]


# --- first_crossing ----------------------------------------------------------------------


def test_first_crossing_interpolates_linearly():
    x = np.array([0.0, 10.0, 20.0, 40.0])
    y = np.array([0.0, 0.2, 0.6, 1.0])
    # 0.5 lies on the segment (10, 0.2) -> (20, 0.6): 10 + (0.3 / 0.4) * 10 = 17.5
    assert first_crossing(x, y, 0.5) == pytest.approx(17.5)
    assert first_crossing(x, y, 0.6) == pytest.approx(20.0)  # hits a vertex exactly
    assert first_crossing(x, y, 0.8) == pytest.approx(30.0)


def test_first_crossing_start_and_never():
    x = np.array([5.0, 10.0])
    y = np.array([0.4, 0.5])
    assert first_crossing(x, y, 0.3) == 5.0  # already above at the first point
    assert first_crossing(x, y, 0.51) == float("inf")


def test_first_crossing_takes_the_first_of_several():
    x = np.array([0.0, 10.0, 20.0, 30.0])
    y = np.array([0.0, 1.0, 0.0, 1.0])
    assert first_crossing(x, y, 0.5) == pytest.approx(5.0)


# --- savings -----------------------------------------------------------------------------

REF_X = np.array([0.0, 50.0, 100.0])
REF_Y = np.array([0.0, 0.25, 0.5])  # linear: r1 = x / 200, target R* = 0.5 at the budget 100


def test_savings_of_reference_itself_is_zero():
    assert savings(curve(REF_X, REF_Y), REF_X, REF_Y, budget=100) == pytest.approx(0.0)


def test_savings_linear_faster_curve():
    # r1 = x / 100 reaches 0.5 at x = 50: half the budget saved.
    c = curve([0, 50, 100], [0.0, 0.5, 1.0])
    assert savings(c, REF_X, REF_Y, budget=100) == pytest.approx(0.5)
    # r1 = x / 125 reaches 0.5 at 62.5
    c = curve([0, 100], [0.0, 0.8])
    assert savings(c, REF_X, REF_Y, budget=100) == pytest.approx(1 - 62.5 / 100)


def test_savings_negative_when_target_never_reached():
    # Best r1 0.25, which the reference reached at 50: it "needed" half the budget -> -0.5.
    c = curve([0, 100], [0.0, 0.25])
    assert savings(c, REF_X, REF_Y, budget=100) == pytest.approx(-0.5)
    # Best r1 reached mid-way counts (nanmax), not only the final value.
    c = curve([0, 50, 100], [0.0, 0.375, 0.1])
    assert savings(c, REF_X, REF_Y, budget=100) == pytest.approx(0.75 - 1.0)


def test_savings_uses_monotone_envelope_of_reference():
    # A reference that dips: reading it backwards uses its running maximum.
    ref_x = np.array([0.0, 40.0, 60.0, 100.0])
    ref_y = np.array([0.0, 0.4, 0.1, 0.5])
    c = curve([0, 100], [0.0, 0.45])
    # running max [0, .4, .4, .5]: 0.45 reached at 60 + 0.5 * 40 = 80 -> 0.8 - 1
    # (interpolating from the dip 0.1 instead would give 95 -> -0.05)
    assert savings(c, ref_x, ref_y, budget=100) == pytest.approx(-0.2)


# --- auc ---------------------------------------------------------------------------------


def test_auc_flat_curve_equals_its_value():
    assert auc(curve([0, 40, 100], [0.4, 0.4, 0.4]), budget=100) == pytest.approx(0.4)


def test_auc_linear_curve_is_mean_value():
    assert auc(curve([0, 100], [0.0, 1.0]), budget=100) == pytest.approx(0.5)


def test_auc_extends_early_stop_flat():
    # 0 -> 1 over [0, 50], then flat 1 until 100: (25 + 50) / 100
    assert auc(curve([0, 50], [0.0, 1.0]), budget=100) == pytest.approx(0.75)


def test_auc_ignores_points_beyond_budget_and_single_point():
    assert auc(curve([0, 100, 200], [0.2, 0.2, 1.0]), budget=100) == pytest.approx(0.2)
    assert auc(curve([100], [0.3]), budget=100) == pytest.approx(0.3)


def test_auc_on_other_key():
    c = [{"pairs": 0, "r1": 0.0, "r5": 0.5}, {"pairs": 10, "r1": 0.0, "r5": 0.5}]
    assert auc(c, budget=10, key="r5") == pytest.approx(0.5)


# --- on_grid / mean_curve / validation ---------------------------------------------------


def test_on_grid_interpolates_and_nan_beyond_end():
    c = curve([0, 50], [0.0, 1.0])
    out = on_grid(c, np.array([0.0, 25.0, 50.0, 75.0]))
    np.testing.assert_allclose(out[:3], [0.0, 0.5, 1.0])
    assert np.isnan(out[3])


def test_mean_curve_nan_where_any_curve_ended():
    grid = np.array([0.0, 50.0, 100.0])
    out = mean_curve([curve([0, 100], [0.0, 1.0]), curve([0, 50], [0.2, 0.4])], grid)
    np.testing.assert_allclose(out[:2], [0.1, 0.45])
    assert np.isnan(out[2])


def test_non_monotone_pairs_rejected():
    bad = curve([0, 20, 10], [0.1, 0.2, 0.3])
    for fn in (lambda: curve_xy(bad), lambda: on_grid(bad, np.array([0.0])),
               lambda: auc(bad, 100), lambda: savings(bad, REF_X, REF_Y, 100)):
        with pytest.raises(ValueError, match=r"non-decreasing pairs, got \[0.0, 20.0, 10.0\]"):
            fn()


def test_empty_curve_rejected():
    with pytest.raises(ValueError, match="must be non-empty"):
        curve_xy([])
