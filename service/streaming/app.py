"""The faust stream processor: features in (micro-batched), labels in, dead letters out.

Agents reading source topics run with concurrency 1 (the engine is sequential by design: an
accept changes the next decision), faust's web server is off, and torch work happens in the
handler's executor, so the event loop (and Kafka heartbeats) never stall.

Per micro-batch (:meth:`~service.streaming.take.AdaptiveStream.take_until_idle`: closed when it
holds ``batch_max_items`` records (more while malformed records come in, so that its valid part
stays near that size: :func:`~service.streaming.take.record_target`), when nothing came in for
``batch_idle_seconds``, or ``max_wait_seconds`` after its first event):

1. decode every record; bad ones (undecodable, wrong dimension, NaN/inf, unknown modality,
   missing fields, oversized) go to the dead-letter topic with a reason code and the original
   bytes, and the stream keeps running;
2. the good events go to :meth:`SelectionHandler.submit`, which publishes accepted items to the
   requests topic *before* committing engine state; a publish failure is retried with backoff
   (nothing was committed, so the retry cannot double-spend);
3. the events are acknowledged only after that, so faust commits their offsets only then:
   at-least-once, and redeliveries are deduplicated by event id.

Labels (one partition, so one worker of the group reads them: that worker is the trainer,
:meth:`StreamProcessor.owns_labels`) are micro-batched the same way: each label of a batch is
decoded and handed to the learning loop, which publishes a MATCH as a training pair before the
batch is acknowledged (a publish failure is retried, a label is never acknowledged undone). A
label that cannot be decoded, is refused or cannot be resolved goes to the dead-letter topic with
its reason (``label_unresolved`` names the missing vector); a batch's dead letters are published
together, one broker round trip instead of one per bad label.

Dead letters are logged one full line per reason and ten seconds, with the count of the rest
(:class:`~service.observability.log_throttle.ThrottledWarnings`): a poisoned topic must not
drown the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import faust
from google.protobuf.message import DecodeError

from service.handlers import SelectionHandler
from service.messages import IncomingEvent, StreamMetricsSink
from service.observability.log_throttle import ThrottledWarnings
from service.settings import Settings
from service.streaming.kafka_io import KafkaPublisher
from service.streaming.records import KafkaRecord
from service.streaming.take import AdaptiveStream, RefusedShare, record_target
from service.streaming.topics import DEAD_LETTER_TOPIC, FEATURES_TOPIC, LABELS_TOPIC
from service.wire import codecs

log = logging.getLogger("pairsieve.stream")

FETCH_WAIT_ATTR = "pairsieve_fetch_max_wait_ms"

DEAD_LETTER_LOG_INTERVAL_S = 10.0
"""Dead letters are logged one full line per reason and interval, with the count of the rest
(the dead-letter topic and the metric keep every one)."""


def install_fetch_wait_hook() -> None:
    """Let each faust app choose its consumer's ``fetch_max_wait_ms`` (faust 0.15 hard-codes
    1500 ms in ``AIOKafkaConsumerThread._create_worker_consumer``).

    The wrapped factory reads ``app.pairsieve_fetch_max_wait_ms`` (apps without it keep faust's
    value) and sets it on the aiokafka consumer before it starts; aiokafka hands it to its
    fetcher at ``start()``. Installed once per process; idempotent. Raises ``RuntimeError`` if
    the aiokafka consumer no longer has the attribute (an upgrade changed it: fail loudly rather
    than silently keep the 1.5 s wait).
    """
    from faust.transport.drivers import aiokafka as driver

    original = driver.AIOKafkaConsumerThread._create_worker_consumer
    if getattr(original, "_pairsieve_hook", False):
        return

    def create_worker_consumer(self, transport):
        consumer = original(self, transport)
        wait_ms = getattr(self.app, FETCH_WAIT_ATTR, None)
        if wait_ms is not None:
            if not hasattr(consumer, "_fetch_max_wait_ms"):
                raise RuntimeError("aiokafka consumer has no _fetch_max_wait_ms: cannot set the "
                                   "fetch wait (check the pinned aiokafka/faust versions)")
            consumer._fetch_max_wait_ms = int(wait_ms)
        return consumer

    # a marker on the function (install once) and a deliberate patch of faust's method: mypy
    # models neither function attributes nor method replacement
    create_worker_consumer._pairsieve_hook = True  # type: ignore[attr-defined]
    driver.AIOKafkaConsumerThread._create_worker_consumer = (  # type: ignore[method-assign]
        create_worker_consumer)


def faust_app(settings: Settings, bootstrap: str, group_id: str | None = None) -> faust.App:
    """The faust app the workers run (consumer group ``group_id``, default the settings'), with
    the features consumer's fetch wait from the settings. The benchmark's bare faust consumer
    (``pairsieve bench``, Kafka: faust's own per-event ceiling) is built here too, so the two
    cannot drift apart."""
    app = faust.App(
        group_id or settings.group_id,
        broker=f"kafka://{bootstrap}",
        broker_credentials=settings.kafka_security().faust_credentials(),
        broker_client_id="pairsieve-stream",
        web_enabled=False,
        topic_disable_leader=True,
        broker_rebalance_timeout=settings.rebalance_timeout_seconds,
        broker_session_timeout=settings.session_timeout_seconds,
        broker_heartbeat_interval=settings.session_timeout_seconds / 4,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        consumer_max_fetch_size=settings.fetch_max_partition_bytes,
        stream_wait_empty=False,
        topic_allow_declare=False,
        logging_config=None,
        Stream=AdaptiveStream,
    )
    install_fetch_wait_hook()
    setattr(app, FETCH_WAIT_ATTR, max(1, round(settings.fetch_max_wait_seconds * 1000)))
    return app


class GaveUp(Exception):
    """A micro-batch that kept failing was abandoned at shutdown (its offsets stay
    uncommitted)."""


class StreamProcessor:
    """Builds the faust app and its agents around one handler."""

    def __init__(self, settings: Settings, bootstrap: str, handler: SelectionHandler,
                 publisher: KafkaPublisher, metrics: StreamMetricsSink | None = None):
        self.settings = settings
        self.handler = handler
        self.publisher = publisher
        self.metrics = metrics
        self.dims = settings.dims
        self.draining = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self._in_flight: set[asyncio.Future] = set()
        self._warnings = ThrottledWarnings(log, DEAD_LETTER_LOG_INTERVAL_S)
        self.batches = 0
        # malformed records take slots of the take buffer: size it so the valid part stays full
        self.refused = RefusedShare()
        self.dead_letters = 0
        self.app = faust_app(settings, bootstrap)
        s = settings
        self.features = self.app.topic(s.topic(FEATURES_TOPIC), value_serializer="raw",
                                       key_serializer="raw", partitions=s.features_partitions)
        self.labels = self.app.topic(s.topic(LABELS_TOPIC), value_serializer="raw",
                                     key_serializer="raw", partitions=1)
        self.labels_topic = s.topic(LABELS_TOPIC)
        self.dead_letter_topic = s.topic(DEAD_LETTER_TOPIC)
        self.app.agent(self.features, name="pairsieve-features", concurrency=1)(self._on_features)
        self.app.agent(self.labels, name="pairsieve-labels", concurrency=1)(self._on_labels)

    # ----------------------------------------------------------------- agents
    async def _on_features(self, stream):
        await self._consume(stream, self.process_feature_records, self._report_lag,
                            bound=self.feature_record_bound)

    async def _on_labels(self, stream):
        await self._consume(stream, self.process_label_records)

    def feature_record_bound(self) -> int:
        """Records the next features micro-batch takes: ``batch_max_items``, more while malformed
        records are coming in (:func:`~service.streaming.take.record_target`)."""
        return record_target(self.settings.batch_max_items, self.refused.share)

    async def _consume(self, stream, process, after=None, bound=None) -> None:
        """Micro-batches of ``stream`` through ``process`` (retried until done,
        :meth:`_until_done`), each acknowledged only once processed.

        take_until_idle (as faust's take_events) acknowledges a buffer when the loop moves on AND
        when the agent is cancelled (a `finally` in the generator). So: an unprocessed buffer
        gets an extra reference before we park (its offsets are never committed: redelivered after a
        restart), and a buffer being processed is shielded from cancellation (its offsets are
        committed only once its selections, pairs and dead letters were published and the engine
        committed).
        """
        s = self.settings
        async for events in stream.take_until_idle(bound or s.batch_max_items,
                                                   within=s.max_wait_seconds,
                                                   idle=s.batch_idle_seconds):
            if self.draining.is_set():
                for e in events:
                    e.message.incref()
                await asyncio.Event().wait()  # parked until faust cancels the agent on stop
            work = asyncio.ensure_future(self._until_done(
                process, [KafkaRecord.from_message(e.message) for e in events]))
            self._in_flight.add(work)
            self.idle.clear()
            work.add_done_callback(self._work_done)
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                try:
                    await work  # finish publishing + committing before faust acks the buffer
                except GaveUp:
                    for e in events:
                        e.message.incref()  # undecided: never committed, redelivered
                raise
            except GaveUp:  # shutting down while the batch keeps failing
                for e in events:
                    e.message.incref()  # undecided: never committed, redelivered
                await asyncio.Event().wait()  # parked until faust cancels the agent on stop
            if after is not None:
                after(events)

    def _work_done(self, task: asyncio.Future) -> None:
        self._in_flight.discard(task)
        if not self._in_flight:
            self.idle.set()

    async def process_until_done(self, records: Sequence[KafkaRecord]) -> int:
        """:meth:`process_feature_records` until it completes (:meth:`_until_done`)."""
        return await self._until_done(self.process_feature_records, records)

    async def _until_done(self, process, records: Sequence[KafkaRecord]) -> int:
        """``process(records)``, again after any unexpected exception (with backoff) until it
        completes: faust acknowledges the buffer when the agent moves on or crashes, so no
        exception may leave the loop with records unprocessed. A retry is safe: decided events
        are answered as duplicates, labels taken in before as duplicates (a dead letter may be
        published twice). During a shutdown it gives up instead (:class:`GaveUp`): the caller
        keeps the batch's offsets uncommitted, so it is redelivered after the restart."""
        delay = 0.1
        while True:
            try:
                return await process(records)
            except Exception as exc:
                if self.draining.is_set():
                    log.error("processing a micro-batch of %d records failed during shutdown; "
                              "its offsets stay uncommitted (redelivered after the restart)",
                              len(records))
                    raise GaveUp(str(exc)) from exc
                log.exception("processing a micro-batch of %d records failed; retrying it in "
                              "%.1fs", len(records), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def process_feature_records(self, records: Sequence[KafkaRecord]) -> int:
        """Decode, dead-letter the bad, decide the good.

        Parameters
        ----------
        records : sequence of KafkaRecord
            One micro-batch as consumed.

        Returns
        -------
        int
            The number of events decided.
        """
        good, good_records, bad = [], [], []
        for rec in records:
            try:
                good.extend(codecs.decode_feature_record(rec.value, _headers(rec.headers),
                                                         self.dims,
                                                         self.settings.max_message_bytes))
                good_records.append(rec)
            except codecs.WireError as exc:
                bad.append((exc.reason, str(exc), rec))
        if records:
            self.refused.observe(len(bad), len(records))
        # The batch's dead letters go out all at once (one broker round trip, not one each) and
        # while its good events are decided, not before them: waiting for that acknowledgement
        # first put one produce round trip in series with every batch that held poison (1,125
        # small poison records among 18,000 events cost 8 % of the throughput that way). The
        # batch still completes only once every dead letter is acknowledged.
        dead = asyncio.ensure_future(self._dead_letters(bad)) if bad else None
        try:
            return await self._decide(good, good_records)
        finally:
            if dead is not None:
                await dead

    async def _decide(self, good: list[IncomingEvent], records: Sequence[KafkaRecord]) -> int:
        if not good:
            return 0
        # take_events bounds records, and one record may be a FeatureBatch: bound the events.
        step = self.settings.batch_max_items
        for lo in range(0, len(good), step):
            if not await self._submit(good[lo:lo + step], records):
                return 0
        self.batches += 1
        return len(good)

    async def _submit(self, good, records: Sequence[KafkaRecord]) -> bool:
        if self.metrics is not None:
            self.metrics.micro_batch(len(good))
        delay = 0.1
        while True:
            try:
                await self.handler.submit(good)
                return True
            except ValueError as exc:  # cannot happen after decoding; never lose the batch
                log.error("batch rejected by the engine, dead-lettering it: %s", exc)
                for rec in records:
                    await self._dead_letter("rejected", str(exc), rec)
                return False
            except Exception:
                log.exception("publishing selections failed; retrying in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _report_lag(self, events) -> None:
        """Consumer lag of the features topic: high watermark - next offset, summed over the
        partitions this batch touched (the high watermark comes from the last fetch)."""
        if self.metrics is None or not events:
            return
        last: dict = {}
        for e in events:
            last[e.message.tp] = max(last.get(e.message.tp, -1), e.message.offset)
        try:
            lag = sum(max(0, self.app.consumer.highwater(tp) - (off + 1))
                      for tp, off in last.items())
        except Exception:  # no fetch yet / consumer restarting: report nothing this time
            return
        self.metrics.consumer_lag(self.features.get_topic_name(), lag)

    async def _dead_letters(self, bad: Sequence[tuple[str, str, KafkaRecord]]) -> None:
        """Publish a batch's dead letters (reason, detail, record) together, in the given order:
        one broker round trip for the batch, not one per record."""
        await asyncio.gather(*(self._dead_letter(reason, detail, rec)
                               for reason, detail, rec in bad))

    async def _dead_letter(self, reason: str, detail: str, rec: KafkaRecord) -> None:
        """Publish one dead letter and wait for it; a failure is retried with backoff, so the
        batch it belongs to is never acknowledged without it. A dead letter is never larger than
        the producer accepts (an oversized original travels as its digest, size and source
        coordinates, :func:`codecs.dead_letter_bytes`)."""
        self.dead_letters += 1
        if self.metrics is not None:
            self.metrics.dead_lettered(reason)
        self._warnings.warn(reason, f"dead letter ({reason}) from {rec.topic}[{rec.partition}]"
                                    f"@{rec.offset}: {detail}")
        value = codecs.dead_letter_bytes(reason, detail, rec.value or b"", rec.topic,
                                         rec.partition, rec.offset, time.time(),
                                         max_bytes=self.settings.max_message_bytes)
        delay = 0.1
        while True:
            try:
                await self.publisher.send_raw(self.dead_letter_topic, value)
                return
            except Exception as exc:
                if type(exc).__name__ == "MessageSizeTooLargeError":  # a broker's smaller limit
                    value = codecs.dead_letter_bytes(reason, detail, rec.value or b"", rec.topic,
                                                     rec.partition, rec.offset, time.time(),
                                                     max_bytes=0)
                log.exception("publishing a dead letter failed; retrying in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def process_label_records(self, records: Sequence[KafkaRecord]) -> int:
        """Take one micro-batch of label records in: decode and check each, hand the good ones
        to the learning loop one by one in topic order, then dead-letter the bad and the
        unresolvable ones all at once (in topic order). A failure to publish a label's pair is
        retried until it succeeds (nothing was taken in before the publish).

        Returns
        -------
        int
            Records the learning loop took (resolved, ignored or duplicate).
        """
        labels, label_records, bad = [], [], []
        for rec in records:
            try:
                label = codecs.label_from_proto(
                    codecs.pb.AlignmentLabel.FromString(rec.value or b""), self.dims)
                self.handler.check_label(label)
            except codecs.WireError as exc:
                bad.append((exc.reason, str(exc), rec))
                continue
            except DecodeError as exc:
                bad.append(("undecodable", f"label: {exc}", rec))
                continue
            except ValueError as exc:  # the engine would refuse it (e.g. an unknown status)
                bad.append(("rejected", str(exc), rec))
                continue
            labels.append(label)
            label_records.append(rec)
        taken = 0
        for label, rec in zip(labels, label_records, strict=True):
            # one learning call per label, in topic order: the retrain cadence ("every N new
            # pairs") sees the pairs arrive as the annotators answered them
            delay = 0.1
            while True:
                try:
                    result = await self.handler.report_alignment([label])
                    break
                except ValueError as exc:  # checked above: cannot happen; never lose a label
                    result = None
                    bad.append(("rejected", str(exc), rec))
                    break
                except Exception:
                    log.exception("publishing the training pair of a label failed; retrying in "
                                  "%.1fs", delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
            if result is None:
                continue
            bad += [("label_unresolved", why, rec) for why in result.unresolved]
            taken += not result.unresolved
        if bad:  # all at once (one broker round trip for the batch's poison), in topic order
            at = {id(rec): i for i, rec in enumerate(records)}
            bad.sort(key=lambda b: at[id(b[2])])
            await self._dead_letters(bad)
        return taken

    async def process_label_record(self, rec: KafkaRecord) -> bool:
        """:meth:`process_label_records` of one record: True when the learning loop took it (a
        bad or unresolvable label is dead-lettered)."""
        return await self.process_label_records([rec]) == 1

    def owns_labels(self) -> bool:
        """Whether this worker's group member holds the labels partition now (it trains)."""
        try:
            assigned = self.app.consumer.assignment()
        except Exception:  # consumer not started / restarting: not the trainer right now
            return False
        return any(tp.topic == self.labels_topic for tp in assigned)

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self.app.finalize()
        await self.app.start()

    async def drain(self, timeout_s: float) -> None:
        """Stop taking new batches and wait for the one in flight to be published and committed."""
        self.draining.set()
        try:
            await asyncio.wait_for(self.idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("in-flight batch did not finish within %.1fs", timeout_s)

    async def stop(self) -> None:
        await self.app.stop()
        self._warnings.flush()


def _headers(headers) -> list[tuple[str, bytes]]:
    if not headers:
        return []
    if isinstance(headers, dict):
        return list(headers.items())
    return list(headers)
