"""Sliding-window quantiles, updated a micro-batch at a time.

The window's values are kept **sorted** in a numpy array (plus a ring buffer for their arrival
order). Adding a batch of B values removes the B oldest by binary search and inserts the new ones
by binary search: O(B log w) comparisons plus one O(w) ``memmove`` per batch, i.e. amortised
O(log w + w / B) per item, all in C. Any quantile of the window is then an O(1) lookup, so the
budget's normal and catch-up thresholds share one structure.

Why not the classic two-heap filter (O(log w) per item)? In Python each heap operation is
interpreter work: on the 1M-item stream benchmark the two-heap version cost ~75 µs per item, the
largest single share of the selector's time, and lazily deleted entries had to be compacted to
keep memory O(w). At w = 2048 the sorted array is one ~16 KB memmove per batch.

``value(q)`` equals ``numpy.quantile(window, q, method="lower")``.
"""

from __future__ import annotations

import math

import numpy as np


class SlidingQuantile:
    """Quantiles of the last ``window`` values.

    Parameters
    ----------
    window : int >= 1
    """

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = int(window)
        self._ring = np.zeros(self.window, dtype=np.float64)  # zeros: equal states compare equal
        self._start = 0  # ring index of the oldest value
        self._n = 0
        self._sorted = np.empty(0, dtype=np.float64)

    def __len__(self) -> int:
        return self._n

    def add(self, value: float) -> None:
        self.extend(np.array([value], dtype=np.float64))

    def extend(self, values) -> None:
        """Add values in arrival order (NaN rejected); the oldest leave once the window is full."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if len(v) == 0:
            return
        if np.isnan(v).any():
            raise ValueError(f"SlidingQuantile.extend: {int(np.isnan(v).sum())} NaN value(s)")
        w = self.window
        if len(v) >= w:  # the batch alone fills the window
            v = v[-w:]
            self._ring[:] = v
            self._start, self._n = 0, w
            self._sorted = np.sort(v)
            return
        leaving = max(0, self._n + len(v) - w)
        if leaving:
            idx = (self._start + np.arange(leaving)) % w
            old = np.sort(self._ring[idx])
            pos = np.searchsorted(self._sorted, old, side="left")
            # equal old values occupy consecutive slots: offset each repeat by its rank in the run
            pos = pos + (np.arange(leaving) - np.searchsorted(old, old, side="left"))
            self._sorted = np.delete(self._sorted, pos)
            self._start = (self._start + leaving) % w
            self._n -= leaving
        end = (self._start + self._n + np.arange(len(v))) % w
        self._ring[end] = v
        self._n += len(v)
        new = np.sort(v)
        self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, new), new)

    def sorted_values(self) -> np.ndarray:
        """The window's values in ascending order, shape (len(self),) (do not modify)."""
        return self._sorted

    def value(self, q: float) -> float:
        """The q-quantile (numpy's "lower" method) of the window; NaN while it is empty."""
        if not (0.0 <= q <= 1.0 and math.isfinite(q)):
            raise ValueError(f"quantile q must be in [0, 1], got {q!r}")
        # One read of the sorted array: a status reader on another thread (the service's
        # ``status()`` while a commit runs in the engine's worker thread) may see ``_n`` updated
        # before ``_sorted``; indexing the array by its own length never goes out of bounds.
        s = self._sorted
        if len(s) == 0:
            return math.nan
        return float(s[int(math.floor(q * (len(s) - 1)))])
