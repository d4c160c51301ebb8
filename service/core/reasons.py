"""The reason codes of a selection decision: the one list everything else derives from.

``Decision.reason`` is one of :class:`Reason` (a ``str``, so it travels as its value:
``"accept:utility"``...). The budget's decision rule (:mod:`service.core.budget`) produces them,
the codecs put their value in ``Decision.reason`` on the wire, and the metrics split each into the
``decision`` (accept|skip) and ``reason`` label values of ``pairsieve_decisions_total``
(:func:`label_values`).
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why an item was accepted or skipped; the value is ``<decision>:<code>``."""

    ACCEPT_UTILITY = "accept:utility"  #: utility cleared the threshold (or rate 1: take all)
    ACCEPT_EXPLORE = "accept:explore"  #: random exploration, whatever the utility
    ACCEPT_WARMUP = "accept:warmup"  #: random accept during the cold start
    ACCEPT_RANDOM_TAIL = "accept:random_tail"  #: random accept once ``random_after`` is spent
    SKIP_BELOW_THRESHOLD = "skip:below_threshold"  #: utility under the threshold
    SKIP_BUDGET_EXHAUSTED = "skip:budget_exhausted"  #: the absolute budget is spent
    SKIP_PACING = "skip:pacing"  #: spend is ahead of ``rate * seen`` by more than the slack
    SKIP_WARMUP = "skip:warmup"  #: random skip during the cold start
    SKIP_QUOTA = "skip:quota"  #: vetoed by the per-modality quota (outside the budget)
    SKIP_RANDOM_TAIL = "skip:random_tail"  #: random skip once ``random_after`` is spent
    #: Never produced by the core: a redelivered event answered from the handler's dedup memory
    #: (``Outcome.duplicate``); metrics count it under this code.
    SKIP_DUPLICATE = "skip:duplicate"

    @property
    def decision(self) -> str:
        """``"accept"`` or ``"skip"``."""
        return self.value.partition(":")[0]

    @property
    def code(self) -> str:
        """The part after the colon, e.g. ``"below_threshold"``."""
        return self.value.partition(":")[2]

    @property
    def accept(self) -> bool:
        return self.decision == "accept"


def label_values() -> dict[str, tuple[str, ...]]:
    """``{"accept": (codes...), "skip": (codes...)}`` in :class:`Reason` order.

    The bounded ``decision`` / ``reason`` label sets of ``pairsieve_decisions_total``.
    """
    out: dict[str, tuple[str, ...]] = {"accept": (), "skip": ()}
    for r in Reason:
        out[r.decision] += (r.code,)
    return out


def parse(value: str) -> Reason | str:
    """``value`` as a :class:`Reason` when it is one, else unchanged (e.g. from a newer peer)."""
    try:
        return Reason(value)
    except ValueError:
        return value
