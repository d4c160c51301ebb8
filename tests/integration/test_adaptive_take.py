"""Micro-batches that close when the inflow pauses (service/streaming/take.py), on tansu.

The assertions are on batch boundaries, not on timings: each scenario is built so that a
boundary exists only if the rule under test works (bursts 1.5 s apart with a 30 s time bound
can only be split by the idle rule; a steady trickle with a 0.3 s idle gap only by the bound).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from service.settings import Settings
from service.streaming.app import faust_app
from service.streaming.take import AdaptiveStream
from service.streaming.topics import create_topics

pytestmark = pytest.mark.integration


async def _batches(bootstrap: str, produce, *, max_, within: float, idle: float,
                   expect: int) -> list[list[int]]:
    """Run ``produce(send)`` against a fresh one-partition topic while a faust app built like
    the workers' takes micro-batches of it; returns the batches' values (ints)."""
    run = uuid.uuid4().hex[:6]
    topic = f"pairsieve.take-test.{run}"
    await asyncio.to_thread(create_topics, bootstrap, {topic: 1})
    settings = Settings.from_env({}, kafka_bootstrap=bootstrap, rebalance_timeout_seconds=2.0)
    app = faust_app(settings, bootstrap, group_id=f"take-test-{run}")
    assert app.conf.Stream is AdaptiveStream
    source = app.topic(topic, value_serializer="raw", key_serializer="raw", partitions=1)
    batches: list[list[int]] = []
    started, done = asyncio.Event(), asyncio.Event()

    async def take(stream):
        started.set()
        async for events in stream.take_until_idle(max_, within=within, idle=idle):
            batches.append([int(e.value) for e in events])
            if sum(map(len, batches)) >= expect:
                done.set()

    app.agent(source, name="take-test", concurrency=1)(take)
    app.finalize()
    await app.start()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await producer.start()
    try:
        await asyncio.wait_for(started.wait(), 60)
        await asyncio.sleep(3.0)  # the group is joined and the fetcher runs (tansu: ~2 s)

        async def send(values, flush=True):
            for v in values:
                await producer.send(topic, str(v).encode())
            if flush:
                await producer.flush()

        await produce(send)
        await asyncio.wait_for(done.wait(), 60)
    finally:
        await producer.stop()
        await app.stop()
    return batches


def test_a_pause_in_the_inflow_closes_the_batch(tansu_broker, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # faust writes "<group id>-data/" here

    async def bursts(send):
        await send(range(0, 7))
        await asyncio.sleep(1.5)  # >> idle, << within
        await send(range(7, 12))

    got = asyncio.run(_batches(tansu_broker.bootstrap, bursts, max_=100, within=30.0, idle=0.2,
                               expect=12))
    assert got == [list(range(0, 7)), list(range(7, 12))]


def test_a_batch_never_exceeds_its_size_bound(tansu_broker, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    async def one_burst(send):
        await send(range(25))

    got = asyncio.run(_batches(tansu_broker.bootstrap, one_burst, max_=10, within=30.0,
                               idle=0.5, expect=25))
    assert [v for b in got for v in b] == list(range(25))
    assert [len(b) for b in got] == [10, 10, 5]


def test_a_callable_bound_is_asked_before_each_batch(tansu_broker, tmp_path, monkeypatch):
    """The features agent grows its record bound while poison comes in: a bound asked anew
    once the caller is done with each batch, before the next record enters the buffer."""
    monkeypatch.chdir(tmp_path)
    bounds = iter([3, 5, 4, 100])

    async def one_burst(send):
        await send(range(12))

    got = asyncio.run(_batches(tansu_broker.bootstrap, one_burst, max_=lambda: next(bounds),
                               within=30.0, idle=20.0, expect=12))
    assert [v for b in got for v in b] == list(range(12))
    assert [len(b) for b in got] == [3, 5, 4]


def test_a_steady_trickle_is_cut_by_the_time_bound(tansu_broker, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    async def trickle(send):  # one record every 50 ms for 2.5 s: never a 0.3 s pause
        for v in range(50):
            await send([v])
            await asyncio.sleep(0.05)

    got = asyncio.run(_batches(tansu_broker.bootstrap, trickle, max_=1000, within=0.5,
                               idle=0.3, expect=50))
    assert [v for b in got for v in b] == list(range(50))
    assert len(got) >= 3  # ~2.5 s of inflow in batches of at most ~0.5 s
