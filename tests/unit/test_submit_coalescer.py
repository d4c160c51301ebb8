"""SubmitCoalescer: concurrent calls decided as one batch, each caller answered as if alone."""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest

from service.core.types import Decision
from service.core.validation import VectorError
from service.messages import IncomingEvent, Outcome, PartialPublish
from service.rpc.coalesce import SubmitCoalescer


def _events(tag: str, n: int) -> list[IncomingEvent]:
    return [IncomingEvent(f"{tag}{i}", f"item-{tag}{i}", "image", np.ones(4, np.float32))
            for i in range(n)]


def _outcome(ev: IncomingEvent, batch: int) -> Outcome:
    dec = Decision(item_id=ev.item_id, modality=ev.modality, accept=False, utility=float(batch),
                   uncertainty=0.0, diversity=0.0, coverage_bonus=0.0, margin=0.0, entropy=0.0,
                   least_confidence=0.0, threshold=0.0, model_version=0, reason="below_threshold")
    return Outcome(ev.event_id, dec, False, "w")


class GatedEngine:
    """A stand-in for ``SelectionHandler.submit``: records each batch it is handed; the first
    batch waits for ``release`` so that the test can queue calls behind it. ``refuse`` names
    event ids whose batch raises ``VectorError`` (as the core does, before deciding anything);
    ``fail_with`` makes every batch raise that error."""

    def __init__(self, refuse=(), fail_with: BaseException | None = None):
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.refuse = set(refuse)
        self.fail_with = fail_with

    async def __call__(self, events):
        self.batches.append([ev.event_id for ev in events])
        if len(self.batches) == 1:
            await self.release.wait()
        bad = [k for k, ev in enumerate(events) if ev.event_id in self.refuse]
        if bad:
            raise VectorError("non_finite", f"item {events[bad[0]].item_id!r}: NaN", bad[0])
        if self.fail_with is not None:
            raise self.fail_with
        return [_outcome(ev, len(self.batches)) for ev in events]


async def _queued(coalescer, engine, calls):
    """Start the first call, let it reach the engine, queue the others behind it, release."""
    first = asyncio.create_task(coalescer.submit(calls[0]))
    while not engine.batches:
        await asyncio.sleep(0)
    rest = [asyncio.create_task(coalescer.submit(c)) for c in calls[1:]]
    await asyncio.sleep(0)
    engine.release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def _ids(outcomes):
    return [o.event_id for o in outcomes]


def test_a_lone_call_is_decided_at_once_alone():
    async def go():
        engine = GatedEngine()
        engine.release.set()
        co = SubmitCoalescer(engine, max_items=1024)
        out = await co.submit(_events("a", 3))
        assert engine.batches == [["a0", "a1", "a2"]]
        assert _ids(out) == ["a0", "a1", "a2"]
        assert (co.batches, co.calls) == (1, 1)
    asyncio.run(go())


def test_calls_that_wait_are_decided_as_one_batch_in_arrival_order_each_getting_its_own():
    async def go():
        engine = GatedEngine()
        co = SubmitCoalescer(engine, max_items=1024)
        calls = [_events("a", 2), _events("b", 3), _events("c", 1), _events("d", 2)]
        results = await _queued(co, engine, calls)
        assert engine.batches == [["a0", "a1"], ["b0", "b1", "b2", "c0", "d0", "d1"]]
        for call, out in zip(calls, results, strict=True):
            assert _ids(out) == [ev.event_id for ev in call]
        assert [o.decision.utility for o in results[0]] == [1.0, 1.0]  # batch 1
        assert {o.decision.utility for r in results[1:] for o in r} == {2.0}  # batch 2
        assert (co.batches, co.calls) == (2, 4)
    asyncio.run(go())


def test_a_merged_batch_holds_at_most_max_items_and_never_splits_a_call():
    async def go():
        engine = GatedEngine()
        co = SubmitCoalescer(engine, max_items=5)
        calls = [_events("a", 1), _events("b", 3), _events("c", 2), _events("d", 7),
                 _events("e", 1)]
        results = await _queued(co, engine, calls)
        # b + c fill 5 exactly; d (7, over the bound) is decided alone; e after it
        assert [len(b) for b in engine.batches] == [1, 5, 7, 1]
        for call, out in zip(calls, results, strict=True):
            assert _ids(out) == [ev.event_id for ev in call]
    asyncio.run(go())


def test_max_items_one_decides_every_call_alone():
    async def go():
        engine = GatedEngine()
        co = SubmitCoalescer(engine, max_items=1)
        await _queued(co, engine, [_events("a", 2), _events("b", 2), _events("c", 2)])
        assert engine.batches == [["a0", "a1"], ["b0", "b1"], ["c0", "c1"]]
    asyncio.run(go())


def test_a_call_the_core_refuses_fails_alone_and_the_others_are_decided():
    async def go():
        engine = GatedEngine(refuse={"c1"})
        co = SubmitCoalescer(engine, max_items=1024)
        calls = [_events("a", 1), _events("b", 2), _events("c", 2), _events("d", 1)]
        results = await _queued(co, engine, calls)
        # the merged batch b+c+d was refused, then decided call by call
        assert engine.batches[1:] == [["b0", "b1", "c0", "c1", "d0"], ["b0", "b1"],
                                      ["c0", "c1"], ["d0"]]
        assert _ids(results[1]) == ["b0", "b1"] and _ids(results[3]) == ["d0"]
        err = results[2]
        assert isinstance(err, VectorError)
        assert err.index == 1 and "'item-c1'" in str(err)  # its index within its own call
    asyncio.run(go())


@pytest.mark.parametrize("error", [PartialPublish([], RuntimeError("broker down")),
                                   RuntimeError("boom")])
def test_any_other_error_reaches_every_call_of_its_batch_and_the_next_batch_runs(error):
    async def go():
        engine = GatedEngine(fail_with=error)
        co = SubmitCoalescer(engine, max_items=3)
        calls = [_events("a", 1), _events("b", 2), _events("c", 1), _events("d", 1)]
        results = await _queued(co, engine, calls)
        assert [len(b) for b in engine.batches] == [1, 3, 1]  # b+c, then d: it went on
        assert all(r is error for r in results)
    asyncio.run(go())


def test_a_caller_that_gives_up_does_not_stop_its_batch_nor_leave_an_unread_error():
    unread = []

    async def go():
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unread.append(ctx))
        engine = GatedEngine(fail_with=RuntimeError("late failure"))
        co = SubmitCoalescer(engine, max_items=1024)
        first = asyncio.create_task(co.submit(_events("a", 1)))
        while not engine.batches:
            await asyncio.sleep(0)
        gave_up = asyncio.create_task(co.submit(_events("b", 1)))
        stays = asyncio.create_task(co.submit(_events("c", 1)))
        await asyncio.sleep(0)
        gave_up.cancel()
        engine.release.set()
        await co.drain()
        assert engine.batches == [["a0"], ["b0", "c0"]]  # b's events still decided
        assert gave_up.cancelled()
        for t in (first, stays):
            assert isinstance(t.exception(), RuntimeError)
        del first, gave_up, stays, co, engine
        gc.collect()  # an unread future error is reported when the future is collected
    asyncio.run(go())
    assert not unread, unread


def test_bad_arguments_are_refused_naming_them():
    with pytest.raises(ValueError, match="max_items must be >= 1, got 0"):
        SubmitCoalescer(GatedEngine(), max_items=0)

    async def empty():
        await SubmitCoalescer(GatedEngine()).submit([])
    with pytest.raises(ValueError, match="empty batch"):
        asyncio.run(empty())
