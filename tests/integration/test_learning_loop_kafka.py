"""The learning loop through the real (tansu) broker, as an operator runs it.

Each test is one scenario: a worker restarted mid-stream keeps its pairs, model version and
validation recall and trains the next version on all pairs; two workers share one model lineage
and the survivor of a ``kill -9`` of the trainer takes training over (and the killed worker comes
back with everything); a batch of wrong answers yields a worse candidate that the quality gate
rejects; a label nobody can resolve lands in the dead-letter topic with its reason;
``pairsieve export-pairs`` writes the acquired dataset.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer

from service.messages import IncomingEvent, Label
from service.runtime import start_service
from service.settings import Settings
from service.streaming.topics import (
    DEAD_LETTER_TOPIC,
    DECISIONS_TOPIC,
    FEATURES_TOPIC,
    LABELS_TOPIC,
    REQUESTS_TOPIC,
    TRAINING_PAIRS_TOPIC,
    create_topics,
    topic_specs,
)
from service.wire import codecs
from tests.support import decision_protos, produce, read_all

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DIMS = {"image": 12, "text": 8}
N = 240  # items per modality


def _data(seed=3):
    """Image/text pairs sharing a 4-d latent (a linear map aligns them well)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(N, 4))
    img = (z @ rng.normal(size=(4, 12)) + 0.05 * rng.normal(size=(N, 12))).astype(np.float32)
    txt = (z @ rng.normal(size=(4, 8)) + 0.05 * rng.normal(size=(N, 8))).astype(np.float32)
    return img, txt


IMG, TXT = _data()


def _settings(kafka_topics, **kw) -> Settings:
    suffix = kafka_topics[FEATURES_TOPIC][len(FEATURES_TOPIC):]
    base = dict(kafka_bootstrap=kafka_topics["bootstrap"], topic_suffix=suffix,
                modalities="image:12,text:8", grpc_port=0, metrics_port=0, grpc_host="127.0.0.1",
                metrics_host="127.0.0.1", embedding_dim=8, warmup_accepts=0, target_rate=1.0,
                explore_fraction=0.0, index_size=256, cache_capacity=256,
                group_id=f"g-{uuid.uuid4().hex[:6]}", worker_id="w-loop", max_wait_seconds=0.05,
                shutdown_grace_seconds=5.0, retrain_every_pairs=20, learner="ridge",
                self_learning="off")
    base.update(kw)
    return Settings.from_env({}, **base)


def _image_events(rows, prefix="e"):
    return [IncomingEvent(f"{prefix}{i}", f"img-{i}", "image", IMG[i], time.time())
            for i in rows]


def _labels(rows, partner_rows=None):
    """MATCH labels of images ``rows`` with the texts ``partner_rows`` (default: their true
    partners), the text vectors sent along, request id = the event id."""
    partner_rows = rows if partner_rows is None else partner_rows
    return [codecs.label_to_proto(Label(item_id=f"img-{i}", modality="image",
                                        partner_item_id=f"txt-{j}", status="MATCH",
                                        request_id=f"e{i}", partner_vector=TXT[j]))
            .SerializeToString() for i, j in zip(rows, partner_rows, strict=True)]


async def _wait(pred, timeout_s=60.0, what=""):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if pred():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def _feed(svc, settings, rows):
    boot = settings.kafka_bootstrap
    await asyncio.to_thread(produce, boot, settings.topic(FEATURES_TOPIC),
                            [codecs.encode_feature_batch(_image_events(rows))],
                            [codecs.FEATURE_HEADER_BATCH])
    target = svc.handler.status().seen + len(rows)
    await _wait(lambda: svc.handler.status().seen >= target, what=f"{target} events decided")


async def _label(svc, settings, rows, partner_rows=None):
    before = svc.handler.learning.pairs_acquired
    await asyncio.to_thread(produce, settings.kafka_bootstrap, settings.topic(LABELS_TOPIC),
                            _labels(rows, partner_rows))
    await _wait(lambda: svc.handler.learning.pairs_acquired >= before + len(rows),
                what=f"{before + len(rows)} pairs")
    await svc.handler.settle()


