"""Balanced incremental quantile filter over a sliding window: O(log w) per item.

Two heaps split the window at the q-quantile: ``low`` (a max-heap) holds the smallest
``floor(q·(n-1)) + 1`` values, ``high`` (a min-heap) the rest, so the quantile is the top of
``low``. Values leaving the window are deleted lazily (marked, then dropped when they surface at a
heap top), and the heaps are re-balanced after every change. Marked entries that never surface
would pile up over a long stream, so once the heaps hold more than twice the window's live
entries they are rebuilt from the window (O(w), at most once every w additions): each operation
is O(log w) amortised and memory stays O(w).
The value reported equals ``numpy.quantile(window, q, method="lower")``.
"""

from __future__ import annotations

import heapq
import math
from collections import deque


class SlidingQuantile:
    """The q-quantile of the last ``window`` values.

    Parameters
    ----------
    q : float in [0, 1]
    window : int >= 1
    """

    def __init__(self, q: float, window: int):
        if not (0.0 <= q <= 1.0 and math.isfinite(q)):
            raise ValueError(f"quantile q must be in [0, 1], got {q!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.q, self.window = float(q), int(window)
        self._fifo: deque[tuple[float, int]] = deque()
        self._low: list[tuple[float, int]] = []  # (-value, seq)
        self._high: list[tuple[float, int]] = []  # (value, seq)
        self._side: dict[int, int] = {}  # seq -> 0 (low) / 1 (high), live items only
        self._n_low = self._n_high = 0
        self._seq = 0

    def __len__(self) -> int:
        return len(self._fifo)

    def _prune(self) -> None:
        while self._low and self._low[0][1] not in self._side:
            heapq.heappop(self._low)
        while self._high and self._high[0][1] not in self._side:
            heapq.heappop(self._high)

    def _target_low(self) -> int:
        n = len(self._fifo)
        return 0 if n == 0 else int(math.floor(self.q * (n - 1))) + 1

    def _rebalance(self) -> None:
        target = self._target_low()
        while True:
            self._prune()
            if self._n_low > target:
                v, s = heapq.heappop(self._low)
                heapq.heappush(self._high, (-v, s))
                self._side[s] = 1
                self._n_low -= 1
                self._n_high += 1
            elif self._n_low < target and self._n_high > 0:
                v, s = heapq.heappop(self._high)
                heapq.heappush(self._low, (-v, s))
                self._side[s] = 0
                self._n_high -= 1
                self._n_low += 1
            else:
                break
        # order invariant: max(low) <= min(high)
        self._prune()
        while self._low and self._high and -self._low[0][0] > self._high[0][0]:
            lv, ls = heapq.heappop(self._low)
            hv, hs = heapq.heappop(self._high)
            heapq.heappush(self._low, (-hv, hs))
            heapq.heappush(self._high, (-lv, ls))
            self._side[hs], self._side[ls] = 0, 1
            self._prune()

    def add(self, value: float) -> None:
        """Add one value (NaN is rejected); drops the oldest once the window is full."""
        value = float(value)
        if math.isnan(value):
            raise ValueError("SlidingQuantile.add: value is NaN")
        s = self._seq
        self._seq += 1
        self._fifo.append((value, s))
        self._prune()
        if self._low and value <= -self._low[0][0]:
            heapq.heappush(self._low, (-value, s))
            self._side[s] = 0
            self._n_low += 1
        else:
            heapq.heappush(self._high, (value, s))
            self._side[s] = 1
            self._n_high += 1
        if len(self._fifo) > self.window:
            _, old = self._fifo.popleft()
            if self._side.pop(old) == 0:
                self._n_low -= 1
            else:
                self._n_high -= 1
        if len(self._low) + len(self._high) > 2 * len(self._fifo) + 64:
            self._compact()
        self._rebalance()

    def _compact(self) -> None:
        """Rebuild both heaps from the live window, dropping every lazily deleted entry."""
        side = self._side
        self._low = [(-v, s) for v, s in self._fifo if side[s] == 0]
        self._high = [(v, s) for v, s in self._fifo if side[s] == 1]
        heapq.heapify(self._low)
        heapq.heapify(self._high)

    def extend(self, values) -> None:
        for v in values:
            self.add(v)

    def value(self) -> float:
        """The current q-quantile; NaN while the window is empty."""
        if not self._fifo:
            return math.nan
        self._prune()
        return -self._low[0][0]
