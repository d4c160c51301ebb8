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

Each reservation names its *holder* (one worker process). A grant of an id that another holder
reserved first is :attr:`Grant.FOREIGN`: that holder may have requested it already, or be about
to (a worker that lost the event's partition while deciding it), so the worker reads the
requests topic back before it requests the id itself (``SelectionHandler.submit``).

Pure: numpy-free bookkeeping over strings; the Kafka adapter is
:mod:`service.streaming.budget_reservations`.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence


def _digest(event_id: str) -> int:
    """64-bit digest of an event id: the granted set holds ints, not up to 256-character ids
    (8 bytes each; a collision among a million ids has odds of about 3e-8)."""
    return int.from_bytes(hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "little")


class Grant(enum.Enum):
    """What a reservation got for one event id (truthy = it holds a unit)."""

    NEW = "new"  # a unit granted by this reservation
    HELD = "held"  # granted before, to the same holder (a retry)
    FOREIGN = "foreign"  # granted before, to another holder first
    DENIED = "denied"  # the total is granted: no unit

    def __bool__(self) -> bool:
        return self is not Grant.DENIED


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
        self._holder: dict[int, int] = {}  # id digest -> index of its first holder
        self._holders: dict[str, int] = {}

    @property
    def left(self) -> int:
        """Units not granted yet (``total - granted``)."""
        return self.total - self.granted

    @property
    def exhausted(self) -> bool:
        """True once ``total`` ids were granted: no later reservation gets a new unit, so
        :meth:`answer_locally` answers any reservation without the log."""
        return self.granted >= self.total

    def holds(self, event_id: str) -> bool:
        """Whether ``event_id`` was granted (by a reservation applied so far)."""
        return _digest(event_id) in self._holder

    def _holder_index(self, holder: str) -> int:
        return self._holders.setdefault(holder, len(self._holders))

    def _held(self, h: int, who: int) -> Grant:
        return Grant.HELD if self._holder[h] == who else Grant.FOREIGN

    def apply(self, event_ids: Sequence[str], holder: str = "") -> list[Grant]:
        """Apply the next reservation of the log, made by ``holder``; returns, per id in order,
        its :class:`Grant`.

        Every reader that applies the same reservations in the same order gets the same answers.
        An id repeated within one reservation is granted at most one unit.
        """
        who = self._holder_index(holder)
        out = []
        for eid in event_ids:
            h = _digest(eid)
            if h in self._holder:
                out.append(self._held(h, who))
            elif self.granted < self.total:
                self._holder[h] = who
                self.granted += 1
                out.append(Grant.NEW)
            else:
                out.append(Grant.DENIED)
        self.applied += 1
        return out

    def answer_locally(self, event_ids: Sequence[str], holder: str = ""
                       ) -> list[Grant] | None:
        """What :meth:`apply` would answer for a reservation by ``holder`` appended now, if that
        is known without reading the log: once the ledger is exhausted no reservation gets a new
        unit, so each id is held before (by ``holder`` or another) or denied. None while units
        are left (only the log order can tell then)."""
        if not self.exhausted:
            return None
        who = self._holders.get(holder, -1)
        return [self._held(h, who) if h in self._holder else Grant.DENIED
                for h in map(_digest, event_ids)]
