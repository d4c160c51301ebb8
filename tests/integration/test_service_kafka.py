"""The service end to end through the real (tansu) broker: every test starts pairsieve itself.

Features in -> alignment requests out (read back with a plain kafka-python consumer), labels in
-> model version increases, malformed -> dead letter with a reason, redelivery -> no second
request, SIGTERM -> no accepted event lost.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from service.messages import IncomingEvent, Label
from service.runtime import start_service
from service.settings import Settings
from service.streaming.topics import DEAD_LETTER_TOPIC, FEATURES_TOPIC, LABELS_TOPIC, REQUESTS_TOPIC
from service.wire import codecs
from tests.support import produce, read_all

pytestmark = pytest.mark.integration

DIMS = {"image": 12, "text": 8}


def _settings(kafka_topics, **kw) -> Settings:
    suffix = kafka_topics[FEATURES_TOPIC][len(FEATURES_TOPIC):]
    base = dict(kafka_bootstrap=kafka_topics["bootstrap"], topic_suffix=suffix,
                modalities="image:12,text:8", grpc_port=0, metrics_port=0, grpc_host="127.0.0.1",
                metrics_host="127.0.0.1", embedding_dim=8, warmup_accepts=0, target_rate=1.0,
                explore_fraction=0.0, index_size=256, cache_capacity=256,
                group_id=f"g-{uuid.uuid4().hex[:6]}", worker_id="w-test", max_wait_seconds=0.05,
                shutdown_grace_seconds=5.0)
    base.update(kw)
    return Settings.from_env({}, **base)


def _events(n, seed=0, prefix="e"):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m = "image" if i % 2 == 0 else "text"
        out.append(IncomingEvent(f"{prefix}{i}", f"{prefix}-item{i}", m,
                                 rng.normal(size=DIMS[m]).astype(np.float32), time.time()))
    return out


async def _wait(pred, timeout_s=30.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.1)
    return False


def test_features_in_requests_out_and_redelivery_makes_no_duplicate(kafka_topics):
    s = _settings(kafka_topics)
    boot = kafka_topics["bootstrap"]
    evs = _events(40)

    async def scenario():
        svc = await start_service(s)
        # start-up objects are out of the garbage collector's reach while serving
        assert gc.get_freeze_count() > 10_000
        try:
            batch = codecs.encode_feature_batch(evs[:20])
            singles = [codecs.encode_feature_event(e) for e in evs[20:]]
            await asyncio.to_thread(produce, boot, s.topic(FEATURES_TOPIC), [batch],
                                    [codecs.FEATURE_HEADER_BATCH])
            # the later events find the first batch in the recent index -> partner candidates
            assert await _wait(lambda: svc.handler.status().seen >= 20)
            await asyncio.to_thread(produce, boot, s.topic(FEATURES_TOPIC), singles)
            assert await _wait(lambda: svc.handler.status().seen >= 40)
            # redelivery: the same events again (same event ids), as after a consumer crash
            await asyncio.to_thread(produce, boot, s.topic(FEATURES_TOPIC), [batch],
                                    [codecs.FEATURE_HEADER_BATCH])
            await asyncio.sleep(2.0)
            return svc.handler.status()
        finally:
            await svc.shutdown()

    status = asyncio.run(scenario())
    assert gc.get_freeze_count() == 0  # and back after the shutdown (an embedding process)
    assert status.spent == 40 and status.seen == 40  # redelivered events were not re-decided
    reqs = read_all(boot, s.topic(REQUESTS_TOPIC), 40,
                     parse=codecs.pb.AlignmentRequest.FromString)
    ids = [r.request_id for r in reqs]
    assert sorted(ids) == sorted(e.event_id for e in evs)  # each accepted event exactly once
    assert all(r.worker_id == "w-test" and r.dim == DIMS[r.modality] for r in reqs)
    assert any(len(r.candidates) > 0 for r in reqs)  # partner suggestions of the other modality
    # every event appears once even after waiting a little longer
    assert len(read_all(boot, s.topic(REQUESTS_TOPIC), 41, timeout_s=3)) == 40


def test_malformed_records_go_to_dead_letter_with_reason(kafka_topics):
    s = _settings(kafka_topics)
    boot = kafka_topics["bootstrap"]
    good = _events(4)
    wrong_dim = codecs.pb.FeatureEvent(event_id="bad1", item_id="x", modality="image",
                                       vector=np.zeros(3, "<f4").tobytes(), dim=3)
    unknown = codecs.pb.FeatureEvent(event_id="bad2", item_id="y", modality="audio",
                                     vector=np.zeros(12, "<f4").tobytes(), dim=12)
    nan = codecs.pb.FeatureEvent(event_id="bad3", item_id="z", modality="text",
                                 vector=np.full(8, np.nan, "<f4").tobytes(), dim=8)
    bad = [b"\xff\x00not protobuf", wrong_dim.SerializeToString(), unknown.SerializeToString(),
           nan.SerializeToString()]

    async def scenario():
        svc = await start_service(s)
        try:
            await asyncio.to_thread(produce, boot, s.topic(FEATURES_TOPIC),
                                    bad + [codecs.encode_feature_event(e) for e in good])
            assert await _wait(lambda: svc.handler.status().seen >= 4
                               and svc.processor.dead_letters >= 4)
        finally:
            await svc.shutdown()

    asyncio.run(scenario())
    dls = read_all(boot, s.topic(DEAD_LETTER_TOPIC), 4, parse=codecs.pb.DeadLetter.FromString)
    by_orig = {d.original: d for d in dls}
    assert by_orig[bad[0]].reason == "undecodable"
    assert by_orig[bad[1]].reason == "wrong_dimension" and "3" in by_orig[bad[1]].detail
    assert by_orig[bad[2]].reason == "unknown_modality" and "audio" in by_orig[bad[2]].detail
    assert by_orig[bad[3]].reason == "non_finite"
    assert all(d.source_topic == s.topic(FEATURES_TOPIC) for d in dls)


def test_oversized_records_lose_no_valid_event_of_their_micro_batches(kafka_topics):
    """Issue 15, item 1, as reported: PAIRSIEVE_MAX_MESSAGE_BYTES=65536 and two 69,663-byte
    records among valid events. Before the fix the dead letter (carrying the original) exceeded
    the producer's limit, the agent crashed and faust acknowledged its buffer: thousands of
    valid events were committed undecided."""
    s = _settings(kafka_topics, max_message_bytes=65536, batch_max_items=64)
    boot = kafka_topics["bootstrap"]
    good = [codecs.encode_feature_event(e) for e in _events(600, seed=5)]
    huge = codecs.pb.FeatureEvent(event_id="huge", item_id="h", modality="image",
                                  vector=np.zeros(17_413, "<f4").tobytes(),
                                  dim=17_413).SerializeToString()
    assert len(huge) > 65536
    values = good[:200] + [huge] + good[200:400] + [huge] + good[400:]

    async def scenario():
        svc = await start_service(s)
        try:
            await asyncio.to_thread(produce, boot, s.topic(FEATURES_TOPIC), values)
            assert await _wait(lambda: svc.handler.status().seen >= 600
                               and svc.processor.dead_letters >= 2, timeout_s=60)
            await asyncio.sleep(1.0)
            return svc.handler.status().seen, svc.processor.dead_letters
        finally:
            await svc.shutdown()

    seen, dead = asyncio.run(scenario())
    assert (seen, dead) == (600, 2)  # every valid event decided, once
    dls = read_all(boot, s.topic(DEAD_LETTER_TOPIC), 2, parse=codecs.pb.DeadLetter.FromString)
    assert [d.reason for d in dls] == ["oversized", "oversized"]
    assert all(d.original_omitted and d.original_size == len(huge) for d in dls)
    assert all(d.source_topic == s.topic(FEATURES_TOPIC) and d.source_offset >= 0 for d in dls)


def test_a_paused_broker_makes_the_worker_not_serving_and_grpc_unavailable_without_loss():
    """Issue 15, item 3: with the broker stopped (SIGSTOP), health stayed SERVING and Submit
    waited for its deadline. Now health goes NOT_SERVING within 15 s, Submit answers UNAVAILABLE
    at once; after SIGCONT both recover and the stream is decided."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service.streaming.broker import EmbeddedBroker
    from service.streaming.topics import create_topics, topic_specs
    from service.wire.gen.pairsieve.v1 import pairsieve_pb2_grpc as pb_grpc

    broker = EmbeddedBroker()
    broker.start()
    try:
        create_topics(broker.bootstrap, {t: n for t, n in topic_specs().items()})
        s = _settings({FEATURES_TOPIC: FEATURES_TOPIC, "bootstrap": broker.bootstrap},
                      broker_down_after_seconds=4.0)
        evs = _events(40, seed=9)

        async def health(stub):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
            return resp.status

        async def scenario():
            svc = await start_service(s)
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as ch:
                    hs, sel = health_pb2_grpc.HealthStub(ch), pb_grpc.SelectorStub(ch)
                    assert await health(hs) == health_pb2.HealthCheckResponse.SERVING
                    broker.proc.send_signal(signal.SIGSTOP)
                    t0 = time.time()
                    try:
                        while await health(hs) == health_pb2.HealthCheckResponse.SERVING:
                            assert time.time() - t0 < 15, "still SERVING 15 s after the pause"
                            await asyncio.sleep(0.5)
                        down_after = time.time() - t0
                        req = codecs.pb.SubmitRequest(
                            events=[codecs.event_to_proto(e) for e in evs[:2]])
                        with pytest.raises(grpc.aio.AioRpcError) as ei:
                            await sel.Submit(req, timeout=10)
                        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
                        assert "unreachable" in ei.value.details()
                    finally:
                        broker.proc.send_signal(signal.SIGCONT)
                    t1 = time.time()
                    while await health(hs) != health_pb2.HealthCheckResponse.SERVING:
                        assert time.time() - t1 < 30, "not SERVING 30 s after the broker resumed"
                        await asyncio.sleep(0.5)
                    await asyncio.to_thread(produce, broker.bootstrap, FEATURES_TOPIC,
                                            [codecs.encode_feature_event(e) for e in evs])
                    assert await _wait(lambda: svc.handler.status().seen >= 40, timeout_s=60)
                    return down_after, svc.handler.status().seen
            finally:
                await svc.shutdown()

        down_after, seen = asyncio.run(scenario())
        assert down_after < 15 and seen == 40
    finally:
        if broker.proc is not None and broker.proc.poll() is None:
            broker.proc.send_signal(signal.SIGCONT)
        broker.stop()


