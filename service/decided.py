"""The worker's memory of decided events (redeliveries get the earlier verdict), kept out of the
garbage collector's way.

A worker remembers up to a million outcomes. Kept as :class:`~service.messages.Outcome` and
:class:`~service.core.types.Decision` objects, each entry is two objects the cyclic garbage
collector tracks, and every full collection walks all of them: with 34,000 entries (a few minutes
of a loaded worker) one took 164 ms, the p99 of the event-to-decision latency at half load; with
a million it would take seconds. Stored as a flat tuple of strings and numbers, an entry is
untracked by CPython after its first collection and costs a full collection nothing. An outcome is
rebuilt only when it is read (a duplicate event, a selection folded in), which is rare.

Each entry also says whether the decision log is known to hold it. An accept folded in from the
requests topic may not be there: a worker stopped (kill -9) between writing the request and its
decision record leaves the log without it, and the redelivered event, answered as a duplicate,
must write it then (:meth:`DecidedOutcomes.unlogged`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from operator import attrgetter

from service.core.reasons import Reason
from service.core.types import Decision
from service.lru import LRU
from service.messages import Outcome

_DECISION_FIELDS = tuple(f.name for f in fields(Decision))


_REASON = _DECISION_FIELDS.index("reason")
_REASONS = {r.value: r for r in Reason}
_decision_values = attrgetter(*_DECISION_FIELDS)  # one C call: the fields' values, in order


def pack(outcome: Outcome) -> tuple:
    """``outcome`` as one flat tuple of atoms (the decision's fields, then duplicate and worker
    id), which the garbage collector stops tracking. The reason travels as its plain string (a
    :class:`~service.core.reasons.Reason` member is an object the collector tracks)."""
    values = _decision_values(outcome.decision)
    return (*values[:_REASON], str(values[_REASON]), *values[_REASON + 1:], outcome.duplicate,
            outcome.worker_id)


def unpack(event_id: str, packed: tuple) -> Outcome:
    """The :class:`Outcome` that :func:`pack` flattened (equal to the original; a known reason
    code comes back as its :class:`~service.core.reasons.Reason`)."""
    n = len(_DECISION_FIELDS)
    values = list(packed[:n])
    values[_REASON] = _REASONS.get(values[_REASON], values[_REASON])
    return Outcome(event_id, Decision(*values), packed[n], packed[n + 1])


class DecidedOutcomes:
    """Event id -> :class:`Outcome`, the newest ``capacity`` kept (a bounded LRU by write),
    stored packed (module doc)."""

    def __init__(self, capacity: int):
        self._lru: LRU = LRU(capacity)

    @property
    def capacity(self) -> int:
        return self._lru.capacity

    def put(self, outcome: Outcome, *, logged: bool = True) -> None:
        """Remember ``outcome`` under its event id (as the newest entry); ``logged``: the
        decision log holds it or will (False for a selection read from the requests topic)."""
        self._lru.put(outcome.event_id, (*pack(outcome), logged))

    def unlogged(self, event_id: str) -> bool:
        """Whether ``event_id`` is remembered but the decision log may lack its record."""
        packed = self._lru.get(event_id)
        return packed is not None and not packed[-1]

    def mark_logged(self, event_id: str) -> None:
        """Record that the decision log holds ``event_id``'s decision (its place in the LRU
        order is kept)."""
        packed = self._lru.get(event_id)
        if packed is not None and not packed[-1]:
            self._lru[event_id] = (*packed[:-1], True)

    def get(self, event_id: str) -> Outcome | None:
        packed = self._lru.get(event_id)
        return None if packed is None else unpack(event_id, packed)

    def __getitem__(self, event_id: str) -> Outcome:
        return unpack(event_id, self._lru[event_id])

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def __iter__(self) -> Iterator[str]:
        return iter(self._lru)

    def items(self) -> Iterator[tuple[str, Outcome]]:
        """(event id, outcome) pairs, oldest first."""
        for event_id, packed in self._lru.items():
            yield event_id, unpack(event_id, packed)
