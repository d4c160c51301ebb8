"""The budget ledger through the real (tansu) broker.

Two workers' ledgers reserving at the same time on one topic agree on every grant and never
grant more than the total; a worker started later replays the same grants; a ledger topic with
more than one partition is refused; and a service with a budget total reserves its accepts on the
ledger, so after a restart a spent budget stays spent.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import pytest

from service.core.budget_ledger import BudgetLedger, Grant
from service.messages import IncomingEvent
from service.runtime import start_service
from service.settings import Settings
from service.streaming.budget_reservations import KafkaBudgetLedger
from service.streaming.kafka_io import KafkaPublisher
from service.streaming.topics import (
    BUDGET_LEDGER_TOPIC,
    FEATURES_TOPIC,
    REQUESTS_TOPIC,
    create_topics,
)
from service.wire import codecs
from tests.support import read_all

pytestmark = pytest.mark.integration


async def _ledger(bootstrap, topic, total, worker_id):
    pub = KafkaPublisher(bootstrap, f"unused-{uuid.uuid4().hex[:6]}", idempotence="off")
    await pub.start()
    led = KafkaBudgetLedger(bootstrap, topic, total, pub, worker_id=worker_id)
    await led.start()
    await led.follower.wait_caught_up()
    return led, pub


async def _close(*pairs):
    for led, pub in pairs:
        await led.stop()
        await pub.stop()


def test_two_workers_reserving_at_once_agree_and_never_pass_the_total(kafka_topics):
    boot, topic = kafka_topics["bootstrap"], kafka_topics[BUDGET_LEDGER_TOPIC]
    total = 25

    async def body():
        a, b = await _ledger(boot, topic, total, "w-a"), await _ledger(boot, topic, total, "w-b")
        try:
            # 40 reservations each, at once; ids overlap between the workers (a redelivery to
            # the other worker) and within one worker (a retry)
            async def worker(led, name):
                out = []
                for k in range(40):
                    ids = [f"ev-{(k * 3 + j) % 70}" for j in range(3)] + [f"{name}-{k}"]
                    out.append((ids, await led.reserve(ids)))
                return out

            got = await asyncio.gather(worker(a[0], "a"), worker(b[0], "b"))
            granted = {eid for res in got for ids, ok in res
                       for eid, g in zip(ids, ok, strict=True) if g}
            assert len(granted) == total  # 80 reservations asked for far more
            # both workers applied the same records in the same order: the same state
            assert a[0].ledger.granted == b[0].ledger.granted == total
            assert all(a[0].ledger.holds(e) and b[0].ledger.holds(e) for e in granted)
            # the answers each worker got are what the topic, applied in its order, says
            recs = await asyncio.to_thread(read_all, boot, topic, a[0].reservations +
                                           b[0].reservations, parse=codecs.reservation_from_bytes)
            replay, by_id = BudgetLedger(total), {}
            for rid, holder, ids in recs:
                by_id[rid] = replay.apply(ids, holder)
            assert len(by_id) == a[0].reservations + b[0].reservations
            # once spent, answers are local: fewer records than reservations asked for
            assert a[0].reservations + b[0].reservations < 80
            # an id was refused only once the total was granted (no later record grants a new
            # one), so every answer is the replay's final word on its ids
            assert replay.granted == total
            for res in got:
                for ids, ok in res:
                    assert [bool(g) for g in ok] == [replay.holds(e) for e in ids]
            # a worker started later (a restart) replays the same grants
            c = await _ledger(boot, topic, total, "w-c")
            try:
                assert c[0].ledger.granted == total
                assert all(c[0].ledger.holds(e) for e in granted)
                assert await c[0].reserve(["brand-new", next(iter(granted))]) == [
                    Grant.DENIED, Grant.FOREIGN]  # held by a, or b: another process
            finally:
                await _close(c)
        finally:
            await _close(a, b)

    asyncio.run(asyncio.wait_for(body(), 120))


def test_a_ledger_topic_with_two_partitions_is_refused(tansu_broker):
    topic = f"{BUDGET_LEDGER_TOPIC}.{uuid.uuid4().hex[:8]}"
    create_topics(tansu_broker.bootstrap, {topic: 2})

    async def body():
        pub = KafkaPublisher(tansu_broker.bootstrap, "unused", idempotence="off")
        await pub.start()
        try:
            led = KafkaBudgetLedger(tansu_broker.bootstrap, topic, 5, pub, worker_id="w")
            with pytest.raises(RuntimeError, match="has 2 partitions; it needs exactly 1"):
                await led.start()
        finally:
            await pub.stop()

    asyncio.run(asyncio.wait_for(body(), 60))


def test_a_service_reserves_its_accepts_and_a_spent_budget_stays_spent_after_a_restart(
        kafka_topics):
    suffix = kafka_topics[FEATURES_TOPIC][len(FEATURES_TOPIC):]
    s = Settings.from_env({}, kafka_bootstrap=kafka_topics["bootstrap"], topic_suffix=suffix,
                          modalities="image:12,text:8", grpc_port=0, metrics_port=0,
                          grpc_host="127.0.0.1", metrics_host="127.0.0.1", embedding_dim=8,
                          warmup_accepts=0, target_rate=1.0, explore_fraction=0.0,
                          index_size=64, cache_capacity=64, budget_total=6,
                          group_id=f"g-{uuid.uuid4().hex[:6]}", worker_id="w-ledger",
                          max_wait_seconds=0.05, shutdown_grace_seconds=5.0)
    rng = np.random.default_rng(0)

    def events(lo, hi):
        return [IncomingEvent(f"e{i}", f"img-{i}", "image",
                              rng.normal(size=12).astype(np.float32), time.time())
                for i in range(lo, hi)]

    async def run_once(lo, hi):
        svc = await start_service(s)
        try:
            assert svc.handler.shared_budget is not None
            outs = await svc.handler.submit(events(lo, hi))
            assert svc.handler.status().remaining == 0
            return [o.event_id for o in outs if o.decision.accept]
        finally:
            await svc.shutdown()

    first = asyncio.run(run_once(0, 10))
    assert len(first) == 6
    # the restarted worker replays the ledger: spent, nothing more is requested; the local
    # budget (replayed from the requests topic) agrees
    assert asyncio.run(run_once(10, 20)) == []
    reqs = read_all(kafka_topics["bootstrap"], kafka_topics[REQUESTS_TOPIC], 7, timeout_s=5)
    assert len(reqs) == 6
    ledger = read_all(kafka_topics["bootstrap"], kafka_topics[BUDGET_LEDGER_TOPIC], 1,
                      timeout_s=10, parse=codecs.reservation_from_bytes)
    assert ledger and sorted(e for _, _, ids in ledger for e in ids) == sorted(first)
