"""SlidingQuantile equals numpy's 'lower' quantile of the window, at every step."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.quantile import SlidingQuantile


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200),
       q=st.floats(0.0, 1.0), window=st.integers(1, 40))
def test_matches_numpy_lower_quantile_at_every_step(values, q, window):
    f = SlidingQuantile(q, window)
    for i, v in enumerate(values):
        f.add(v)
        win = values[max(0, i + 1 - window): i + 1]
        assert len(f) == len(win)
        assert f.value() == np.quantile(np.array(win), q, method="lower")


def test_many_duplicates_and_long_stream():
    rng = np.random.default_rng(0)
    vals = rng.integers(0, 5, 5000).astype(float)  # heavy ties exercise lazy deletion
    f = SlidingQuantile(0.9, 257)
    for i, v in enumerate(vals):
        f.add(v)
        if i % 97 == 0:
            assert f.value() == np.quantile(vals[max(0, i - 256): i + 1], 0.9, method="lower")
    # lazy heaps stay bounded by the window (plus garbage that is pruned as it surfaces)
    assert len(f._side) == 257


def test_memory_stays_bounded_over_a_long_stream():
    # Lazily deleted entries stuck inside a heap must not accumulate (found by the 1M-item run).
    rng = np.random.default_rng(1)
    f = SlidingQuantile(0.95, 128)
    vals = rng.normal(size=20_000)
    for v in vals:
        f.add(v)
        assert len(f._low) + len(f._high) <= 2 * 128 + 65
    assert f.value() == np.quantile(vals[-128:], 0.95, method="lower")


def test_empty_is_nan_and_bad_args_raise():
    assert math.isnan(SlidingQuantile(0.5, 3).value())
    with pytest.raises(ValueError, match="q must be in"):
        SlidingQuantile(1.5, 3)
    with pytest.raises(ValueError, match="window must be"):
        SlidingQuantile(0.5, 0)
    with pytest.raises(ValueError, match="NaN"):
        SlidingQuantile(0.5, 3).add(float("nan"))
