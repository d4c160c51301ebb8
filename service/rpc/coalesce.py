"""Concurrent ``Submit`` calls decided together: one engine batch for the calls that waited.

The engine decides one batch at a time. Without this, concurrent calls queue on the handler's
lock and each is decided alone: the per-batch costs (the engine's fixed upkeep, the publish of
the requests and the decision-log record, two broker round trips with the engine idle) are paid
once per call. :class:`SubmitCoalescer` keeps the calls that arrive while a batch is being decided
and hands them to the handler as one batch when it is free (dynamic batching, as in model
servers). A call that finds the engine idle is decided at once, alone: nothing waits for a batch
to fill, so a lone client sees no added latency.

What a caller sees is what it would see alone:

* its outcomes, in its events' order, for its events only. The events of a merged batch are
  decided in arrival order, so an event id sent in two calls of one batch is decided once and the
  later call gets it as a duplicate, exactly as if the calls had run one after the other;
* its own error: a call's events are checked when decoded (ids, modality, dimension, values), so
  a bad call fails before it joins a batch. Should the core still refuse an event of a merged
  batch (``VectorError``, raised before anything is decided or published), the batch is decided
  again call by call, so only that call fails. Any other error (e.g. ``PartialPublish``: the
  broker failed, retryable) reaches every call of the batch, as it would have reached each of
  them alone (nothing was committed; a retry with the same event ids is answered from the dedup
  memory where the broker did take a request).

A caller that gives up (deadline, cancellation) does not stop its batch: the handler's work
never stops halfway (see :mod:`service.rpc.server`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from service.core.validation import VectorError
from service.messages import IncomingEvent, Outcome

log = logging.getLogger("pairsieve.grpc")

Decide = Callable[[Sequence[IncomingEvent]], Awaitable[list[Outcome]]]

DEFAULT_MAX_ITEMS = 1024  # events of one merged batch (Settings.grpc_coalesce_max_items)


class SubmitCoalescer:
    """Decide concurrent calls' events as one batch through ``decide`` (see module docstring).

    Parameters
    ----------
    decide
        The handler's ``submit``: a batch of events -> its outcomes, in order.
    max_items
        At most this many events in one merged batch (calls are never split: a single call
        larger than this is decided alone). ``1`` turns merging off (every call alone).
    on_batch
        Called with the number of calls of each batch handed to ``decide`` (metrics).
    """

    def __init__(self, decide: Decide, *, max_items: int = DEFAULT_MAX_ITEMS,
                 on_batch: Callable[[int], None] | None = None):
        if int(max_items) < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items!r}")
        self._decide = decide
        self.max_items = int(max_items)
        self._waiting: deque[tuple[Sequence[IncomingEvent], asyncio.Future]] = deque()
        self._runner: asyncio.Task | None = None
        self._on_batch = on_batch
        self.batches = 0  # merged batches decided (for tests and metrics)
        self.calls = 0    # calls answered

    async def submit(self, events: Sequence[IncomingEvent]) -> list[Outcome]:
        """The outcomes of ``events`` (a non-empty, decoded call), decided with the calls that
        wait alongside it."""
        if not events:
            raise ValueError("empty batch: submit() needs at least one event")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting.append((events, fut))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run())
        # shield: a caller that gives up does not cancel the future its batch still sets (and
        # shield reads an error set after that, so none is reported as never retrieved)
        return await asyncio.shield(fut)

    async def drain(self) -> None:
        """Wait until every call handed in so far is answered."""
        while self._runner is not None and not self._runner.done():
            await asyncio.shield(self._runner)

    # ------------------------------------------------------------------ internals
    def _take(self) -> list[tuple[Sequence[IncomingEvent], asyncio.Future]]:
        group = [self._waiting.popleft()]
        size = len(group[0][0])
        while self._waiting and size + len(self._waiting[0][0]) <= self.max_items:
            calls = self._waiting.popleft()
            size += len(calls[0])
            group.append(calls)
        return group

    async def _run(self) -> None:
        while self._waiting:
            group = self._take()
            try:
                await self._decide_group(group)
            except BaseException as exc:  # noqa: BLE001 - every waiting caller gets it
                for _, fut in group:
                    _settle(fut, exc=exc)
                if isinstance(exc, asyncio.CancelledError):
                    for _, fut in self._waiting:
                        _settle(fut, exc=exc)
                    self._waiting.clear()
                    raise

    async def _decide_group(self, group) -> None:
        self.batches += 1
        if self._on_batch is not None:
            try:
                self._on_batch(len(group))
            except Exception:  # metrics must never fail a call
                log.exception("on_batch failed")
        if len(group) == 1:
            events, fut = group[0]
            _settle(fut, result=await self._decide(events))
            self.calls += 1
            return
        merged = [ev for events, _ in group for ev in events]
        try:
            outcomes = await self._decide(merged)
        except VectorError:  # one call's events refused before anything was decided: call by call
            log.debug("a merged batch of %d calls was refused; deciding them one by one",
                      len(group))
            for events, fut in group:
                try:
                    _settle(fut, result=await self._decide(events))
                except VectorError as exc:
                    _settle(fut, exc=exc)
                self.calls += 1
            return
        lo = 0
        for events, fut in group:
            hi = lo + len(events)
            _settle(fut, result=outcomes[lo:hi])
            lo = hi
        self.calls += len(group)


def _settle(fut: asyncio.Future, *, result=None, exc: BaseException | None = None) -> None:
    if fut.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        fut.cancel()
    elif exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