def test_labels_in_raise_the_model_version(kafka_topics):
    s = _settings(kafka_topics, retrain_every_pairs=6)
    boot = kafka_topics["bootstrap"]
    rng = np.random.default_rng(3)
    z = rng.normal(size=(30, 4))
    img = (z @ rng.normal(size=(4, 12))).astype(np.float32)
    txt = (z @ rng.normal(size=(4, 8))).astype(np.float32)
    evs = [IncomingEvent(f"img{i}", f"img-{i}", "image", img[i], time.time()) for i in range(30)]

    async def scenario():
        svc = await start_service(s)
        try:
            await asyncio.to_thread(produce, boot, s.topic(FEATURES_TOPIC),
                                    [codecs.encode_feature_batch(evs)],
                                    [codecs.FEATURE_HEADER_BATCH])
            assert await _wait(lambda: svc.handler.status().spent >= 30)
            v0 = svc.handler.model_version
            labels = [codecs.label_to_proto(Label(item_id=f"img-{i}", modality="image",
                                                  partner_item_id=f"txt-{i}", status="MATCH",
                                                  partner_vector=txt[i])).SerializeToString()
                      for i in range(30)]
            await asyncio.to_thread(produce, boot, s.topic(LABELS_TOPIC), labels)
            assert await _wait(lambda: svc.handler.status().pairs_acquired >= 30)
            await svc.handler.wait_for_training()
            assert await _wait(lambda: svc.handler.model_version > v0)
            return v0, svc.handler.model_version, svc.handler.status()
        finally:
            await svc.shutdown()

    v0, v1, status = asyncio.run(scenario())
    assert v1 > v0 and status.labels["MATCH"] == 30


