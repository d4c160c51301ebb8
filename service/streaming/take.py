"""Micro-batches that close when the inflow pauses: low latency at low load, full under load.

faust's ``Stream.take_events(max_, within)`` yields a buffer when it holds ``max_`` events or
``within`` seconds after the previous batch, whatever the inflow. A short ``within`` then caps
the batch size under load (at 3,000 single-event records/s, 5 ms gave batches of ~100 events
and 11 % less throughput than 50 ms), a long one adds its whole length to every event's latency
at low load (at 2,000 events/s, 50 ms put the p99 at ~200 ms, 5 ms at ~75 ms).

:meth:`AdaptiveStream.take_until_idle` adds an idle criterion: a batch closes when it is full, when
no event was added for ``idle`` seconds (a fetch's records are buffered within microseconds of
each other, so a gap means the consumer has nothing more right now), or ``within`` seconds after
its first event (so a steady trickle cannot hold a batch open). Waiting for the first event costs
nothing (no polling while the stream is idle). Everything else is faust 0.15's
``take_events``, unchanged: the buffer is filled by a stream processor in the background, and a
buffer's events are acknowledged when the caller's loop moves on (or the generator is closed).

The size bound counts records, before they are decoded; records that turn out to be malformed take
slots of a batch that valid events would have filled (with 10 % poison the valid batches were ~7 %
smaller, and the per-batch cost is mostly fixed). So the bound may be a callable, asked before each
batch: the features agent passes :func:`record_target` of the recently refused share
(:class:`RefusedShare`), which keeps the valid part of a batch near ``batch_max_items``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, cast

import faust
from faust.streams import _tracks_buffer_agen
from faust.types import EventT
from mode.utils.aiter import aiter
from mode.utils.futures import notify


def close_batch(size: int, max_: int, seen: int, elapsed: float, within: float) -> bool:
    """Whether a micro-batch holding ``size`` events (``seen`` at the previous check, one idle
    interval ago; ``elapsed`` seconds after its first event) closes now: full, nothing new since
    the last check, or open for ``within``."""
    return size >= max_ or (size > 0 and (size == seen or elapsed >= within))


def record_target(max_items: int, refused_share: float) -> int:
    """Records a micro-batch takes so that its valid ones (``1 - refused_share`` of them, on
    average) fill ``max_items`` without spilling over.

    Each record is refused independently with probability ``p = refused_share``, so ``R`` records
    hold ``R (1 - p)`` valid ones with a standard deviation of ``sqrt(R p (1 - p))``; the target
    keeps two of those below ``max_items`` (a spill past ``max_items`` costs the engine one extra,
    small batch; it happens in ~2 % of the batches). Never fewer than ``max_items`` (a record may
    carry several events: that is bounded in events downstream) nor more than twice as many.

    Parameters
    ----------
    max_items : int
        The valid events one batch should hold (``batch_max_items``), >= 1.
    refused_share : float
        The share of records refused recently, in [0, 1].

    Returns
    -------
    int
        The record bound of the next batch, in ``[max_items, 2 * max_items]``.
    """
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items!r}")
    if not 0.0 <= refused_share <= 1.0:
        raise ValueError(f"refused_share must be in [0, 1], got {refused_share!r}")
    p = refused_share
    if p >= 0.5:
        return 2 * max_items
    valid_target = max_items - 2.0 * math.sqrt(max_items * p * (1.0 - p))
    return min(2 * max_items, max(max_items, math.floor(valid_target / (1.0 - p))))


class RefusedShare:
    """Exponentially weighted share of refused records over recent micro-batches.

    Parameters
    ----------
    weight : float
        Weight of the newest batch, in (0, 1]; 0.2 follows a change within ~10 batches.
    """

    def __init__(self, weight: float = 0.2) -> None:
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight must be in (0, 1], got {weight!r}")
        self.weight = float(weight)
        self.share = 0.0

    def observe(self, refused: int, records: int) -> None:
        """Fold in one micro-batch: ``refused`` of its ``records`` were malformed."""
        if records <= 0 or not 0 <= refused <= records:
            raise ValueError(f"need 0 <= refused <= records and records > 0, got "
                             f"refused={refused!r}, records={records!r}")
        self.share += self.weight * (refused / records - self.share)


class AdaptiveStream(faust.Stream):
    """A faust stream with :meth:`take_until_idle` (module doc). Set as the app's ``Stream``."""

    @_tracks_buffer_agen
    async def take_until_idle(self, max_: int | Callable[[], int], within: float,
                              idle: float) -> AsyncGenerator[Sequence[EventT], None]:
        """Buffer events and yield them as a list when the batch closes (:func:`close_batch`).

        Parameters
        ----------
        max_ : int or callable returning int
            Largest batch (records); a callable is asked before the first batch and again once
            the caller is done with each batch (module doc).
        within : float
            Longest a batch stays open after its first event, seconds.
        idle : float
            A batch to which nothing was added for this long closes, seconds (<= ``within``).
        """
        if not 0 < idle <= within:
            raise ValueError(f"need 0 < idle <= within, got idle={idle!r}, within={within!r}")

        def bound() -> int:
            size = max_() if callable(max_) else max_
            if size < 1:
                raise ValueError(f"a micro-batch bound must be >= 1, got {size!r}")
            return size
        limit = bound()
        buffer: list[Any] = []
        events: list[EventT] = []
        buffer_full = asyncio.Event()
        buffer_started = asyncio.Event()
        buffer_consumed = asyncio.Event()
        stream_enable_acks: bool = self.enable_acks
        buffer_consuming: asyncio.Future | None = None
        channel_it = aiter(self.channel)

        async def add_to_buffer(value: Any) -> Any:
            try:
                nonlocal buffer_consuming
                if buffer_consuming is not None:
                    try:
                        await buffer_consuming
                    finally:
                        buffer_consuming = None
                buffer.append(value)
                event = self.current_event
                if event is None:
                    raise RuntimeError("Take buffer found current_event is None")
                events.append(event)
                buffer_started.set()
                if len(buffer) >= limit:
                    buffer_full.set()
                    # strict: never more than limit events in one batch
                    buffer_consumed.clear()
                    await self.wait(buffer_consumed)  # type: ignore[arg-type]
            except asyncio.CancelledError:  # pragma: no cover
                raise
            except Exception as exc:
                self.log.exception("Error adding to take buffer: %r", exc)
                await self.crash(exc)
            return value

        self.enable_acks = False  # this generator acknowledges, once the caller moved on
        self.add_processor(add_to_buffer)
        self._enable_passive(cast(Any, channel_it))
        loop = asyncio.get_running_loop()
        try:
            while not self.should_stop:
                # the first event: no timeout, no polling while the stream is idle
                await self.wait_for_stopped(buffer_started)  # type: ignore[arg-type]
                opened, seen = loop.time(), 0
                while not self.should_stop:
                    left = within - (loop.time() - opened)
                    await self.wait_for_stopped(
                        buffer_full,  # type: ignore[arg-type]
                        timeout=max(0.0, min(idle, left)))
                    size = len(buffer)
                    if close_batch(size, limit, seen, loop.time() - opened, within):
                        break
                    seen = size
                if buffer:
                    buffer_consuming = loop.create_future()
                    try:
                        yield list(events)
                    finally:
                        buffer.clear()
                        for event in events:
                            await self.ack(event)
                        events.clear()
                        limit = bound()  # before the next record is let into the buffer
                        notify(buffer_consuming)
                        buffer_full.clear()
                        buffer_started.clear()
                        buffer_consumed.set()
        finally:
            self.enable_acks = stream_enable_acks
            self._processors.remove(add_to_buffer)
