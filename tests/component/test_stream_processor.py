"""StreamProcessor.process_feature_records in process, without a broker.

A real SelectionHandler and faust.App (constructing it does not connect); a fake publisher records
alignment requests and raw dead-letter sends; a fake metrics sink records the transport hooks.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib

import numpy as np
import pytest

import service.streaming.app as app_mod
from service.alignment import AlignmentTrainer
from service.core.budget import BudgetConfig
from service.core.selector import SelectorConfig, StreamingSelector
from service.handlers import SelectionHandler
from service.messages import IncomingEvent, Label, NullPublisher
from service.settings import Settings
from service.streaming.app import StreamProcessor
from service.streaming.records import KafkaRecord
from service.streaming.take import record_target
from service.wire import codecs
from service.wire.gen.pairsieve.v1 import pairsieve_pb2 as pb
from tests.support import DIMS
from tests.support import data_and_model as _data_and_model

MAX_BYTES = 4096
SRC = "pairsieve.features.v1.t"




class FakePublisher(NullPublisher):
    """publish_requests fails ``fail_times`` times, then records; send_raw records."""

    def __init__(self, fail_times: int = 0, pair_fail_times: int = 0):
        self.fail_times = fail_times
        self.pair_fail_times = pair_fail_times
        self.attempts = 0
        self.pair_attempts = 0
        self.published = []
        self.pairs = []
        self.publish_calls = 0
        self.raw = []

    async def publish_pairs(self, pairs):
        self.pair_attempts += 1
        if self.pair_attempts <= self.pair_fail_times:
            raise ConnectionError(f"pair not acknowledged (attempt {self.pair_attempts})")
        self.pairs.extend(pairs)

    async def publish_requests(self, requests):
        self.attempts += 1
        if self.attempts <= self.fail_times:
            raise ConnectionError(f"not acknowledged (attempt {self.attempts})")
        self.publish_calls += 1
        self.published.extend(requests)

    async def send_raw(self, topic, value, key=None):
        self.raw.append((topic, value, key))


class RecordingMetrics:
    def __init__(self):
        self.micro_batches = []
        self.dead = []

    def micro_batch(self, n):
        self.micro_batches.append(n)

    def dead_lettered(self, reason, modality="unknown"):
        self.dead.append(reason)


def _settings():
    return Settings.from_env({}, modalities="image:12,text:8", topic_suffix=".t",
                             max_message_bytes=MAX_BYTES, group_id="pairsieve-test",
                             batch_max_items=64)


def _handler(publisher):
    _, _, model = _data_and_model()
    cfg = SelectorConfig(index_size=128, cache_capacity=64,
                         budget=BudgetConfig(total=100, target_rate=0.5, min_history=8,
                                             window=64, explore=0.0, warmup_accepts=4))
    sel = StreamingSelector(copy.deepcopy(model), cfg, seed=0, device="cpu")
    return SelectionHandler(sel, AlignmentTrainer(DIMS, seed=0), publisher,
                            worker_id="w-stream", retrain_every=1000)


class Env:
    def __init__(self, fail_times=0, pair_fail_times=0):
        self.settings = _settings()
        self.publisher = FakePublisher(fail_times, pair_fail_times)
        self.metrics = RecordingMetrics()
        self.handler = _handler(self.publisher)
        self.proc = StreamProcessor(self.settings, "127.0.0.1:1", self.handler, self.publisher,
                                    self.metrics)

    def seen(self):
        return self.handler.status().seen

    def dead_letters(self):
        out = []
        for topic, value, _key in self.publisher.raw:
            assert topic == self.settings.topic("pairsieve.dead-letter.v1")
            out.append(pb.DeadLetter.FromString(value))
        return out


def run_env(body, **kw):
    """Build the processor inside a running loop, run ``body(env)``, close the handler."""
    async def main():
        env = Env(**kw)
        try:
            return await asyncio.wait_for(body(env), 30)
        finally:
            env.handler.close()
    return asyncio.run(main())


def _vec(i, modality):
    a, b, _ = _data_and_model()
    return (a[i] if modality == "image" else b[i]).copy()


def _ev(i, modality=None, event_id=None):
    modality = modality or ("image" if i % 2 == 0 else "text")
    return IncomingEvent(event_id=event_id or f"ev-{i}", item_id=f"{modality[0]}{i}",
                         modality=modality, vector=_vec(i, modality), source="test")


def _raw_event(**fields) -> bytes:
    base = dict(event_id="bad-1", item_id="i-bad", modality="image",
                vector=codecs.encode_vector(np.zeros(12, np.float32)), dim=12)
    base.update(fields)
    return pb.FeatureEvent(**base).SerializeToString()


BATCH = [codecs.FEATURE_HEADER_BATCH]
EVENT = [codecs.FEATURE_HEADER_EVENT]

BAD_RECORDS = {
    "undecodable": (b"\xff\xff\xff\xff", None),
    "wrong_dimension": (_raw_event(vector=codecs.encode_vector(np.zeros(5, np.float32)), dim=5),
                        EVENT),
    "non_finite": (_raw_event(vector=codecs.encode_vector(np.full(12, np.nan, np.float32))),
                   EVENT),
    "unknown_modality": (_raw_event(modality="audio"), EVENT),
    "missing_field": (_raw_event(event_id=""), EVENT),
    "oversized": (b"\x00" * (MAX_BYTES + 1), EVENT),
    "empty_batch": (b"", BATCH),
    "zero_vector": (_raw_event(), EVENT),  # all 12 values 0: no direction
    "out_of_range": (_raw_event(item_id="x" * 300,
                                vector=codecs.encode_vector(np.ones(12, np.float32))), EVENT),
}


# --------------------------------------------------------------------------- good records
def test_batch_with_header_and_single_event_without_header_are_decided():
    async def body(env):
        batch = codecs.encode_feature_batch([_ev(i) for i in range(10)])
        single = codecs.encode_feature_event(_ev(10))
        header_dict = codecs.encode_feature_event(_ev(11))
        n = await env.proc.process_feature_records([
            KafkaRecord(batch, BATCH, SRC, 0, 5),
            KafkaRecord(single, None, SRC, 1, 7),
            KafkaRecord(header_dict, dict([codecs.FEATURE_HEADER_EVENT]), SRC, 1, 8),
        ])
        assert n == 12
        assert env.seen() == 12
        st = env.handler.status().seen_per_modality
        assert st == {"image": 6, "text": 6}
        assert env.proc.batches == 1 and env.proc.dead_letters == 0
        assert env.publisher.raw == []
        assert env.metrics.micro_batches == [12] and env.metrics.dead == []
        # accepted ones were published once
        ids = [r.request_id for r in env.publisher.published]
        assert ids and len(ids) == len(set(ids)) == env.handler.status().spent

        # a FeatureBatch without the header is recognised too; a redelivery is deduplicated
        again = codecs.encode_feature_batch([_ev(i) for i in range(10)] + [_ev(12)])
        n2 = await env.proc.process_feature_records([KafkaRecord(again, [], SRC, 0, 6)])
        assert n2 == 11
        assert env.seen() == 13  # only ev-12 was new
        assert len(env.publisher.published) == len(ids) + int(
            any(r.request_id == "ev-12" for r in env.publisher.published))
        assert env.metrics.micro_batches == [12, 11]

    run_env(body)


# --------------------------------------------------------------------------- dead letters
@pytest.mark.parametrize("reason", list(BAD_RECORDS))
def test_each_bad_record_kind_is_dead_lettered_with_its_reason(reason):
    value, headers = BAD_RECORDS[reason]

    async def body(env):
        good1 = codecs.encode_feature_batch([_ev(i) for i in range(6)])
        good2 = codecs.encode_feature_event(_ev(6))
        n = await env.proc.process_feature_records([
            KafkaRecord(good1, BATCH, SRC, 2, 100),
            KafkaRecord(value, headers, SRC, 3, 41),
            KafkaRecord(good2, EVENT, SRC, 2, 101),
        ])
        assert n == 7 and env.seen() == 7  # the good records of the micro-batch were decided
        dls = env.dead_letters()
        assert len(dls) == 1
        dl = dls[0]
        assert dl.reason == reason
        # an oversized original would make its dead letter unpublishable: digest and size instead
        assert dl.original == (b"" if reason == "oversized" else value)
        assert dl.original_omitted == (reason == "oversized")
        assert (dl.original_sha256, dl.original_size) == (hashlib.sha256(value).hexdigest(),
                                                         len(value))
        assert (dl.source_topic, dl.source_partition, dl.source_offset) == (SRC, 3, 41)
        assert dl.detail
        assert dl.HasField("failed_at") and dl.failed_at.seconds > 0
        assert env.metrics.dead == [reason]
        assert env.metrics.micro_batches == [7]
        assert env.proc.dead_letters == 1 and env.proc.batches == 1

    run_env(body)


def test_all_bad_kinds_in_one_micro_batch_and_a_bad_event_inside_a_batch():
    async def body(env):
        records = [KafkaRecord(codecs.encode_feature_event(_ev(0)), None, SRC, 0, 0)]
        for off, (value, headers) in enumerate(BAD_RECORDS.values(), start=1):
            records.append(KafkaRecord(value, headers, SRC, 0, off))
        mixed = pb.FeatureBatch(events=[codecs.event_to_proto(_ev(20)),
                                        pb.FeatureEvent.FromString(_raw_event(modality="audio")),
                                        codecs.event_to_proto(_ev(21))]).SerializeToString()
        records.append(KafkaRecord(mixed, BATCH, SRC, 0, 50))
        records.append(KafkaRecord(codecs.encode_feature_batch([_ev(1), _ev(2)]), BATCH, SRC, 0,
                                   51))
        n = await env.proc.process_feature_records(records)
        assert n == 3 and env.seen() == 3  # ev-0, ev-1, ev-2; the mixed batch is all-or-nothing
        dls = env.dead_letters()
        assert [d.reason for d in dls] == list(BAD_RECORDS) + ["unknown_modality"]
        assert [d.source_offset for d in dls] == list(range(1, len(BAD_RECORDS) + 1)) + [50]
        assert [d.original for d in dls] == [b"" if k == "oversized" else v for k, (v, _)
                                             in BAD_RECORDS.items()] + [mixed]
        assert "batch event 1 of 3" in dls[-1].detail
        assert env.metrics.dead == list(BAD_RECORDS) + ["unknown_modality"]
        assert env.metrics.micro_batches == [3]

    run_env(body)


def test_dead_letters_go_out_while_the_batch_is_decided_and_the_batch_waits_for_them():
    async def body(env):
        release = asyncio.Event()
        sent = env.publisher.send_raw

        async def slow_send_raw(topic, value, key=None):
            await release.wait()  # the broker has not acknowledged the dead letter yet
            await sent(topic, value, key)

        env.publisher.send_raw = slow_send_raw
        records = [KafkaRecord(b"\xff\xff", None, SRC, 0, 0),
                   KafkaRecord(codecs.encode_feature_batch([_ev(i) for i in range(6)]), BATCH,
                               SRC, 0, 1),
                   KafkaRecord(b"", BATCH, SRC, 0, 2)]
        task = asyncio.ensure_future(env.proc.process_feature_records(records))
        for _ in range(200):  # the events are decided without waiting for the dead letters
            if env.seen() == 6:
                break
            await asyncio.sleep(0.01)
        assert env.seen() == 6 and env.dead_letters() == []
        await asyncio.sleep(0.05)
        assert not task.done()  # ... but the batch is not complete (acknowledged) before them
        release.set()
        assert await task == 6
        assert [(d.reason, d.source_offset) for d in env.dead_letters()] == \
            [("undecodable", 0), ("empty_batch", 2)]

    run_env(body)


def test_the_record_bound_grows_while_poison_comes_in_and_shrinks_after():
    """Malformed records take slots of the take buffer: the features agent's bound grows with
    the refused share so the valid part of a batch stays near batch_max_items."""
    async def body(env):
        plain = env.proc.settings.batch_max_items
        assert env.proc.feature_record_bound() == plain
        offset = 0
        for _ in range(12):  # every 5th record malformed: 20 % refused
            recs = []
            for j in range(10):
                offset += 1
                value = (b"\xff\xff" if j % 5 == 0 else
                         codecs.encode_feature_event(_ev(offset % 40, event_id=f"p{offset}")))
                recs.append(KafkaRecord(value, None, SRC, 0, offset))
            await env.proc.process_feature_records(recs)
        poisoned = env.proc.feature_record_bound()
        assert env.proc.refused.share == pytest.approx(0.2, abs=0.02)
        assert plain < poisoned <= 2 * plain
        assert poisoned == record_target(plain, env.proc.refused.share)
        for _ in range(40):  # clean again
            offset += 1
            await env.proc.process_feature_records([KafkaRecord(
                codecs.encode_feature_event(_ev(offset % 40, event_id=f"c{offset}")),
                None, SRC, 0, offset)])
        assert env.proc.feature_record_bound() == plain

    run_env(body)


def test_micro_batch_of_only_bad_records_decides_nothing():
    async def body(env):
        n = await env.proc.process_feature_records([
            KafkaRecord(b"\xff\xff", None, SRC, 0, 1),
            KafkaRecord(b"", BATCH, SRC, 0, 2),
            KafkaRecord(b"x", [(codecs.FEATURE_HEADER, b"Nonsense")], SRC, 0, 3),
        ])
        assert n == 0 and env.seen() == 0 and env.proc.batches == 0
        assert env.publisher.attempts == 0
        assert [d.reason for d in env.dead_letters()] == ["undecodable", "empty_batch",
                                                          "undecodable"]
        # the micro-batch histogram records the batches submitted to the engine: none here
        assert env.metrics.micro_batches == []

    run_env(body)


# --------------------------------------------------------------------------- publish retry
class _AsyncioProxy:
    """Stands in for the ``asyncio`` module inside service.streaming.app: records sleeps."""

    def __init__(self):
        self.sleeps = []

    async def sleep(self, delay):
        self.sleeps.append(delay)

    def __getattr__(self, name):
        return getattr(asyncio, name)


def test_publish_failures_are_retried_and_the_batch_decided_once(monkeypatch):
    proxy = _AsyncioProxy()
    monkeypatch.setattr(app_mod, "asyncio", proxy)

    async def body(env):
        evs = [_ev(i) for i in range(12)]
        n = await env.proc.process_feature_records([
            KafkaRecord(codecs.encode_feature_batch(evs), BATCH, SRC, 0, 9)])
        assert n == 12
        assert env.publisher.attempts == 3 and env.publisher.publish_calls == 1
        assert proxy.sleeps == [0.1, 0.2]  # exponential backoff
        st = env.handler.status()
        assert st.seen == 12
        ids = [r.request_id for r in env.publisher.published]
        assert ids and len(ids) == len(set(ids)) == st.spent
        assert env.proc.batches == 1 and env.publisher.raw == []
        assert env.metrics.micro_batches == [12]
        # the redelivered batch (offsets were not committed before the publish) is a duplicate
        n2 = await env.proc.process_feature_records([
            KafkaRecord(codecs.encode_feature_batch(evs), BATCH, SRC, 0, 9)])
        assert n2 == 12 and env.handler.status().seen == 12
        assert env.publisher.publish_calls == 1

    run_env(body, fail_times=2)


# --------------------------------------------------------------------------- engine rejection
def _reject(monkeypatch, env):
    async def submit(events):
        raise ValueError("engine rejects this batch")
    monkeypatch.setattr(env.handler, "submit", submit)


def test_engine_rejection_dead_letters_the_micro_batch_instead_of_looping(monkeypatch):
    """Today's fallback: a batch the engine rejects (ValueError) is not retried forever; its
    records go to the dead-letter topic with the original bytes and nothing is decided."""
    async def body(env):
        _reject(monkeypatch, env)
        good = [codecs.encode_feature_event(_ev(0)), codecs.encode_feature_batch([_ev(1)])]
        n = await env.proc.process_feature_records([
            KafkaRecord(good[0], EVENT, SRC, 0, 2), KafkaRecord(good[1], BATCH, SRC, 0, 3)])
        assert n == 0 and env.proc.batches == 0
        dls = env.dead_letters()
        assert [(d.source_offset, d.original) for d in dls] == [(2, good[0]), (3, good[1])]
        assert all("engine rejects" in d.detail for d in dls)
        assert env.metrics.micro_batches == [2] and len(env.metrics.dead) == 2

    run_env(body)


def test_engine_rejection_does_not_dead_letter_a_record_twice(monkeypatch):
    async def body(env):
        _reject(monkeypatch, env)
        bad, headers = BAD_RECORDS["wrong_dimension"]
        await env.proc.process_feature_records([
            KafkaRecord(bad, headers, SRC, 0, 1),
            KafkaRecord(codecs.encode_feature_event(_ev(0)), EVENT, SRC, 0, 2),
        ])
        got = [(d.source_offset, d.reason) for d in env.dead_letters()]
        assert [o for o, _ in got].count(1) == 1, got
        assert len(env.metrics.dead) == 2, env.metrics.dead

    run_env(body)


def test_one_overflowing_record_does_not_dead_letter_all_later_micro_batches():
    async def body(env):
        big = IncomingEvent("ev-huge", "i-huge", "image", np.full(12, 3e38, np.float32))
        await env.proc.process_feature_records([
            KafkaRecord(codecs.encode_feature_event(big), EVENT, SRC, 0, 0),
            KafkaRecord(codecs.encode_feature_event(_ev(1)), EVENT, SRC, 0, 1)])
        decided = 0
        for k, lo in enumerate(range(10, 60, 10)):
            decided += await env.proc.process_feature_records([
                KafkaRecord(codecs.encode_feature_batch([_ev(i) for i in range(lo, lo + 10)]),
                            BATCH, SRC, 0, 2 + k)])
        assert decided == 50, [d.reason for d in env.dead_letters()]
        assert "invalid" not in [d.reason for d in env.dead_letters()]

    run_env(body)


# --------------------------------------------------------------------------- labels
LABELS_SRC = "pairsieve.alignment-labels.v1.t"


def _label_record(label: Label, offset: int = 0) -> KafkaRecord:
    return KafkaRecord(codecs.label_to_proto(label).SerializeToString(), None, LABELS_SRC, 0,
                       offset)


def test_labels_become_published_pairs_and_bad_ones_are_dead_lettered_with_a_reason(monkeypatch):
    proxy = _AsyncioProxy()
    monkeypatch.setattr(app_mod, "asyncio", proxy)

    async def body(env):
        outs = await env.handler.submit([_ev(i) for i in range(6)])
        img = next(o.decision for o in outs if o.decision.accept and o.decision.modality == "image")
        i = int(img.item_id[1:])
        good = Label(img.item_id, "image", f"t-partner-{i}", "MATCH", request_id=img.item_id,
                     partner_vector=_vec(i, "text"))
        # the pair's publish fails twice: retried, the label is taken once
        assert await env.proc.process_label_record(_label_record(good, 1)) is True
        assert env.publisher.pair_attempts == 3 and proxy.sleeps == [0.1, 0.2]
        assert [p.key for p in env.publisher.pairs] == [(img.item_id, f"t-partner-{i}")]
        assert env.handler.status().pairs_acquired == 1
        # the same label redelivered: a duplicate, nothing published again
        assert await env.proc.process_label_record(_label_record(good, 1)) is True
        assert len(env.publisher.pairs) == 1 and env.handler.status().labels["MATCH"] == 1
        unknown = Label("i-unknown", "image", "t1", "MATCH", request_id="r-x")
        assert await env.proc.process_label_record(_label_record(unknown, 2)) is False
        bad_bytes = KafkaRecord(b"\xff\xff\xff", None, LABELS_SRC, 0, 3)
        assert await env.proc.process_label_record(bad_bytes) is False
        no_status = KafkaRecord(pb.AlignmentLabel(item_id="i0", modality="image")
                                .SerializeToString(), None, LABELS_SRC, 0, 4)
        assert await env.proc.process_label_record(no_status) is False
        dls = env.dead_letters()
        assert [d.reason for d in dls] == ["label_unresolved", "undecodable", "missing_field"]
        assert [d.source_offset for d in dls] == [2, 3, 4]
        assert all(d.source_topic == LABELS_SRC for d in dls)
        assert "'i-unknown' (image): the item's vector is unknown" in dls[0].detail
        assert dls[1].original == b"\xff\xff\xff"
        assert env.metrics.dead == ["label_unresolved", "undecodable", "missing_field"]

    run_env(body, pair_fail_times=2)


def test_a_micro_batch_of_labels_is_one_learning_call_and_each_bad_record_keeps_its_offset():
    """Labels are micro-batched: the MATCHes are taken in topic order (one learning call each,
    so the retrain cadence counts them as they arrive), and the dead letters (undecodable,
    refused, unresolvable) are published together, in topic order, each naming its record."""

    async def body(env):
        outs = await env.handler.submit([_ev(i) for i in range(8)])
        imgs = [o.decision for o in outs if o.decision.accept and o.decision.modality == "image"]
        assert len(imgs) >= 2
        good = [Label(d.item_id, "image", f"t-partner-{k}", "MATCH", request_id=d.item_id,
                      partner_vector=_vec(int(d.item_id[1:]), "text"))
                for k, d in enumerate(imgs[:2])]
        records = [
            _label_record(good[0], 10),
            KafkaRecord(b"\xff\xff", None, LABELS_SRC, 0, 11),
            _label_record(Label("i-unknown", "image", "t1", "MATCH", request_id="r-u"), 12),
            _label_record(Label(imgs[0].item_id, "image", "t1", "MATCH", request_id="r-c",
                                cost=float("inf")), 13),
            _label_record(good[1], 14),
            _label_record(Label("i-nope", "image", "t2", "NO_MATCH", request_id="r-n"), 15),
        ]
        taken = await env.proc.process_label_records(records)
        assert taken == 3  # two MATCHes and the NO_MATCH
        assert [p.key[0] for p in env.publisher.pairs] == [good[0].item_id, good[1].item_id]
        dls = env.dead_letters()  # published in topic order
        assert [(d.source_offset, d.reason) for d in dls] == [
            (11, "undecodable"), (12, "label_unresolved"), (13, "non_finite")]
        assert "'i-unknown'" in dls[1].detail
        assert env.handler.status().pairs_acquired == 2
        labels = env.handler.status().labels  # received: the unresolved MATCH included
        assert (labels["MATCH"], labels["NO_MATCH"]) == (3, 1)
        # the batch redelivered whole: duplicates, nothing published again
        assert await env.proc.process_label_records(records) == 3
        assert len(env.publisher.pairs) == 2

    run_env(body)


# --------------------------------------------------------------------------- oversized, failures
class MessageSizeTooLargeError(Exception):
    """Named as kafka-python/aiokafka's: a broker limit smaller than the producer's."""


def test_an_oversized_record_is_dead_lettered_as_its_digest_and_the_batch_is_decided():
    """Issue 15, item 1: two records over PAIRSIEVE_MAX_MESSAGE_BYTES in a micro-batch of valid
    events. Their dead letters carry digest, size and coordinates instead of the bytes (a dead
    letter as large as the record could not be published), and every valid event is decided."""
    async def body(env):
        huge = b"\x0a" + b"x" * (MAX_BYTES + 5000)
        recs = [KafkaRecord(huge, EVENT, SRC, 0, 0)]
        recs += [KafkaRecord(codecs.encode_feature_event(_ev(i)), EVENT, SRC, 0, 1 + i)
                 for i in range(30)]
        recs.append(KafkaRecord(huge + b"y", EVENT, SRC, 0, 31))
        assert await env.proc.process_feature_records(recs) == 30
        assert env.seen() == 30
        dls = env.dead_letters()
        assert [(d.reason, d.source_offset) for d in dls] == [("oversized", 0), ("oversized", 31)]
        for d, raw in zip(dls, (huge, huge + b"y"), strict=True):
            assert d.original_omitted and d.original == b""
            assert (d.original_size, d.original_sha256) == (len(raw),
                                                           hashlib.sha256(raw).hexdigest())
        assert all(len(v) <= MAX_BYTES for _, v, _ in env.publisher.raw)
        # a small bad record keeps its bytes, and its digest
        await env.proc.process_feature_records([KafkaRecord(b"\xff\xff", None, SRC, 0, 40)])
        last = env.dead_letters()[-1]
        assert last.original == b"\xff\xff" and not last.original_omitted
        assert last.original_sha256 == hashlib.sha256(b"\xff\xff").hexdigest()

    run_env(body)


def test_a_dead_letter_that_fails_to_publish_is_retried_and_then_shrunk(monkeypatch):
    proxy = _AsyncioProxy()
    monkeypatch.setattr(app_mod, "asyncio", proxy)

    async def body(env):
        sent = env.publisher.send_raw
        attempts = []

        async def flaky(topic, value, key=None):
            attempts.append(len(value))
            if len(attempts) == 1:
                raise ConnectionError("broker unreachable")
            if len(attempts) == 2:
                raise MessageSizeTooLargeError("the broker's limit is smaller")
            await sent(topic, value, key)
        env.publisher.send_raw = flaky
        bad = KafkaRecord(b"\xff" * 3000, None, SRC, 0, 7)
        assert await env.proc.process_feature_records(
            [bad, KafkaRecord(codecs.encode_feature_event(_ev(1)), EVENT, SRC, 0, 8)]) == 1
        assert proxy.sleeps == [0.1, 0.2] and len(attempts) == 3
        assert attempts[2] < 3000 < attempts[0]  # the third try went without the original
        (d,) = env.dead_letters()
        assert d.original_omitted and d.original_size == 3000 and d.source_offset == 7

    run_env(body)


def test_an_unexpected_failure_retries_the_micro_batch_instead_of_acknowledging_it(monkeypatch):
    proxy = _AsyncioProxy()
    monkeypatch.setattr(app_mod, "asyncio", proxy)

    async def body(env):
        real = env.proc.process_feature_records
        calls = []

        async def once_broken(records):
            calls.append(len(records))
            if len(calls) == 1:
                raise RuntimeError("a bug in the per-batch path")
            return await real(records)
        env.proc.process_feature_records = once_broken
        recs = [KafkaRecord(codecs.encode_feature_event(_ev(i)), EVENT, SRC, 0, i)
                for i in range(8)]
        assert await env.proc.process_until_done(recs) == 8
        assert calls == [8, 8] and proxy.sleeps == [0.1] and env.seen() == 8
        # at shutdown a failing batch is given up (the caller keeps its offsets uncommitted)
        calls.clear()
        env.proc.draining.set()
        with pytest.raises(app_mod.GaveUp):
            await env.proc.process_until_done(recs)
        assert calls == [8]

    run_env(body)


# ----------------------------------------------------------------------------- KafkaPublisher
class _FakeProducer:
    """aiokafka's send(): returns a future per record; ``outcomes`` says how each ends (True:
    acknowledged, an exception: failed; "raise": send() itself raises)."""

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)

    async def send(self, topic, value, key=None):
        outcome = self.outcomes.pop(0)
        if outcome == "raise":
            raise ConnectionError("producer closed")
        fut = asyncio.get_running_loop().create_future()
        if outcome is True:
            fut.set_result(None)
        else:
            fut.set_exception(outcome)
        return fut


@pytest.mark.parametrize("outcomes, acked", [
    ([True, TimeoutError("no ack"), True], (0, 2)),
    ([True, True, "raise"], (0, 1)),
    ([TimeoutError("no ack")] * 3, ()),
])
def test_a_publish_that_fails_names_the_records_the_broker_acknowledged(outcomes, acked):
    from service.messages import PartialPublish
    from service.streaming.kafka_io import KafkaPublisher

    async def scenario():
        pub = KafkaPublisher("127.0.0.1:9", "t")
        pub._producer = _FakeProducer(outcomes)
        with pytest.raises(PartialPublish) as err:
            await pub._send_all("t", [(b"k", b"v")] * 3)
        return err.value

    err = asyncio.run(scenario())
    assert err.acked == acked and err.cause is not None


def test_a_publish_that_succeeds_raises_nothing():
    from service.streaming.kafka_io import KafkaPublisher

    async def scenario():
        pub = KafkaPublisher("127.0.0.1:9", "t")
        pub._producer = _FakeProducer([True, True])
        await pub._send_all("t", [(b"k", b"v")] * 2)

    asyncio.run(scenario())


class _IdempotenceProbe:
    """Stands in for AIOKafkaProducer: ``start`` fails like a broker that refuses a producer id
    when asked for idempotence and ``refuse`` is set."""

    made: list = []

    def __init__(self, refuse, *, enable_idempotence, **kw):
        self.idempotent, self.refuse, self.started, self.stopped = \
            enable_idempotence, refuse, False, False
        _IdempotenceProbe.made.append(self)

    async def start(self):
        from aiokafka.errors import UnknownError

        if self.idempotent and self.refuse:
            raise UnknownError()
        self.started = True

    async def stop(self):
        self.stopped = True


@pytest.mark.parametrize("mode, refuse, granted, producers", [
    ("auto", False, True, [True]),          # a Kafka that grants it: one idempotent producer
    ("auto", True, False, [True, False]),   # refused: stopped, a plain one instead
    ("off", False, False, [False]),         # never asked
    ("on", False, True, [True]),
])
def test_the_publisher_is_idempotent_where_the_broker_grants_it(monkeypatch, mode, refuse,
                                                                granted, producers):
    import service.streaming.kafka_io as kafka_io

    _IdempotenceProbe.made = []
    monkeypatch.setattr(kafka_io, "AIOKafkaProducer",
                        lambda **kw: _IdempotenceProbe(refuse, **kw))

    async def scenario():
        pub = kafka_io.KafkaPublisher("127.0.0.1:9", "t", idempotence=mode)
        await pub.start()
        return pub.idempotent

    assert asyncio.run(scenario()) is granted
    assert [p.idempotent for p in _IdempotenceProbe.made] == producers
    assert _IdempotenceProbe.made[-1].started
    assert all(p.stopped for p in _IdempotenceProbe.made[:-1])


def test_an_unknown_idempotence_mode_is_refused_by_value():
    from service.streaming.kafka_io import KafkaPublisher

    with pytest.raises(ValueError, match="got 'maybe'"):
        KafkaPublisher("127.0.0.1:9", "t", idempotence="maybe")


def test_the_features_consumer_fetches_as_many_bytes_per_partition_as_configured():
    s = Settings.from_env({}, modalities="image:12,text:8", topic_suffix=".t",
                          fetch_max_partition_bytes=3 << 20)
    proc = StreamProcessor(s, "127.0.0.1:9", handler=None, publisher=None)
    assert proc.app.conf.consumer_max_fetch_size == 3 << 20
    assert Settings.from_env({}, modalities="image:12,text:8").fetch_max_partition_bytes == 4 << 20
