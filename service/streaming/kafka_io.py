"""Kafka plumbing around the handler: the publisher and the topic followers.

* :class:`KafkaPublisher` writes alignment requests, training pairs and model versions with
  ``acks=all`` and waits for every acknowledgement, so the engine changes state only for durably
  published records (the :class:`~service.messages.Publisher` port).
* :class:`TopicFollower` reads one topic from the beginning, outside any consumer group
  (partitions assigned explicitly: every worker must see every record), decodes each record and
  folds what one poll returned in one call (a replay of 100k records is a few hundred engine
  calls, not 100k); ``caught_up`` is set after the first poll that found nothing more. Three run
  in a worker (:func:`selection_follower`, :func:`pairs_follower`, :func:`models_follower`): the
  requests topic (other workers' selections and, after a restart, this worker's earlier ones), the
  training pairs and the model versions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import BrokerResponseError
from google.protobuf.message import DecodeError

from service.handlers import SelectionHandler
from service.messages import (
    AlignmentRequestOut,
    ModelRelease,
    Outcome,
    PartialPublish,
    TrainingPair,
)
from service.settings import IDEMPOTENCE_MODES
from service.streaming.security import PLAINTEXT, KafkaSecurity
from service.wire import codecs

T = TypeVar("T")

log = logging.getLogger("pairsieve.kafka")


class KafkaPublisher:
    """Publishes alignment requests (key = item id), decisions (key = event id), training pairs
    (key = pair key) and model versions (key ``model``), each call returning once every record
    is acknowledged.

    Parameters
    ----------
    bootstrap : str
    topic : str
        The requests topic.
    pairs_topic, models_topic : str or None
        Where :meth:`publish_pairs` and :meth:`publish_model` write (None: those raise).
    decisions_topic : str or None
        The decision log (None: decisions are not logged).
    modalities : sequence of str
        The configured (modality a, modality b) (recorded in every pair).
    max_request_bytes : int
    security : KafkaSecurity
        How the producer connects (default plaintext).
    idempotence : {"auto", "on", "off"}
        Whether the producer is idempotent (a retry after a lost acknowledgement never writes
        a record twice), see :meth:`start`; ``idempotent`` says what it got.
    """

    def __init__(self, bootstrap: str, topic: str, *, pairs_topic: str | None = None,
                 models_topic: str | None = None, decisions_topic: str | None = None,
                 modalities: Sequence[str] = (), max_request_bytes: int = 16 * 1024 * 1024,
                 security: KafkaSecurity = PLAINTEXT, idempotence: str = "auto"):
        self.topic = topic
        self.decisions_topic = decisions_topic
        self.pairs_topic = pairs_topic
        self.models_topic = models_topic
        self.modalities = tuple(modalities)
        if idempotence not in IDEMPOTENCE_MODES:
            raise ValueError(f"idempotence must be auto, on or off, got {idempotence!r}")
        self.idempotence = idempotence
        self._producer_args = dict(bootstrap_servers=bootstrap, acks="all",
                                   max_request_size=max_request_bytes, linger_ms=0,
                                   client_id="pairsieve-publisher", **security.aiokafka())
        self._producer = self._new_producer(idempotence != "off")
        self.idempotent = False
        self.published = 0
        self.pairs_published = 0
        self.models_published = 0

    def _new_producer(self, idempotent: bool) -> AIOKafkaProducer:
        return AIOKafkaProducer(enable_idempotence=idempotent, **self._producer_args)

    async def start(self) -> None:
        """Connect. With idempotence ``auto``, a broker that refuses a producer id (tansu, or a
        cluster without the IdempotentWrite permission) gets a plain producer and a warning;
        with ``on`` that refusal stops the start (:class:`RuntimeError`)."""
        if self.idempotence == "off":
            await self._producer.start()
            return
        try:
            await self._producer.start()
            self.idempotent = True
            return
        except BrokerResponseError as exc:  # the broker answered InitProducerId with an error
            await self._producer.stop()
            if self.idempotence == "on":
                raise RuntimeError(f"the broker refused an idempotent producer ({exc!r}) and "
                                   "PAIRSIEVE_KAFKA_IDEMPOTENCE=on") from exc
            log.warning("the broker refused an idempotent producer (%r): publishing without "
                        "idempotence, so a retry after a lost acknowledgement (a broker crash) "
                        "can write a request twice; readers deduplicate by request id", exc)
        self._producer = self._new_producer(False)
        await self._producer.start()

    async def _send_all(self, topic: str,
                        records: Sequence[tuple[bytes | None, bytes]]) -> None:
        """Send and wait for every acknowledgement; raises :class:`PartialPublish` (with the
        acknowledged indices) when any record could not be written."""
        futs = []
        try:
            for key, value in records:
                futs.append(await self._producer.send(topic, value, key=key))
        except Exception as exc:  # the later records never reached the producer
            done = await asyncio.gather(*futs, return_exceptions=True)
            raise PartialPublish([i for i, r in enumerate(done)
                                  if not isinstance(r, BaseException)], exc) from exc
        done = await asyncio.gather(*futs, return_exceptions=True)
        failed = [r for r in done if isinstance(r, BaseException)]
        if failed:
            raise PartialPublish([i for i, r in enumerate(done)
                                  if not isinstance(r, BaseException)], failed[0]) from failed[0]

    async def publish_requests(self, requests: Sequence[AlignmentRequestOut]) -> None:
        await self._send_all(self.topic, [
            (r.item_id.encode(), codecs.request_to_proto(r).SerializeToString())
            for r in requests])
        self.published += len(requests)

    async def publish_decisions(self, outcomes: Sequence[Outcome], decided_at: float) -> None:
        """One decision-log record per engine batch (:func:`codecs.decision_records_to_proto`;
        no key: the producer spreads the records over the partitions)."""
        if self.decisions_topic is None or not outcomes:
            return
        await self._send_all(self.decisions_topic, [
            (None, rec.SerializeToString())
            for rec in codecs.decision_records_to_proto(outcomes, decided_at)])

    async def publish_pairs(self, pairs: Sequence[TrainingPair]) -> None:
        if self.pairs_topic is None:
            raise RuntimeError("this publisher has no training-pairs topic")
        await self._send_all(self.pairs_topic, [
            (codecs.pair_key_bytes(p.key),
             codecs.pair_to_proto(p, self.modalities).SerializeToString()) for p in pairs])
        self.pairs_published += len(pairs)

    async def publish_model(self, release: ModelRelease) -> None:
        if self.models_topic is None:
            raise RuntimeError("this publisher has no models topic")
        await self._send_all(self.models_topic, [
            (codecs.MODEL_KEY, codecs.model_release_to_proto(release).SerializeToString())])
        self.models_published += 1

    async def broker_reachable(self, timeout_s: float = 3.0) -> bool:
        """Whether the cluster answers a metadata request within ``timeout_s``."""
        try:
            return bool(await asyncio.wait_for(self._producer.client.force_metadata_update(),
                                               timeout_s))
        except (TimeoutError, OSError):
            return False
        except Exception:  # any client error: not reachable as far as serving is concerned
            log.debug("broker probe failed", exc_info=True)
            return False

    async def send_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        await self._producer.send_and_wait(topic, value, key=key)

    async def stop(self) -> None:
        await self._producer.flush()
        await self._producer.stop()


class TopicFollower(Generic[T]):
    """Tails ``topic`` (all partitions, from the start) into ``fold``.

    Parameters
    ----------
    bootstrap, topic : str
    decode : callable(bytes) -> T
        One record value to a message; ``ValueError`` or ``DecodeError`` mean a foreign or
        corrupt record: logged with its offset and skipped.
    fold : async callable(list of T) -> int
        Folds the decoded records of one poll (in topic order per partition) into the worker;
        returns how many changed its state.
    name : str
        For logs and the task name (e.g. ``selections``).
    tail : int or None
        Read only the last ``tail`` records of each partition (None: from the beginning).
    security : KafkaSecurity
        How the consumer connects (default plaintext).
    fetch_max_wait_ms : int
        How long the broker may hold a fetch that found nothing: the follower's lag behind a new
        record when idle (a short wait keeps it low: aiokafka's default 500 ms dominated).
    max_records : int
        Records decoded and folded per poll (the event loop runs nothing else meanwhile): keep
        it small for records that hold many messages.
    """

    def __init__(self, bootstrap: str, topic: str, decode: Callable[[bytes], T],
                 fold: Callable[[list[T]], Awaitable[int]], *, name: str,
                 tail: int | None = None, security: KafkaSecurity = PLAINTEXT,
                 fetch_max_wait_ms: int = 50, max_records: int = 2000):
        self.topic = topic
        self.fetch_max_wait_ms = int(fetch_max_wait_ms)
        self.max_records = int(max_records)
        self.tail = tail
        self.name = name
        self._decode = decode
        self._fold = fold
        self._bootstrap = bootstrap
        self._security = security
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None
        self.partitions = 0  # of the topic, once started
        self.folded = 0
        self.read = 0
        self.skipped = 0
        self.caught_up = asyncio.Event()
        self._polls = 0  # polls started
        self._at_end_after = 0  # the latest poll (by its number) that left every partition read

    async def start(self) -> None:
        c = AIOKafkaConsumer(bootstrap_servers=self._bootstrap, group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             fetch_max_wait_ms=self.fetch_max_wait_ms,
                             client_id=f"pairsieve-follower-{self.name.replace(' ', '-')}",
                             **self._security.aiokafka())
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
            raise RuntimeError(f"{self.name} topic {self.topic!r} has no partitions "
                               "(not created?)")
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self.partitions = len(tps)
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        if self.tail is not None:
            first = await c.beginning_offsets(tps)
            end = await c.end_offsets(tps)
            for tp in tps:
                c.seek(tp, max(first[tp], end[tp] - self.tail))
        self._consumer = c
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name=f"{self.name}-follower")

    async def _run(self) -> None:
        c = self._consumer
        assert c is not None
        try:
            while True:
                self._polls += 1
                poll = self._polls
                batches = await c.getmany(timeout_ms=100, max_records=self.max_records)
                for tp, records in batches.items():
                    items = []
                    for rec in records:
                        self.read += 1
                        try:
                            items.append(self._decode(rec.value))
                        except (ValueError, DecodeError) as exc:  # foreign or corrupt: log, go on
                            self.skipped += 1
                            log.warning("skipping unreadable %s record at %s@%d: %s", self.name,
                                        tp, rec.offset, exc)
                    if items:
                        self.folded += await self._fold(items)
                # Caught up = a poll that found nothing more. (tansu's ListOffsets reports a
                # wrong end offset, so end_offsets() cannot be used for this.)
                if not batches and not self.caught_up.is_set():
                    self.caught_up.set()
                if not batches or await self._at_high_water(c):
                    self._at_end_after = poll
        except asyncio.CancelledError:
            pass

    async def _at_high_water(self, c: AIOKafkaConsumer) -> bool:
        """Every assigned partition read up to the high watermark of its last fetch."""
        for tp in c.assignment():
            hw = c.highwater(tp)
            if hw is None or await c.position(tp) < hw:
                return False
        return True

    async def read_to_end(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything on the topic when this is called is folded in: a poll that
        started after the call left every partition read to its end (an empty poll, or the
        position at the high watermark the broker reported). False after ``timeout_s`` or when
        the follower stopped."""
        want = self._polls + 1
        deadline = time.monotonic() + timeout_s
        while self._at_end_after < want:
            if self._task is None or self._task.done() or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def wait_caught_up(self, progress_every_s: float = 10.0) -> None:
        """Wait until the topic was read to its end once, logging progress while it takes."""
        t0 = time.monotonic()
        while not self.caught_up.is_set():
            try:
                await asyncio.wait_for(self.caught_up.wait(), progress_every_s)
            except TimeoutError:
                log.info("still replaying %s: %d records read (%.0fs)", self.name, self.read,
                         time.monotonic() - t0)
            if self._task is not None and self._task.done():
                raise RuntimeError(f"the {self.name} follower stopped before catching up")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()


def selection_follower(bootstrap: str, topic: str, handler: SelectionHandler,
                       security: KafkaSecurity = PLAINTEXT
                       ) -> TopicFollower[tuple[Outcome, np.ndarray]]:
    """Folds every worker's selections (the requests topic) into ``handler``: spend, caches and
    the dedup memory survive a restart and are shared by the workers."""
    def decode(value: bytes) -> tuple[Outcome, np.ndarray]:
        return codecs.request_from_proto(codecs.pb.AlignmentRequest.FromString(value))

    return TopicFollower(bootstrap, topic, decode, handler.observe_remote_selections,
                         name="selections", security=security)


def pairs_follower(bootstrap: str, topic: str, handler: SelectionHandler,
                   security: KafkaSecurity = PLAINTEXT) -> TopicFollower[TrainingPair]:
    """Folds the acquired pairs (the training-pairs topic) into ``handler``'s pairs store."""
    dims = handler.dims

    def decode(value: bytes) -> TrainingPair:
        return codecs.pair_from_proto(codecs.pb.TrainingPair.FromString(value), dims)

    return TopicFollower(bootstrap, topic, decode, handler.learning.ingest_pairs,
                         name="training pairs", security=security)


def decisions_follower(bootstrap: str, topic: str, handler: SelectionHandler, tail: int,
                       security: KafkaSecurity = PLAINTEXT) -> TopicFollower[list[Outcome]]:
    """Remembers the skip decisions of the last ``tail`` records of each decision-log partition
    (a redelivered event gets its earlier verdict after a restart or a rebalance too).

    A decision whose event the handler remembers as logged (this worker's own, read back)
    would change nothing (:meth:`SelectionHandler.holds_logged_decision`): only its event id
    is read. The check runs as the poll is decoded, on the event loop that folds it right after
    (no await in between), so it still holds at the fold.
    """
    def decode(value: bytes) -> list[Outcome]:
        return codecs.decision_records_from_proto(codecs.pb.DecisionRecord.FromString(value),
                                                  held=handler.holds_logged_decision)[0]

    async def fold(records: list[list[Outcome]]) -> int:
        return await handler.observe_remote_decisions([o for rec in records for o in rec])

    # a record holds up to a batch of decisions: 8 a poll, as many decisions as ~2,000 records
    # of the other followers, so a replay does not hold the event loop for seconds at a time
    return TopicFollower(bootstrap, topic, decode, fold, name="decisions", tail=tail,
                         security=security, max_records=8)


def models_follower(bootstrap: str, topic: str, handler: SelectionHandler,
                    security: KafkaSecurity = PLAINTEXT
                    ) -> TopicFollower[codecs.pb.ModelVersion]:
    """Offers the newest model version of each poll to ``handler`` (older ones of the same poll
    are never loaded: a replay without compaction reads every version's checkpoint bytes, but
    deserialises one)."""
    async def fold(msgs: list[codecs.pb.ModelVersion]) -> int:
        newest = max(msgs, key=lambda m: m.version)
        try:
            release = codecs.model_release_from_proto(newest)
        except ValueError as exc:
            log.warning("skipping unreadable model version %d: %s", newest.version, exc)
            return 0
        return int(await handler.learning.offer_model(release))

    return TopicFollower(bootstrap, topic, codecs.pb.ModelVersion.FromString, fold,
                         name="models", security=security)