def test_sigterm_loses_no_accepted_event(kafka_topics, tmp_path):
    """A real `pairsieve serve` process is stopped with SIGTERM mid-stream and restarted:
    every event ends up accepted exactly once (target rate 1), none lost, none doubled."""
    s = _settings(kafka_topics)
    boot = kafka_topics["bootstrap"]
    n = 600
    evs = _events(n, seed=7)
    env = {**os.environ, "PAIRSIEVE_KAFKA_BOOTSTRAP": boot,
           "PAIRSIEVE_TOPIC_SUFFIX": s.topic_suffix,
           "PAIRSIEVE_MODALITIES": s.modalities, "PAIRSIEVE_GRPC_PORT": "0",
           "PAIRSIEVE_METRICS_PORT": "0", "PAIRSIEVE_EMBEDDING_DIM": "8",
           "PAIRSIEVE_WARMUP_ACCEPTS": "0", "PAIRSIEVE_TARGET_RATE": "1.0",
           "PAIRSIEVE_EXPLORE_FRACTION": "0", "PAIRSIEVE_GROUP_ID": s.group_id,
           "PAIRSIEVE_WORKER_ID": "w-sig", "PAIRSIEVE_BATCH_MAX_ITEMS": "16",
           "PAIRSIEVE_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}

    def start(log_name):
        log = open(tmp_path / log_name, "w")
        return subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env,
                                stdout=log, stderr=subprocess.STDOUT), log

    produce(boot, s.topic(FEATURES_TOPIC), [codecs.encode_feature_event(e) for e in evs])
    proc, log1 = start("first.log")
    deadline = time.time() + 60
    seen = []
    while time.time() < deadline and len(seen) < 30:
        seen = read_all(boot, s.topic(REQUESTS_TOPIC), 30, timeout_s=2)
    assert len(seen) >= 30, (tmp_path / "first.log").read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, (tmp_path / "first.log").read_text()[-3000:]
    first_log = (tmp_path / "first.log").read_text()
    assert "stopped" in first_log
    proc2, log2 = start("second.log")
    try:
        reqs = read_all(boot, s.topic(REQUESTS_TOPIC), n, timeout_s=90,
                         parse=codecs.pb.AlignmentRequest.FromString)
    finally:
        proc2.send_signal(signal.SIGTERM)
        proc2.wait(timeout=30)
    ids = [r.request_id for r in reqs]
    assert len(set(ids)) == n, f"lost {n - len(set(ids))} events\n" + \
        (tmp_path / "second.log").read_text()[-3000:]
    assert len(ids) == n, f"{len(ids) - n} duplicate requests"


