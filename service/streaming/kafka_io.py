"""Kafka plumbing around the handler: the request publisher and the selection follower.

* :class:`KafkaRequestPublisher` writes alignment requests with ``acks=all`` and waits for every
  acknowledgement, so the handler commits engine state only for durably published selections.
* :class:`SelectionFollower` reads the requests topic from the beginning, outside any consumer
  group (partitions assigned explicitly: every worker must see every selection), and folds other
  workers' selections (and, after a restart, this worker's earlier ones) into the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from google.protobuf.message import DecodeError

from service.handlers import SelectionHandler
from service.messages import AlignmentRequestOut
from service.wire import codecs

log = logging.getLogger("pairsieve.kafka")


class KafkaRequestPublisher:
    """Publishes :class:`AlignmentRequestOut` to the requests topic (key = item id)."""

    def __init__(self, bootstrap: str, topic: str, *, max_request_bytes: int = 16 * 1024 * 1024):
        self.topic = topic
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                          max_request_size=max_request_bytes, linger_ms=0)
        self.published = 0

    async def start(self) -> None:
        await self._producer.start()

    async def publish_requests(self, requests: Sequence[AlignmentRequestOut]) -> None:
        futs = [await self._producer.send(self.topic,
                                          codecs.request_to_proto(r).SerializeToString(),
                                          key=r.item_id.encode())
                for r in requests]
        await asyncio.gather(*futs)  # raises if any was not acknowledged
        self.published += len(requests)

    async def send_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        await self._producer.send_and_wait(topic, value, key=key)

    async def stop(self) -> None:
        await self._producer.flush()
        await self._producer.stop()


class SelectionFollower:
    """Tails the requests topic (all partitions, from the start) into ``handler``."""

    def __init__(self, bootstrap: str, topic: str, handler: SelectionHandler):
        self.topic = topic
        self.handler = handler
        self._bootstrap = bootstrap
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None
        self.folded = 0
        self.caught_up = asyncio.Event()

    async def start(self) -> None:
        # A short fetch wait keeps the selection lag low (aiokafka's default 500 ms dominated it).
        c = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             fetch_max_wait_ms=50)
        await c.start()
        parts = c.partitions_for_topic(self.topic) or set()
        for _ in range(50):
            if parts:
                break
            await asyncio.sleep(0.1)
            await c._client.force_metadata_update()
            parts = c.partitions_for_topic(self.topic) or set()
        if not parts:
            await c.stop()
            raise RuntimeError(f"requests topic {self.topic!r} has no partitions (not created?)")
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        self._consumer = c
        self._task = asyncio.get_running_loop().create_task(self._run(), name="selection-follower")

    async def _run(self) -> None:
        c = self._consumer
        assert c is not None
        try:
            while True:
                batches = await c.getmany(timeout_ms=100, max_records=500)
                for tp, records in batches.items():
                    for rec in records:
                        try:
                            outcome, vec = codecs.request_from_proto(
                                codecs.pb.AlignmentRequest.FromString(rec.value))
                            if await self.handler.observe_remote_selection(outcome, vec):
                                self.folded += 1
                        except (ValueError, DecodeError) as exc:  # foreign or corrupt: log, go on
                            log.warning("skipping unreadable selection at %s@%d: %s",
                                        tp, rec.offset, exc)
                # Caught up = a poll that found nothing more. (tansu's ListOffsets reports a
                # wrong end offset, so end_offsets() cannot be used for this.)
                if not batches and not self.caught_up.is_set():
                    self.caught_up.set()
        except asyncio.CancelledError:
            pass

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()
