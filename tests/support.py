"""Shared test data (a small two-modality dataset and an alignment model trained on it), the
plain Kafka client helpers of the integration tests, and a budget ledger without Kafka."""

from __future__ import annotations

import functools
import time

import numpy as np

from service.alignment import AlignmentTrainer
from service.core.budget_ledger import BudgetLedger

DIMS = {"image": 12, "text": 8}


@functools.lru_cache(maxsize=1)
def data_and_model():
    """(a (400, 12), b (400, 8), model fit on the first 60 pairs): b and a share a 6-d latent."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 6))
    a = (z @ rng.normal(size=(6, 12)) + 0.1 * rng.normal(size=(400, 12))).astype(np.float32)
    b = (z @ rng.normal(size=(6, 8)) + 0.1 * rng.normal(size=(400, 8))).astype(np.float32)
    tr = AlignmentTrainer(DIMS, seed=0)
    tr.fit_unpaired({"image": a, "text": b})
    return a, b, tr.fit(a[:60], b[:60])


def scalar_decide_run(draft, utilities, blocked=None, tail=None):
    """Reference for BudgetDraft.decide_run: decide()/skip() one item at a time."""
    thr, why = [], []
    for i, u in enumerate(utilities):
        d = (draft.skip(float(u), "skip:quota") if blocked is not None and blocked[i]
             else draft.decide(float(u), tail))
        thr.append(d.threshold)
        why.append(d.reason)
        if d.accept:
            return i + 1, True, np.array(thr), why
    return len(utilities), False, np.array(thr), why


def produce(bootstrap, topic, values, headers=None, **client):
    """Produce ``values`` to ``topic`` with a plain kafka-python producer (acks=all; key = the
    index, so records spread over the partitions). ``client``: more producer arguments (e.g.
    ``KafkaSecurity.kafka_python()``)."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", **client)
    for i, v in enumerate(values):
        p.send(topic, v, key=str(i).encode(), headers=headers)
    p.flush()
    p.close()


def read_all(bootstrap, topic, expect, timeout_s=30.0, parse=None, many=False, **client):
    """Read ``topic`` from the start with a plain kafka-python consumer (no group) until
    ``expect`` items or ``timeout_s``: one per record, or with ``many`` the items of the list
    ``parse`` returns per record. ``client``: more consumer arguments."""
    from kafka import KafkaConsumer

    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                      group_id=None, consumer_timeout_ms=1000, **client)
    out, deadline = [], time.time() + timeout_s
    while time.time() < deadline and len(out) < expect:
        for rec in c:
            if many:
                out.extend(parse(rec.value))
            else:
                out.append(parse(rec.value) if parse else rec.value)
    c.close()
    return out


def decision_protos(value: bytes) -> list:
    """The ``Decision`` messages of one decision-log record, in order (a batch record or the
    older one-decision form)."""
    from service.wire import codecs

    return codecs.decisions_of(codecs.pb.DecisionRecord.FromString(value))


class SharedLedger:
    """The budget ledger without Kafka: reservations applied in call order (the topic's order),
    all by one holder; :meth:`view` gives another worker process its own holder name."""

    def __init__(self, total, holder="w", ledger=None):
        self.ledger = BudgetLedger(total) if ledger is None else ledger
        self.holder = holder
        self.calls = []

    def view(self, holder):
        return SharedLedger(self.ledger.total, holder, self.ledger)

    async def reserve(self, event_ids):
        self.calls.append(list(event_ids))
        return self.ledger.apply(event_ids, self.holder)

    def units_left(self):
        return self.ledger.left
