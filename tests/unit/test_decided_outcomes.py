"""The worker's memory of decided events (service/decided.py): exact round trip, bounded, and
out of the garbage collector's way."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from service.core.reasons import Reason
from service.core.types import Decision
from service.decided import DecidedOutcomes, pack, unpack
from service.messages import Outcome


def _outcome(i: int, rng: np.random.Generator, reason) -> Outcome:
    f = [float(x) for x in rng.standard_normal(8)]
    d = Decision(f"item-{i}", rng.choice(["image", "text"]).item(), bool(rng.random() < 0.3),
                 f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], int(rng.integers(0, 9)), reason,
                 typicality=float(rng.random()), partnerless=float(rng.random()),
                 cost=float(rng.random()))
    return Outcome(f"ev-{i}", d, bool(rng.random() < 0.5), f"w{i % 3}")


@pytest.mark.parametrize("seed", range(5))
def test_pack_unpack_is_exact_for_any_outcome(seed):
    rng = np.random.default_rng(seed)
    for i, reason in enumerate([*Reason, "skip:something_new", ""]):
        o = _outcome(i, rng, reason)
        back = unpack(o.event_id, pack(o))
        assert back == o
        assert type(back.decision.reason) is type(o.decision.reason)  # a Reason stays a Reason


def test_entries_are_untracked_by_the_garbage_collector():
    store = DecidedOutcomes(100)
    rng = np.random.default_rng(0)
    for i in range(50):
        store.put(_outcome(i, rng, Reason.SKIP_BELOW_THRESHOLD))
    gc.collect()
    # what a full collection would walk: nothing of the stored entries
    assert not any(gc.is_tracked(v) for v in store._lru.values())
    # the same as objects (what the worker used to keep): two tracked objects per entry
    kept = [_outcome(i, rng, Reason.SKIP_BELOW_THRESHOLD) for i in range(50)]
    gc.collect()
    assert all(gc.is_tracked(o) and gc.is_tracked(o.decision) for o in kept)


def test_the_store_is_a_bounded_mapping_by_write_order():
    store = DecidedOutcomes(3)
    rng = np.random.default_rng(1)
    outs = [_outcome(i, rng, Reason.ACCEPT_UTILITY) for i in range(5)]
    for o in outs:
        store.put(o)
    assert store.capacity == 3 and len(store) == 3
    assert list(store) == ["ev-2", "ev-3", "ev-4"]
    assert "ev-1" not in store and store.get("ev-1") is None
    assert store["ev-3"] == outs[3] and store.get("ev-4") == outs[4]
    assert dict(store.items()) == {o.event_id: o for o in outs[2:]}
    store.put(outs[2])  # rewritten: the newest again
    assert list(store) == ["ev-3", "ev-4", "ev-2"]
    with pytest.raises(KeyError):
        store["ev-0"]


def test_the_logged_flag_round_trips_and_marking_keeps_the_lru_order():
    d = DecidedOutcomes(3)
    rng = np.random.default_rng(2)
    outs = [_outcome(i, rng, Reason.ACCEPT_UTILITY) for i in range(4)]
    d.put(outs[0])
    d.put(outs[1], logged=False)
    d.put(outs[2])
    assert [d.unlogged(o.event_id) for o in outs[:3]] == [False, True, False]
    assert not d.unlogged("never-seen")
    d.mark_logged("ev-1")
    d.mark_logged("never-seen")  # nothing to mark: no entry made
    assert not d.unlogged("ev-1") and "never-seen" not in d
    assert list(d) == ["ev-0", "ev-1", "ev-2"] and d["ev-1"] == outs[1]
    d.put(outs[3], logged=False)  # evicts the oldest, ev-0
    assert list(d) == ["ev-1", "ev-2", "ev-3"] and d.unlogged("ev-3")
    gc.collect()
    assert not any(gc.is_tracked(v) for v in d._lru.values())
