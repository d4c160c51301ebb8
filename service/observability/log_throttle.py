"""Warnings that stay readable under a flood: the first of each kind in full, then one summary
line per kind and interval.

A poisoned topic can send thousands of bad records a second; one WARNING each (with its detail)
drowns the log and costs the event loop more than dead-lettering them does. The dead-letter
topic and the ``pairsieve_dead_letters_total`` counter keep every one; the log keeps what an
operator reads: which kinds, how many, one full example each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Kind:
    window_start: float
    suppressed: int = 0
    last: str = ""


class ThrottledWarnings:
    """Log at most one line per kind and ``interval_s`` (plus the count left out since).

    Parameters
    ----------
    logger : logging.Logger
    interval_s : float
        Minimum time between two lines of one kind (> 0).
    clock : callable() -> float
        Monotonic seconds (tests pass a fake one).

    Examples
    --------
    >>> t = [0.0]
    >>> w = ThrottledWarnings(logging.getLogger("x"), 10.0, clock=lambda: t[0])
    >>> w.warn("oversized", "record 1 too big")  # logged
    True
    >>> w.warn("oversized", "record 2 too big")  # counted
    False
    >>> t[0] = 11.0
    >>> w.warn("oversized", "record 3 too big")  # logged, with "1 more since"
    True
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, *,
                 clock: Callable[[], float] = time.monotonic):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.logger = logger
        self.interval_s = float(interval_s)
        self.clock = clock
        self._kinds: dict[str, _Kind] = {}

    def warn(self, kind: str, message: str) -> bool:
        """Log ``message`` under ``kind`` unless one of that kind was logged less than
        ``interval_s`` ago (then only count it). Returns whether it was logged."""
        now = self.clock()
        k = self._kinds.get(kind)
        if k is not None and now - k.window_start < self.interval_s:
            k.suppressed += 1
            k.last = message
            return False
        self._kinds[kind] = _Kind(now)
        if k is not None and k.suppressed:
            self.logger.warning("%s (and %d more of this kind in the last %.0f s, not logged "
                                "one by one)", message, k.suppressed, now - k.window_start)
        else:
            self.logger.warning("%s", message)
        return True

    def flush(self) -> None:
        """Log the counts still held back (at shutdown), one line per kind."""
        for kind, k in self._kinds.items():
            if k.suppressed:
                self.logger.warning("%d more warnings of kind %s not logged one by one; the "
                                    "last: %s", k.suppressed, kind, k.last)
                k.suppressed = 0
