"""Budget grants in log order: an exact shared budget for several workers.

Each worker counts every selection it reads back from the requests topic against the total, but
two workers' accepts in flight at the same moment are invisible to each other, so that count alone
can overshoot the total by the selections in flight. A *ledger* closes the gap with the one thing
a Kafka partition guarantees: every reader sees its records in the same order. Before publishing
its accepts, a worker appends a reservation (the accepted event ids) to a one-partition topic and
reads the topic up to that record; every worker folds the same records in the same order into a
:class:`BudgetLedger`, so all agree on what each reservation was granted:

* an event id granted before is granted again, free (the same event redelivered to its worker
  after a failed publish, or to another worker after a crash: one unit, one request id);
* a new event id is granted while fewer than ``total`` distinct ids were granted;
* anything else is denied (the worker decides it ``skip:budget_exhausted`` instead).

So at most ``total`` distinct event ids are ever granted, and a request is published only for a
granted id: the requests topic holds at most ``total`` distinct request ids, whatever the number
of workers and however their reservations interleave. A worker killed between its grant and its
publish leaves that unit granted but unspent (the budget can end below the total by the accepts
in flight at each crash, never above it) unless its event, redelivered, is accepted again.

Pure: numpy-free bookkeeping over strings; the Kafka adapter is
:mod:`service.streaming.budget_reservations`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _digest(event_id: str) -> int:
    """64-bit digest of an event id: the granted set holds ints, not up to 256-character ids
    (8 bytes each; a collision among a million ids has odds of about 3e-8)."""
    return int.from_bytes(hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


class BudgetLedger:
    """Grants of budget units to reservations, applied in log order (see module docstring).

    Parameters
    ----------
    total : int
        Distinct event ids that may ever be granted (the budget), >= 0.

    Attributes
    ----------
    granted : int
        Distinct event ids granted so far (<= ``total``).
    applied : int
        Reservations applied so far.
    """

    def __init__(self, total: int):
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"ledger total must be an integer >= 0, got {total!r}")
        self.total = total
        self.granted = 0
        self.applied = 0
        self._ids: set[int] = set()

    @property
    def exhausted(self) -> bool:
        """True once ``total`` ids were granted: no later reservation gets a new unit, so
        :meth:`answer_locally` answers any reservation without the log."""
        return self.granted >= self.total

    def holds(self, event_id: str) -> bool:
        """Whether ``event_id`` was granted (by a reservation applied so far)."""
        return _digest(event_id) in self._ids

    def apply(self, event_ids: Sequence[str]) -> list[bool]:
        """Apply the next reservation of the log; returns, per id in order, whether it is granted.

        Every reader that applies the same reservations in the same order gets the same answers.
        An id repeated within one reservation is granted at most one unit.
        """
        out = []
        for eid in event_ids:
            h = _digest(eid)
            if h in self._ids:
                out.append(True)
            elif self.granted < self.total:
                self._ids.add(h)
                self.granted += 1
                out.append(True)
            else:
                out.append(False)
        self.applied += 1
        return out

    def answer_locally(self, event_ids: Sequence[str]) -> list[bool] | None:
        """What :meth:`apply` would answer for a reservation appended now, if that is known
        without reading the log: once the ledger is exhausted no reservation gets a new unit,
        so the answer is "granted before" for each id. None while units are left (only the log
        order can tell then)."""
        if not self.exhausted:
            return None
        return [self.holds(eid) for eid in event_ids]