def test_a_restarted_worker_keeps_pairs_model_and_recall_and_trains_on_all_pairs(kafka_topics):
    s = _settings(kafka_topics)

    async def first():
        svc = await start_service(s)
        try:
            await _feed(svc, s, range(120))
            await _label(svc, s, range(60))
            lp = svc.handler.learning
            await _wait(lambda: lp.model.n_pairs == 60 - lp.validation_pairs,
                        what="a version trained on all 60 pairs")
            st = svc.handler.status()
            assert st.model_version >= 2  # at least two retrains (every 20 pairs) from v0
            assert st.trainer and st.pairs_acquired == 60 and st.validation_pairs > 0
            return st, dict(svc.handler.learning.pairs)
        finally:
            await svc.shutdown()

    async def second(before):
        svc = await start_service(s)  # same group, same topics: a restart
        try:
            st = svc.handler.status()
            assert st.pairs_acquired == before.pairs_acquired == 60
            assert st.model_version == before.model_version
            assert st.validation_recall == before.validation_recall
            assert st.validation_pairs == before.validation_pairs
            # the selections came back too: the redelivered accepted events are duplicates
            assert st.spent == before.spent
            # the annotation tool re-sends answers it sent before the restart: counted once
            lp = svc.handler.learning
            await asyncio.to_thread(produce, s.kafka_bootstrap, s.topic(LABELS_TOPIC),
                                    _labels(range(10)))
            await _wait(lambda: lp.duplicate_labels >= 10, what="10 duplicate labels")
            assert lp.pairs_acquired == 60 and lp.labels_by_status["MATCH"] == 0
            await _label(svc, s, range(60, 100))  # two retrains' worth (every 20 pairs)
            lp = svc.handler.learning
            await _wait(lambda: lp.model.n_pairs == 100 - lp.validation_pairs,
                        what="a version trained on all 100 pairs after the restart")
            assert svc.handler.model_version > before.model_version
            return svc.handler.model, 100 - lp.validation_pairs, lp.pairs
        finally:
            await svc.shutdown()

    before, pairs_before = asyncio.run(first())
    assert len(pairs_before) == 60
    model, training, pairs_after = asyncio.run(second(before))
    assert model.n_pairs == training  # every pair but the held-out ones, before and after
    for key, p in pairs_before.items():  # nothing acquired was lost or altered
        np.testing.assert_array_equal(pairs_after[key].vector_b, p.vector_b)
    on_topic = read_all(s.kafka_bootstrap, s.topic(TRAINING_PAIRS_TOPIC), 100,
                         parse=codecs.pb.TrainingPair.FromString)
    assert len({(p.item_id_a, p.item_id_b) for p in on_topic}) == 100


def test_a_batch_of_wrong_answers_is_rejected_by_the_quality_gate(kafka_topics):
    s = _settings(kafka_topics, validation_share=0.3, gate_min_pairs=10, retrain_every_pairs=60)

    async def scenario():
        svc = await start_service(s)
        try:
            await _feed(svc, s, range(200))
            await _label(svc, s, range(60))
            await _wait(lambda: svc.handler.model_version >= 1, what="the first version")
            good = svc.handler.status()
            assert good.validation_recall[1] > 0.5
            # an annotator sends 120 wrong partners (each image paired with a random text)
            wrong = np.random.default_rng(0).permutation(np.arange(60, 180))
            await _label(svc, s, range(60, 180), wrong.tolist())
            await _wait(lambda: svc.handler.learning.candidates["rejected"] >= 1,
                        what="the gate's verdict")
            return good, svc.handler.status(), dict(svc.handler.learning.candidates)
        finally:
            await svc.shutdown()

    good, after, candidates = asyncio.run(scenario())
    assert after.model_version == good.model_version  # the worse candidate never went in
    assert after.pairs_acquired == 180  # the answers are kept (they are data; a person may fix)
    assert candidates["rejected"] >= 1 and candidates["published"] == 1


def test_an_unresolvable_label_lands_in_the_dead_letter_topic_with_its_reason(kafka_topics):
    s = _settings(kafka_topics)

    async def scenario():
        svc = await start_service(s)
        try:
            await _feed(svc, s, range(4))
            unknown_item = codecs.label_to_proto(Label(
                item_id="img-never-seen", modality="image", partner_item_id="txt-0",
                status="MATCH", request_id="r-x", partner_vector=TXT[0])).SerializeToString()
            unknown_partner = codecs.label_to_proto(Label(
                item_id="img-1", modality="image", partner_item_id="txt-nowhere",
                status="MATCH", request_id="e1")).SerializeToString()
            await asyncio.to_thread(produce, s.kafka_bootstrap, s.topic(LABELS_TOPIC),
                                    [unknown_item, unknown_partner, b"\x08\xff\xff"])
            dls = await asyncio.to_thread(read_all, s.kafka_bootstrap,
                                          s.topic(DEAD_LETTER_TOPIC), 3, 30.0,
                                          codecs.pb.DeadLetter.FromString)
            return dls, svc.handler.status()
        finally:
            await svc.shutdown()

    dls, st = asyncio.run(scenario())
    assert [d.reason for d in dls] == ["label_unresolved", "label_unresolved", "undecodable"]
    assert "'img-never-seen' (image): the item's vector is unknown" in dls[0].detail
    assert "partner 'txt-nowhere' (text) is unknown here; send its vector" in dls[1].detail
    assert all(d.source_topic == s.topic(LABELS_TOPIC) for d in dls)
    assert st.pairs_acquired == 0


