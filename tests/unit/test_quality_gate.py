"""The validation split (deterministic, stable, the asked share) and the quality gate."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.alignment.quality_gate import (
    GateConfig,
    holdout_fraction,
    is_validation,
    judge,
    validation_recall,
)
from tests.support import data_and_model


@given(st.text(max_size=20), st.text(max_size=20))
@settings(max_examples=200, deadline=None)
def test_holdout_fraction_is_in_the_unit_interval_and_depends_on_the_whole_key(a, b):
    f = holdout_fraction((a, b))
    assert 0.0 <= f < 1.0 and f == holdout_fraction((a, b))
    # the length prefix keeps ("ab", "c") and ("a", "bc") apart
    if a and (a[:-1], a[-1:] + b) != (a, b):
        assert holdout_fraction((a[:-1], a[-1:] + b)) != f


def test_the_split_holds_out_about_the_share_and_only_grows_with_it():
    keys = [(f"img-{i}", f"txt-{i}") for i in range(20_000)]
    for share in (0.05, 0.1, 0.3):
        held = sum(is_validation(k, share) for k in keys)
        assert abs(held / len(keys) - share) < 0.01, (share, held)
    # a pair held out at 0.1 is held out at 0.3 too (a bigger share never moves a pair back)
    assert all(is_validation(k, 0.3) for k in keys if is_validation(k, 0.1))
    assert not any(is_validation(k, 0.0) for k in keys)


def test_validation_recall_of_a_fitted_model_and_of_a_shuffled_one():
    a, b, model = data_and_model()
    good = validation_recall(model, a[300:360], b[300:360])
    assert set(good) == {1, 5} and good[1] > 0.8 and good[5] >= good[1]
    bad = validation_recall(model, a[300:360], np.random.default_rng(0).permutation(b[300:360]))
    assert bad[1] < 0.2
    assert validation_recall(model, a[:1], b[:1]) == {}  # one pair: nothing to retrieve among


@pytest.mark.parametrize(("cand", "cur", "n", "accept", "why"), [
    ({1: 0.50}, {1: 0.51}, 40, True, "R@1 0.500 vs 0.510 now on 40 validation pairs"),
    ({1: 0.60}, {1: 0.50}, 40, True, "R@1 0.600 vs 0.500"),
    ({1: 0.40}, {1: 0.50}, 40, False, "R@1 0.400 is below 0.500 now by more than 0.02 on 40"),
    ({1: 0.00}, {1: 0.90}, 19, True, "19 validation pairs (gate from 20): not gated"),
    ({}, {}, 0, True, "0 validation pairs (gate from 20): not gated"),
])
def test_judge(cand, cur, n, accept, why):
    verdict = judge(cand, cur, n, GateConfig(tolerance=0.02, min_pairs=20))
    assert verdict.accept is accept and why in verdict.reason


def test_judge_at_zero_tolerance_rejects_any_drop():
    assert not judge({1: 0.49}, {1: 0.5}, 100, GateConfig(tolerance=0.0, min_pairs=0)).accept
    assert judge({1: 0.5}, {1: 0.5}, 100, GateConfig(tolerance=0.0, min_pairs=0)).accept


@pytest.mark.parametrize(("kw", "pattern"), [
    ({"tolerance": -0.1}, r"gate tolerance must be in \[0, 1\], got -0.1"),
    ({"tolerance": float("nan")}, "gate tolerance must be in"),
    ({"min_pairs": -1}, "gate min_pairs must be >= 0, got -1"),
])
def test_gate_config_rejects_bad_values(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        GateConfig(**kw)


def test_model_bytes_round_trip_and_garbage_is_refused():
    from service.alignment import AlignmentModel

    _, _, model = data_and_model()
    m = copy.deepcopy(model)
    m.version, m.n_pairs = 12, 60
    back = AlignmentModel.from_bytes(m.to_bytes())
    assert (back.version, back.n_pairs, back.dims, back.blocks) == (12, 60, m.dims, m.blocks)
    x = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)
    np.testing.assert_allclose(back.embed("image", x), m.embed("image", x), atol=1e-6)
    with pytest.raises(ValueError, match=r"not a model checkpoint \(3 bytes\)"):
        AlignmentModel.from_bytes(b"abc")


# ------------------------------------------------------------------ stopping signal
def _curve(ns, f, nv=50):
    from service.alignment.learning_curve import CurvePoint
    return [CurvePoint(n, f(n), nv) for n in ns]


def test_expected_gain_of_a_log_linear_curve_and_of_a_flat_one():
    import math

    from service.alignment.learning_curve import expected_gain

    rising = _curve([25, 50, 100, 200], lambda n: 0.1 * math.log(n) - 0.2)
    est = expected_gain(rising, 100)
    assert est.points == 4 and est.horizon == 100
    assert est.gain == pytest.approx(0.1 * math.log(300 / 200), abs=1e-9)
    flat = _curve([25, 50, 100, 200], lambda n: 0.7)
    assert expected_gain(flat, 100).gain == 0.0
    falling = _curve([25, 50, 100, 200], lambda n: 1.0 - 0.001 * n)
    assert expected_gain(falling, 100).gain == 0.0  # never negative
    # the standard error floors at the validation sampling noise even on a perfect fit
    assert est.se > 0


def test_expected_gain_needs_three_usable_points_and_caps_at_what_is_left():
    from service.alignment.learning_curve import expected_gain

    assert expected_gain(_curve([25, 50], lambda n: 0.1), 100) is None
    assert expected_gain(_curve([25, 25, 25], lambda n: 0.1), 100) is None  # one pair count
    assert expected_gain(_curve([25, 50, 100], lambda n: 0.5, nv=3), 100) is None  # too noisy
    steep = _curve([10, 20, 40], lambda n: min(0.99, n / 41))
    assert expected_gain(steep, 1000).gain <= 1 - 40 / 41 + 1e-9
    with pytest.raises(ValueError, match="horizon must be >= 1, got 0"):
        expected_gain(steep, 0)