def test_readme_client_examples_work(kafka_topics):
    """examples/grpc_client.py and examples/kafka_client.py (shown in the README) against a
    running service, with token auth on."""
    s = _settings(kafka_topics, modalities="image:16,text:12", auth_token="s3cret",
                  target_rate=0.5)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root}

    def run(args):
        return subprocess.run([sys.executable, *args], env=env, cwd=root, capture_output=True,
                              text=True, timeout=60)

    async def scenario():
        svc = await start_service(s)
        try:
            g = await asyncio.to_thread(run, ["examples/grpc_client.py", "--target",
                                              f"127.0.0.1:{svc.grpc_port}", "--modality", "image",
                                              "--dim", "16", "--token", "s3cret"])
            denied = await asyncio.to_thread(run, ["examples/grpc_client.py", "--target",
                                                   f"127.0.0.1:{svc.grpc_port}", "--dim", "16"])
            k = await asyncio.to_thread(run, ["examples/kafka_client.py", "--bootstrap",
                                              s.kafka_bootstrap, "--topic-suffix", s.topic_suffix,
                                              "--modality", "text", "--dim", "12",
                                              "--wait-seconds", "6"])
            return g, denied, k
        finally:
            await svc.shutdown()

    g, denied, k = asyncio.run(scenario())
    assert g.returncode == 0, g.stderr
    assert g.stdout.count("item-") == 8 and "budget spent" in g.stdout
    assert denied.returncode != 0 and "UNAUTHENTICATED" in denied.stderr
    assert k.returncode == 0, k.stderr
    assert "were selected for alignment" in k.stdout
    selected = int(k.stdout.strip().splitlines()[-1].split()[0])
    assert selected >= 1


def test_features_consumer_uses_the_configured_fetch_wait(kafka_topics):
    """faust hard-codes fetch_max_wait_ms=1500; the service's hook replaces it (tansu holds a
    fetch for about half of that, which would be added to every decision latency)."""
    s = _settings(kafka_topics, fetch_max_wait_seconds=0.02)
    boot = kafka_topics["bootstrap"]

    async def scenario():
        svc = await start_service(s)
        try:
            await asyncio.to_thread(produce, boot, s.topic(FEATURES_TOPIC),
                                    [codecs.encode_feature_event(e) for e in _events(2)])
            assert await _wait(lambda: svc.handler.status().seen >= 2)
            consumer = svc.processor.app.consumer._thread._consumer
            return consumer._fetch_max_wait_ms, consumer._fetcher._fetch_max_wait_ms
        finally:
            await svc.shutdown()

    assert asyncio.run(scenario()) == (20, 20)


def test_service_limits_torch_and_blas_threads(kafka_topics):
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    s = _settings(kafka_topics, compute_threads=1)
    before = torch.get_num_threads()
    with threadpool_limits(limits=2):  # as a process would start on a 2+ core box
        torch.set_num_threads(2)

        async def scenario():
            svc = await start_service(s)
            try:
                return torch.get_num_threads(), {p["num_threads"] for p in threadpool_info()}
            finally:
                await svc.shutdown()

        torch_threads, blas_threads = asyncio.run(scenario())
    torch.set_num_threads(before)
    assert torch_threads == 1 and blas_threads == {1}
