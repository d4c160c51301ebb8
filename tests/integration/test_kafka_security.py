"""pairsieve on a Kafka that requires TLS and a SASL login.

The broker: tansu behind :class:`tests.secure_front.SecureFront` (real TLS, real PLAIN and SCRAM
checks; why tansu cannot do it alone is in that module and in the README). Every client the
service opens (the admin client, the faust stream processor, the publisher, the four topic
followers) must log in; a wrong password, an untrusted CA or a plaintext client fail the start
at once, by name, before anything is written. The last test runs against tansu's own
``--authentication`` listener.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid

import numpy as np
import pytest

from service.messages import IncomingEvent
from service.runtime import start_service
from service.settings import Settings, SettingsError
from service.streaming.broker import _broker_bin, _free_port
from service.streaming.security import KafkaAccessError
from service.streaming.topics import FEATURES_TOPIC, REQUESTS_TOPIC
from service.wire import codecs
from tests.secure_front import SecureFront
from tests.support import produce, read_all

pytestmark = pytest.mark.integration

USERS = {"pairsieve": "c0rrect-h0rse", "other": "battery-staple"}


@pytest.fixture(scope="module")
def front():
    with SecureFront(USERS) as f:
        yield f


def _settings(front, **kw) -> Settings:
    base = dict(kafka_bootstrap=front.bootstrap, kafka_security_protocol="SASL_SSL",
                kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="pairsieve",
                kafka_sasl_password=USERS["pairsieve"], kafka_ssl_cafile=front.cafile,
                topic_suffix=f".sec-{uuid.uuid4().hex[:8]}", modalities="image:12,text:8",
                grpc_port=0, metrics_port=0, grpc_host="127.0.0.1", metrics_host="127.0.0.1",
                embedding_dim=8, warmup_accepts=0, target_rate=1.0, explore_fraction=0.0,
                group_id=f"g-{uuid.uuid4().hex[:6]}", worker_id="w-sec", max_wait_seconds=0.05,
                shutdown_grace_seconds=5.0, rebalance_timeout_seconds=2.0)
    base.update(kw)
    return Settings.from_env({}, **base)


def _events(n):
    rng = np.random.default_rng(1)
    dims = {"image": 12, "text": 8}
    return [IncomingEvent(f"s{i}", f"s-item{i}", m, rng.normal(size=dims[m]).astype(np.float32),
                          time.time())
            for i, m in enumerate(["image", "text"] * (n // 2))]


def test_service_works_end_to_end_over_sasl_ssl_scram(front):
    s = _settings(front)
    client = s.kafka_security().kafka_python()
    evs = _events(20)
    before = front.logins_ok

    async def scenario():
        svc = await start_service(s)
        try:
            await asyncio.to_thread(produce, front.bootstrap, s.topic(FEATURES_TOPIC),
                                    [codecs.encode_feature_event(e) for e in evs], None, **client)
            deadline = time.time() + 60
            while svc.handler.status().seen < 20 and time.time() < deadline:
                await asyncio.sleep(0.1)
            return svc.handler.status()
        finally:
            await svc.shutdown()

    status = asyncio.run(scenario())
    assert status.seen == 20 and status.spent == 20
    reqs = read_all(front.bootstrap, s.topic(REQUESTS_TOPIC), 20,
                    parse=codecs.pb.AlignmentRequest.FromString, **client)
    assert sorted(r.request_id for r in reqs) == sorted(e.event_id for e in evs)
    # every client of the service logged in with SCRAM-SHA-512 over TLS; none tried without
    assert front.logins_ok > before and front.refused_unauthenticated == 0
    assert "SCRAM-SHA-512" in front.mechanisms_used
    assert {"pairsieve-admin", "pairsieve-publisher", "pairsieve-stream",
            "pairsieve-follower-selections", "pairsieve-follower-training-pairs",
            "pairsieve-follower-models", "pairsieve-follower-decisions"} <= front.client_ids


@pytest.mark.parametrize("change, reason", [
    (dict(kafka_sasl_password="wrong"), "SaslAuthenticationFailed"),
    (dict(kafka_sasl_mechanism="PLAIN", kafka_sasl_password="wrong"), "SaslAuthenticationFailed"),
    (dict(kafka_ssl_cafile=""), "CERTIFICATE_VERIFY_FAILED"),
    (dict(kafka_security_protocol="SASL_PLAINTEXT", kafka_ssl_cafile=""), "closed"),
])
def test_a_wrong_credential_fails_the_start_by_name_before_anything_is_written(
        front, change, reason):
    s = _settings(front, **change)
    failed_before = front.logins_failed
    t0 = time.monotonic()
    with pytest.raises(KafkaAccessError) as err:
        asyncio.run(start_service(s))
    took = time.monotonic() - t0
    msg = str(err.value)
    assert reason in msg and front.bootstrap in msg and s.kafka_security_protocol in msg
    assert "wrong" not in msg and USERS["pairsieve"] not in msg  # no password echoed
    assert took < 15  # one attempt, not a client's retry loop
    if reason == "SaslAuthenticationFailed":
        assert front.logins_failed == failed_before + 1


def test_security_settings_are_checked_before_anything_starts():
    with pytest.raises(SettingsError) as err:
        Settings.from_env({}, kafka_bootstrap="127.0.0.1:9", kafka_security_protocol="SASL_SSL",
                          kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="u")
    assert "needs a SASL user name and password" in str(err.value)
    with pytest.raises(SettingsError, match="embedded broker is plaintext"):
        Settings.from_env({}, kafka_security_protocol="SSL")
    s = Settings.from_env({}, kafka_bootstrap="127.0.0.1:9", kafka_security_protocol="SSL",
                          kafka_ssl_cafile="/nonexistent/ca.pem")
    with pytest.raises(SettingsError, match="PAIRSIEVE_KAFKA_SSL_CAFILE"):
        s.check_environment()


def test_tansu_authentication_listener_refuses_an_unauthenticated_service():
    """tansu's own ``--authentication``: pairsieve without credentials is refused at start, by
    name, within seconds (not a hang, not a half-started worker)."""
    port = _free_port("127.0.0.1")
    proc = subprocess.Popen([_broker_bin(), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
                             "--advertised-listener-url", f"tcp://127.0.0.1:{port}",
                             "--authentication"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.5)
        s = Settings.from_env({}, kafka_bootstrap=f"127.0.0.1:{port}", grpc_port=0,
                              metrics_port=0, modalities="image:12,text:8")
        with pytest.raises(KafkaAccessError, match="closed"):
            asyncio.run(start_service(s))
    finally:
        proc.kill()
        proc.wait(5)
