"""The load drivers (loadtests/kafka_load.py, loadtests/grpc_load.py) against a live service.

One in-process pairsieve (its own event loop in a background thread, on the session tansu broker,
small dimensions, token auth on) serves every test of this module; each driver runs for ~3 s at a
low rate through its command line and must write its JSON/CSV/PNG with non-zero throughput. The
Kafka driver's malformed records and third-modality batches must come back on the dead-letter
topic (checked with an independent consumer too); the gRPC driver must record DEADLINE_EXCEEDED
for an absurdly small deadline and UNAUTHENTICATED without the token.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import threading
import uuid

import pytest
from kafka import KafkaConsumer

from loadtests import grpc_load, kafka_load
from service.runtime import start_service
from service.settings import Settings
from service.streaming.topics import DEAD_LETTER_TOPIC, FEATURES_TOPIC
from service.wire.gen.pairsieve.v1 import pairsieve_pb2 as pb

pytestmark = pytest.mark.integration

TOKEN = "lt-s3cret"
MODALITIES = "image:16,text:12"


@pytest.fixture(scope="module")
def live_service(tansu_broker, tmp_path_factory):
    # faust creates "<group id>-data/" in the working directory: not in the checkout
    old_cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("faust-cwd"))
    suffix = f".lt{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env(
        {}, kafka_bootstrap=tansu_broker.bootstrap, topic_suffix=suffix, modalities=MODALITIES,
        grpc_port=0, metrics_port=0, grpc_host="127.0.0.1", metrics_host="127.0.0.1",
        embedding_dim=8, index_size=256, cache_capacity=256, warmup_accepts=10,
        target_rate=0.2, group_id=f"g-lt-{uuid.uuid4().hex[:6]}", worker_id="w-lt",
        auth_token=TOKEN, shutdown_grace_seconds=5.0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="pairsieve-under-test", daemon=True)
    thread.start()
    svc = None
    try:
        svc = asyncio.run_coroutine_threadsafe(start_service(settings), loop).result(120)
        yield svc, settings
    finally:
        if svc is not None:
            asyncio.run_coroutine_threadsafe(svc.shutdown(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        os.chdir(old_cwd)


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _dead_letters(bootstrap, topic, expect, timeout_ms=2000):
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                      group_id=None, consumer_timeout_ms=timeout_ms)
    out = [pb.DeadLetter.FromString(r.value) for r in c]
    c.close()
    return out


def test_kafka_driver_measures_throughput_latency_and_dead_letters(live_service, tmp_path):
    svc, s = live_service
    out = tmp_path / "kafka"
    rc = kafka_load.main([
        "--bootstrap", svc.bootstrap, "--topic-suffix", s.topic_suffix, "--rate", "150",
        "--duration", "3", "--ramp-seconds", "0.5", "--modalities", MODALITIES + ",audio:8",
        "--mix", "0.6,0.3,0.1", "--malformed", "0.05", "--batch-size", "8",
        "--metrics-url", f"http://127.0.0.1:{svc.metrics_port}/metrics",
        "--group-id", s.group_id, "--drain-seconds", "20", "--out-dir", str(out)])
    assert rc == 0
    for name in ("kafka_result.json", "kafka_timeseries.csv", "kafka_steps.csv",
                 "kafka_requests.csv", "kafka_load.png"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "kafka_result.json").read_text())
    sm = result["summary"]
    ctx = json.dumps(sm, indent=1)
    assert sm["produced_events"] > 300 and sm["driver_dropped"] == 0 and sm["send_errors"] == 0, ctx
    assert sm["drained"], ctx
    # every good event was decided (the service's counters), some were accepted and read back
    assert sm["decided_events"] == sm["good_events"] > 0, ctx
    assert sm["requests"] > 0 and sm["acceptance"] > 0, ctx
    assert sm["decision_latency_ms"]["p50"] > 0 and sm["e2e_latency_ms"]["p99"] > 0, ctx
    assert sm["e2e_latency_ms"]["p50"] >= sm["decision_latency_ms"]["p50"] - 50, ctx
    # malformed records and the unknown third modality: all on the dead-letter topic
    kinds = sm["events_by_kind"]
    assert all(kinds[k] > 0 for k in ("unknown_modality", "undecodable", "wrong_dimension",
                                      "non_finite")), ctx
    assert sm["dead_letter_events"] == sm["dead_letter_expected_events"] > 0, ctx
    assert {k: v for k, v in sm["dead_letters_by_reason"].items()} == {
        k: kinds[k] for k in ("unknown_modality", "undecodable", "wrong_dimension",
                              "non_finite")}, ctx
    dls = _dead_letters(svc.bootstrap, s.topic(DEAD_LETTER_TOPIC), sm["dead_letter_records"])
    assert len(dls) == sm["dead_letter_records"], ctx
    assert {d.reason for d in dls} == {"unknown_modality", "undecodable", "wrong_dimension",
                                       "non_finite"}
    assert all(d.source_topic == s.topic(FEATURES_TOPIC) for d in dls)
    # per-second series and per-step rows carry the throughput
    ts = _csv_rows(out / "kafka_timeseries.csv")
    assert sum(float(r["produced_per_s"]) for r in ts) == sm["produced_events"]
    assert sum(float(r["decided_per_s"] or 0) for r in ts) > 0
    steps = _csv_rows(out / "kafka_steps.csv")
    assert [r["phase"] for r in steps] == ["ramp", "150/s"]
    assert 100 < float(steps[1]["produced_per_s"]) < 200
    assert len(_csv_rows(out / "kafka_requests.csv")) == sm["requests"]


def test_grpc_driver_measures_items_per_second_and_latency(live_service, tmp_path):
    svc, _s = live_service
    out = tmp_path / "grpc"
    rc = grpc_load.main([
        "--target", f"127.0.0.1:{svc.grpc_port}", "--concurrency", "2", "--duration", "1.5",
        "--ramp-seconds", "0.3", "--batch", "1,16", "--modes", "unary,stream", "--token", TOKEN,
        "--modalities", MODALITIES, "--out-dir", str(out)])
    assert rc == 0
    for name in ("grpc_result.json", "grpc_phases.csv", "grpc_timeseries.csv", "grpc_load.png"):
        assert (out / name).stat().st_size > 0, name
    result = json.loads((out / "grpc_result.json").read_text())
    phases = {p["phase"]: p for p in result["phases"]}
    assert set(phases) == {"unary-b1", "unary-b16", "stream-b1", "stream-b16"}
    for name, p in phases.items():
        assert p["errors"] == {}, (name, p)
        assert p["items_per_s"] > 0 and p["requests_ok"] > 0, (name, p)
        assert p["items_ok"] == p["requests_ok"] * p["batch"], (name, p)
        assert 0 < p["latency_ms"]["p50"] <= p["latency_ms"]["p99"], (name, p)
    rows = _csv_rows(out / "grpc_phases.csv")
    assert len(rows) == 4 and all(float(r["items_per_s"]) > 0 for r in rows)


def test_grpc_driver_records_deadline_exceeded_and_unauthenticated(live_service, tmp_path):
    svc, _s = live_service
    target = f"127.0.0.1:{svc.grpc_port}"
    common = ["--target", target, "--concurrency", "2", "--duration", "1", "--batch", "8",
              "--modes", "unary", "--modalities", MODALITIES, "--no-plot"]
    assert grpc_load.main(common + ["--token", TOKEN, "--deadline-ms", "0.2",
                                    "--out-dir", str(tmp_path / "deadline")]) == 0
    res = json.loads((tmp_path / "deadline" / "grpc_result.json").read_text())
    errors = res["summary"]["errors"]
    assert errors.get("DEADLINE_EXCEEDED", 0) > 0, errors
    assert res["phases"][0]["error_total"] == res["phases"][0]["requests"] - \
        res["phases"][0]["requests_ok"]

    assert grpc_load.main(common + ["--out-dir", str(tmp_path / "noauth")]) == 0
    res = json.loads((tmp_path / "noauth" / "grpc_result.json").read_text())
    assert set(res["summary"]["errors"]) == {"UNAUTHENTICATED"}, res["summary"]
    assert res["summary"]["items_ok"] == 0


def test_kafka_driver_sends_single_event_records_with_batch_size_one(live_service, tmp_path):
    svc, s = live_service
    out = tmp_path / "kafka-single"
    before = svc.processor.batches
    rc = kafka_load.main([
        "--bootstrap", svc.bootstrap, "--topic-suffix", s.topic_suffix, "--rate", "100",
        "--duration", "2", "--ramp-seconds", "0.2", "--modalities", MODALITIES,
        "--batch-size", "1", "--no-dead-letter",
        "--metrics-url", f"http://127.0.0.1:{svc.metrics_port}/metrics",
        "--group-id", s.group_id, "--drain-seconds", "20", "--out-dir", str(out), "--no-plot"])
    assert rc == 0
    sm = json.loads((out / "kafka_result.json").read_text())["summary"]
    ctx = json.dumps(sm, indent=1)
    # one event per record, every one decided
    assert sm["events_per_record"] == 1.0 and sm["produced_records"] == sm["produced_events"], ctx
    assert sm["decided_events"] == sm["good_events"] == sm["produced_events"] > 100, ctx
    assert svc.processor.batches > before
    # on the topic: FeatureEvent records (the header says so), not FeatureBatch
    c = KafkaConsumer(s.topic(FEATURES_TOPIC), bootstrap_servers=svc.bootstrap,
                      auto_offset_reset="earliest", group_id=None, consumer_timeout_ms=2000)
    prefix = f"{sm['run_id']}-".encode()
    kinds = {dict(r.headers).get("pairsieve-message") for r in c if prefix in r.value}
    c.close()
    assert kinds == {b"FeatureEvent"}


def test_faust_event_ceiling_consumes_every_single_event_record(tansu_broker, tmp_path,
                                                               monkeypatch):
    from service.perfbench.e2e import faust_event_ceiling

    monkeypatch.chdir(tmp_path)  # faust writes "<group id>-data/" here
    res = asyncio.run(faust_event_ceiling(tansu_broker.bootstrap, 400, timeout_s=60.0))
    assert res["complete"] and res["consumed"] == res["records"] == 400, res
    assert res["events_per_s"] > 0 and res["seconds"] > 0, res
    # built like the workers' app: the settings' micro-batch bounds
    assert (res["batch_max_items"], res["max_wait_seconds"]) == (256, 0.05), res


def test_budget_ledger_driver_measures_round_trips_and_idle_cpu(tansu_broker, tmp_path, capsys):
    from loadtests import budget_ledger

    out = tmp_path / "ledger.json"
    assert budget_ledger.main(["--bootstrap", tansu_broker.bootstrap, "--reservations", "5",
                               "--ids", "3", "--idle-seconds", "0.5", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rt = res["round_trip"]
    assert rt["reservations"] == 5 and 0 < rt["median_ms"] <= rt["p90_ms"] <= rt["max_ms"]
    assert [r["fetch_max_wait_ms"] for r in res["idle"]] == [10, 50]
    assert all(r["idle_cpu_percent"] >= 0 for r in res["idle"])
    assert "reservation round trip (5 x 3 ids" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        budget_ledger.main(["--reservations", "0"])
