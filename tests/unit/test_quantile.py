"""SlidingQuantile equals numpy's 'lower' quantile of the window after every batch."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.quantile import SlidingQuantile


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=0, max_size=30),
                        min_size=1, max_size=25),
       qs=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3), window=st.integers(1, 40))
def test_matches_numpy_lower_quantile_after_every_batch(batches, qs, window):
    f = SlidingQuantile(window)
    seen: list[float] = []
    for b in batches:
        f.extend(b)
        seen.extend(b)
        win = np.array(seen[-window:])
        assert len(f) == len(win)
        for q in qs:
            expect = np.quantile(win, q, method="lower") if len(win) else math.nan
            got = f.value(q)
            assert (math.isnan(got) and math.isnan(expect)) or got == expect


def test_heavy_ties_single_adds_and_a_long_stream_stay_exact_and_bounded():
    rng = np.random.default_rng(0)
    vals = rng.integers(0, 5, 20_000).astype(float)  # many equal values leave at once
    f = SlidingQuantile(257)
    for i, v in enumerate(vals):
        f.add(v)
        if i % 997 == 0:
            win = vals[max(0, i - 256): i + 1]
            assert f.value(0.9) == np.quantile(win, 0.9, method="lower")
    assert len(f._sorted) == 257  # memory is the window, however long the stream


def test_a_batch_larger_than_the_window_keeps_its_newest_values():
    f = SlidingQuantile(4)
    f.extend([1.0, 2.0])
    f.extend(np.arange(10.0))
    assert len(f) == 4 and f.value(0.0) == 6.0 and f.value(1.0) == 9.0


def test_empty_is_nan_and_bad_args_raise():
    assert math.isnan(SlidingQuantile(3).value(0.5))
    with pytest.raises(ValueError, match="q must be in"):
        SlidingQuantile(3).value(1.5)
    with pytest.raises(ValueError, match="window must be"):
        SlidingQuantile(0)
    with pytest.raises(ValueError, match="NaN"):
        SlidingQuantile(3).add(float("nan"))


def test_value_never_fails_while_another_thread_extends():
    """``status()`` reads the threshold on the event loop while a commit extends the window in
    the engine's worker thread; the demo once died with IndexError (index 552 of size 544)."""
    import threading

    sq = SlidingQuantile(64)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer():
        rng = np.random.default_rng(0)
        for _ in range(3000):
            sq.extend(rng.random(int(rng.integers(1, 40))))
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    reads = 0
    while not done.is_set():
        try:
            v = sq.value(0.9)
            assert math.isnan(v) or 0.0 <= v <= 1.0
        except BaseException as exc:  # noqa: BLE001 - any failure is the finding
            errors.append(exc)
            break
        reads += 1
    t.join()
    assert not errors, errors[0]
    assert reads > 0 and len(sq) == 64