def test_a_skipped_event_redelivered_after_a_restart_gets_its_earlier_decision(kafka_topics):
    s = _settings(kafka_topics, budget_total=0)  # nothing can be accepted: every event is skipped
    evs = _image_events(range(12))

    async def run():
        svc = await start_service(s)
        try:
            await asyncio.to_thread(produce, s.kafka_bootstrap, s.topic(FEATURES_TOPIC),
                                    [codecs.encode_feature_batch(evs)],
                                    [codecs.FEATURE_HEADER_BATCH])
            await _wait(lambda: svc.processor.batches >= 1, what="the batch")
            await svc.handler.settle()
            return svc.handler.status().seen
        finally:
            await svc.shutdown()

    assert asyncio.run(run()) == 12
    # after the restart the same events arrive again (a redelivery): answered from the decision
    # log, not decided afresh (this worker's seen counts decided events)
    assert asyncio.run(run()) == 0
    log = read_all(s.kafka_bootstrap, s.topic(DECISIONS_TOPIC), 13, timeout_s=5,
                   parse=decision_protos, many=True)
    assert sorted(d.event_id for d in log) == sorted(e.event_id for e in evs)
    assert all(d.reason == "skip:budget_exhausted" for d in log)
    env = {**os.environ, "PAIRSIEVE_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
           "PAIRSIEVE_TOPIC_SUFFIX": s.topic_suffix, "PAIRSIEVE_MODALITIES": s.modalities}
    res = subprocess.run([sys.executable, "-m", "service", "explain", "img-3"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "event 'e3' (item 'img-3', image): SKIP (budget_exhausted)" in res.stdout
    assert "by worker 'w-loop'" in res.stdout and "utility" in res.stdout
    res = subprocess.run([sys.executable, "-m", "service", "explain", "nothing-like-it"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "no decision and no pair" in res.stdout


def test_no_match_lowers_the_utility_of_the_items_neighbours(kafka_topics):
    s = _settings(kafka_topics)

    async def scenario():
        svc = await start_service(s)
        try:
            await _feed(svc, s, range(20))
            no_match = codecs.label_to_proto(Label(item_id="img-5", modality="image",
                                                   partner_item_id="", status="NO_MATCH",
                                                   request_id="e5")).SerializeToString()
            await asyncio.to_thread(produce, s.kafka_bootstrap, s.topic(LABELS_TOPIC),
                                    [no_match])
            lp = svc.handler.learning
            await _wait(lambda: ("img-5", "") in lp.partnerless, what="the NO_MATCH taken in")
            probes = [IncomingEvent("near-5", "img-near-5", "image", IMG[5] + 0.001, time.time()),
                      IncomingEvent("far", "img-far", "image", IMG[100], time.time())]
            await asyncio.to_thread(produce, s.kafka_bootstrap, s.topic(FEATURES_TOPIC),
                                    [codecs.encode_feature_batch(probes)],
                                    [codecs.FEATURE_HEADER_BATCH])
            await _wait(lambda: svc.handler.status().seen >= 22, what="the probes decided")
        finally:
            await svc.shutdown()

    asyncio.run(scenario())
    log = {d.event_id: d for d in read_all(
        s.kafka_bootstrap, s.topic(DECISIONS_TOPIC), 22, parse=decision_protos, many=True)}
    near, far = log["near-5"].components.partnerless, log["far"].components.partnerless
    assert near > 0.4 and far < near, (near, far)  # the weight is 0.5 at cosine 1
    pairs = read_all(s.kafka_bootstrap, s.topic(TRAINING_PAIRS_TOPIC), 1,
                      parse=codecs.pb.TrainingPair.FromString)
    assert [(p.partnerless, p.item_id_a, p.item_id_b) for p in pairs] == [(True, "img-5", "")]


def test_a_cost_budget_stops_at_its_cost(kafka_topics):
    s = _settings(kafka_topics, budget_unit="cost", budget_total=12)

    async def scenario():
        svc = await start_service(s)
        try:
            await _feed(svc, s, range(4))  # four requests at the prior cost, 1 each
            assert svc.handler.status().cost_spent == pytest.approx(4.0)
            # two answers come back, each costing 5: an image now costs (1 + 5 + 5) / 3
            labels = [codecs.label_to_proto(Label(
                item_id=f"img-{i}", modality="image", partner_item_id=f"txt-{i}",
                status="MATCH", request_id=f"e{i}", cost=5.0, partner_vector=TXT[i]))
                .SerializeToString() for i in range(2)]
            await asyncio.to_thread(produce, s.kafka_bootstrap, s.topic(LABELS_TOPIC), labels)
            await _wait(lambda: svc.handler.learning.pairs_acquired == 2, what="two pairs")
            await svc.handler.settle()
            assert svc.handler.status().expected_cost["image"] == pytest.approx(11 / 3)
            await _feed(svc, s, range(4, 24))
            return svc.handler.status()
        finally:
            await svc.shutdown()

    st = asyncio.run(scenario())
    # 4 + 11/3 + 11/3 = 11.33 <= 12; one more (15) would not fit
    assert st.cost_spent == pytest.approx(4 + 22 / 3) and st.spent == 6
    assert st.budget_unit == "cost" and st.cost_total == 12.0
    log = read_all(s.kafka_bootstrap, s.topic(DECISIONS_TOPIC), 24,
                   parse=decision_protos, many=True)
    accepted = [d for d in log if d.accept]
    assert sorted(round(d.cost, 3) for d in accepted) == [1.0] * 4 + [3.667] * 2
    skipped = {d.reason for d in log if not d.accept}
    assert skipped == {"skip:budget_exhausted"}


def test_export_pairs_writes_the_acquired_dataset(kafka_topics, tmp_path):
    s = _settings(kafka_topics)

    async def scenario():
        svc = await start_service(s)
        try:
            await _feed(svc, s, range(10))
            await _label(svc, s, range(10))
        finally:
            await svc.shutdown()

    asyncio.run(scenario())
    out = tmp_path / "pairs.npz"
    env = {**os.environ, "PAIRSIEVE_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
           "PAIRSIEVE_TOPIC_SUFFIX": s.topic_suffix, "PAIRSIEVE_MODALITIES": s.modalities}
    res = subprocess.run([sys.executable, "-m", "service", "export-pairs", "--out", str(out)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "10 pairs" in res.stdout
    from service.evaluation.datasets import load_npz
    ds = load_npz(out)
    assert ds.n == 10 and (ds.modality_a, ds.modality_b) == ("image", "text")
    with np.load(out) as z:
        rows = {str(a): i for i, a in enumerate(z["item_id_a"])}
        assert set(z["request_id"]) == {f"e{i}" for i in range(10)}
        assert z["validation"].dtype == bool
    for i in range(10):
        np.testing.assert_array_equal(ds.a[rows[f"img-{i}"]], IMG[i])
        np.testing.assert_array_equal(ds.b[rows[f"img-{i}"]], TXT[i])


# --------------------------------------------------------------------------- two processes
_SERVING = re.compile(r"pairsieve serving: gRPC :(\d+)")


class _Worker:
    def __init__(self, wid, env, log_path):
        self.wid, self.log_path = wid, log_path
        # a restarted worker appends to its log: look for its serving line after this point
        self.start = Path(log_path).stat().st_size if Path(log_path).exists() else 0
        with open(log_path, "a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve"],
                                         env={**env, "PAIRSIEVE_WORKER_ID": wid}, cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.port = None

    def text(self):
        return Path(self.log_path).read_text(errors="replace")

    def wait_serving(self, timeout_s=120.0):
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            assert self.proc.poll() is None, f"{self.wid} exited:\n{self.text()[-3000:]}"
            m = _SERVING.search(self.text()[self.start:])
            if m:
                self.port = int(m.group(1))
                return
            time.sleep(0.2)
        raise AssertionError(f"{self.wid} not serving after {timeout_s}s:\n{self.text()[-3000:]}")

    def status(self):
        """GetStatus of this worker (polled every 0.2 s by the test)."""
        import grpc

        from service.wire.gen.pairsieve.v1 import pairsieve_pb2_grpc as pb_grpc
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            return pb_grpc.SelectorStub(ch).GetStatus(codecs.pb.GetStatusRequest(), timeout=5)


def _until(pred, timeout_s, what, workers):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n"
                         + "\n".join(f"--- {w.wid}\n{w.text()[-2000:]}" for w in workers))


def test_two_workers_share_one_lineage_and_training_survives_kill_9(tansu_broker, tmp_path):
    boot = tansu_broker.bootstrap
    suffix = "." + uuid.uuid4().hex[:8]
    create_topics(boot, {t + suffix: n for t, n in topic_specs(2).items()})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PAIRSIEVE_KAFKA_BOOTSTRAP": boot,
           "PAIRSIEVE_TOPIC_SUFFIX": suffix, "PAIRSIEVE_FEATURES_PARTITIONS": "2",
           "PAIRSIEVE_GROUP_ID": "lineage-" + uuid.uuid4().hex[:6],
           "PAIRSIEVE_GRPC_PORT": "0", "PAIRSIEVE_GRPC_HOST": "127.0.0.1",
           "PAIRSIEVE_METRICS_PORT": "0", "PAIRSIEVE_METRICS_HOST": "127.0.0.1",
           "PAIRSIEVE_MODALITIES": "image:12,text:8", "PAIRSIEVE_EMBEDDING_DIM": "8",
           "PAIRSIEVE_WARMUP_ACCEPTS": "0", "PAIRSIEVE_EXPLORE_FRACTION": "0",
           "PAIRSIEVE_TARGET_RATE": "1.0", "PAIRSIEVE_RETRAIN_EVERY_PAIRS": "20",
           "PAIRSIEVE_LEARNER": "ridge", "PAIRSIEVE_SELF_LEARNING": "off",
           "PAIRSIEVE_DEVICE": "cpu", "PAIRSIEVE_SHUTDOWN_GRACE_SECONDS": "5",
           "PAIRSIEVE_LOG_LEVEL": "INFO"}
    workers = [_Worker(f"w{i}", env, str(tmp_path / f"w{i}.log")) for i in range(2)]
    try:
        for w in workers:
            w.wait_serving()
        evs = _image_events(range(120))
        p = KafkaProducer(bootstrap_servers=boot, acks="all")
        for i, ev in enumerate(evs):  # both partitions: both workers decide
            p.send(FEATURES_TOPIC + suffix, codecs.encode_feature_event(ev), partition=i % 2)
        p.flush()
        reqs = read_all(boot, REQUESTS_TOPIC + suffix, 120, 60.0)
        assert len(reqs) == 120
        produce(boot, LABELS_TOPIC + suffix, _labels(range(40)))

        first_seen: dict[tuple[int, int], float] = {}  # (worker, version) -> first poll

        def same_version():
            sts = [w.status() for w in workers]
            now = time.monotonic()
            for i, st in enumerate(sts):
                first_seen.setdefault((i, st.model_version), now)
            vs = {st.model_version for st in sts}
            ok = len(vs) == 1 and min(vs) >= 2 and all(st.pairs_acquired == 40 for st in sts)
            return sts if ok else None
        sts = _until(same_version, 120, "both workers on version >= 2 with 40 pairs", workers)
        # every version both workers ran reached the second one within seconds of the first
        both = {v for (i, v) in first_seen if i == 0} & {v for (i, v) in first_seen if i == 1}
        lags = [abs(first_seen[(0, v)] - first_seen[(1, v)]) for v in both if v > 0]
        assert lags and max(lags) < 5.0, (sorted(first_seen.items()), lags)
        trainers = [w for w, st in zip(workers, sts, strict=True) if st.trainer]
        assert len(trainers) == 1, [st.trainer for st in sts]
        assert sts[0].validation_recall == sts[1].validation_recall  # one lineage, one measure
        version = sts[0].model_version
        trainer = trainers[0]
        survivor = next(w for w in workers if w is not trainer)

        trainer.proc.send_signal(signal.SIGKILL)
        trainer.proc.wait(10)
        produce(boot, LABELS_TOPIC + suffix, _labels(range(40, 80)))

        def took_over():
            st = survivor.status()
            return st if (st.trainer and st.pairs_acquired == 80
                          and st.model_version > version) else None
        st = _until(took_over, 180, "the survivor to train a newer version", workers)

        back = _Worker(trainer.wid, env, trainer.log_path)  # the killed worker comes back
        workers[workers.index(trainer)] = back
        back.wait_serving()
        again = _until(lambda: (lambda b: b if b.model_version >= st.model_version else None)(
            back.status()), 60, "the restarted worker to load the newest version", workers)
        assert again.pairs_acquired == 80  # nothing acquired before the kill was lost
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.proc.wait(30)
            except subprocess.TimeoutExpired:
                w.proc.kill()
