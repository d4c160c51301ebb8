"""SelectionHandler with fake publishers and metrics (no Kafka, no gRPC).

Covers dedup by event id, publish-then-commit, validation, labels -> pairs -> retrain -> hot
swap, remote selections, pool mode and a failing retrain.
"""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch

from service.alignment import AlignmentTrainer
from service.core.budget import BudgetConfig
from service.core.pool import STRATEGIES
from service.core.selector import SelectorConfig, StreamingSelector
from service.handlers import SelectionHandler
from service.messages import (
    IncomingEvent,
    Label,
    LabelResult,
    ModelRelease,
    NullMetrics,
    NullPublisher,
    PartialPublish,
)
from tests.support import DIMS, SharedLedger
from tests.support import data_and_model as _data_and_model

WORKER = "w-test"


# --------------------------------------------------------------------------- fixtures / fakes


class RecordingPublisher(NullPublisher):
    def __init__(self):
        self.published = []
        self.logged = []  # event ids of the decision records
        self.calls = 0

    async def publish_requests(self, requests):
        self.calls += 1
        self.published.extend(requests)

    async def publish_decisions(self, outcomes, decided_at):
        self.logged += [o.event_id for o in outcomes]


class FailingPublisher(NullPublisher):
    def __init__(self):
        self.calls = 0
        self.attempted = []

    async def publish_requests(self, requests):
        self.calls += 1
        self.attempted.extend(requests)
        raise ConnectionError("broker unreachable")


class RecordingMetrics(NullMetrics):
    def __init__(self):
        self.batches, self.states, self.labels, self.retrains = [], [], [], []

    def batch_decided(self, outcomes, latencies_s, scoring_s):
        self.batches.append((list(outcomes), list(latencies_s), scoring_s))

    def engine_state(self, status):
        self.states.append(status)

    def labels_received(self, status, n=1):
        self.labels.append((status, n))

    def retrained(self, version, seconds, ok):
        self.retrains.append((version, seconds, ok))


@pytest.fixture
def make():
    """Builds handlers (fresh selector each) and closes their executors afterwards."""
    built = []

    def _make(publisher=None, metrics=None, *, total=30, worker_id=WORKER, retrain_every=1000,
              on_model=None, clock=None):
        _, _, model = _data_and_model()
        cfg = SelectorConfig(index_size=128, cache_capacity=64,
                             budget=BudgetConfig(total=total, target_rate=0.5, min_history=8,
                                                 window=64, explore=0.0, warmup_accepts=4))
        sel = StreamingSelector(copy.deepcopy(model), cfg, seed=0, device="cpu")
        kw = {} if clock is None else {"clock": clock}
        h = SelectionHandler(sel, AlignmentTrainer(DIMS, seed=0), publisher, metrics,
                             worker_id=worker_id, retrain_every=retrain_every, on_model=on_model,
                             validation_share=0.0, **kw)
        built.append(h)
        return h

    yield _make
    for h in built:
        h.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def _vec(i, modality):
    a, b, _ = _data_and_model()
    return (a[i] if modality == "image" else b[i]).copy()


def _ev(i, modality=None, *, event_id=None, vector=None, item_id=None, event_time=None):
    modality = modality or ("image" if i % 2 == 0 else "text")
    vector = _vec(i, modality) if vector is None else vector
    return IncomingEvent(event_id=f"ev-{i}" if event_id is None else event_id,
                         item_id=item_id or f"{modality[0]}{i}", modality=modality,
                         vector=vector, event_time=event_time, source="test")


def _evs(lo, hi):
    return [_ev(i) for i in range(lo, hi)]


def _partner(decision):
    """The true partner (other modality, same row) of a decided item ``i<n>`` / ``t<n>``."""
    n = int(decision.item_id[1:])
    other = "text" if decision.modality == "image" else "image"
    return f"{other[0]}{n}-partner", _vec(n, other)


def _snap(h):
    """Everything a failed/rejected call must leave untouched."""
    return (repr(h.status()),
            [c.embeddings.clone() for c in h.selector.caches.values()],
            [c.size for c in h.selector.caches.values()],
            [i.count for i in h.selector.scorer._index.values()],
            len(h._decided), len(h.learning.items), len(h.learning.pairs))


def _same(s1, s2):
    assert s1[0] == s2[0]
    assert all(torch.equal(x, y) for x, y in zip(s1[1], s2[1], strict=True))
    assert s1[2:] == s2[2:]


def _min_dist(h, modality, vec):
    z = h.model.embed(modality, np.asarray(vec, np.float32)[None, :])
    return float(h.selector.caches[modality].min_distance(z)[0])


# --------------------------------------------------------------------------- decisions / publishing
def test_accepted_are_published_once_skips_not_and_order_kept(make):
    pub, met = RecordingPublisher(), RecordingMetrics()
    h = make(pub, met)
    evs = _evs(0, 20)
    outs = run(h.submit(evs))

    assert [o.event_id for o in outs] == [e.event_id for e in evs]
    assert [o.decision.item_id for o in outs] == [e.item_id for e in evs]
    assert [o.decision.modality for o in outs] == [e.modality for e in evs]
    assert all(o.worker_id == WORKER and not o.duplicate for o in outs)
    accepted = [o.event_id for o in outs if o.decision.accept]
    assert 0 < len(accepted) < len(evs)  # both kinds present in this batch

    assert pub.calls == 1
    assert [r.request_id for r in pub.published] == accepted  # once each, in event order
    by_id = {o.event_id: o for o in outs}
    for r in pub.published:
        assert r.outcome == by_id[r.request_id] and r.outcome.worker_id == WORKER
        ev = evs[int(r.request_id.split("-")[1])]
        assert (r.item_id, r.modality) == (ev.item_id, ev.modality)
        np.testing.assert_array_equal(r.vector, ev.vector)
        assert len(r.candidates) <= h.candidates_k

    st = h.status()
    assert st.spent == len(accepted) and st.seen == len(evs)
    assert st.worker_id == WORKER
    assert met.batches[-1][0] == outs

    # a second batch publishes only its own accepted events
    outs2 = run(h.submit(_evs(20, 30)))
    acc2 = [o.event_id for o in outs2 if o.decision.accept]
    assert [r.request_id for r in pub.published] == accepted + acc2
    assert pub.calls == (2 if acc2 else 1)


def test_latencies_from_event_time_reach_metrics(make):
    met = RecordingMetrics()
    h = make(RecordingPublisher(), met, clock=lambda: 1000.0)
    run(h.submit([_ev(0, event_time=990.0), _ev(1), _ev(2, event_time=999.5)]))
    assert met.batches[-1][1] == [10.0, 0.5]
    assert met.states and met.states[-1].seen == 3


# --------------------------------------------------------------------------- redelivery
def test_redelivery_returns_same_decisions_publishes_and_spends_nothing(make):
    pub = RecordingPublisher()
    h = make(pub)
    evs = _evs(0, 16)
    first = run(h.submit(evs))
    calls, n_pub = pub.calls, len(pub.published)
    before = _snap(h)

    again = run(h.submit(evs))
    assert [o.event_id for o in again] == [e.event_id for e in evs]
    assert all(o.duplicate for o in again)
    assert [o.decision for o in again] == [o.decision for o in first]
    assert all(o.worker_id == WORKER for o in again)
    assert (pub.calls, len(pub.published)) == (calls, n_pub)
    _same(before, _snap(h))

    # partly redelivered: old ones duplicates, new ones decided afresh
    mixed = run(h.submit(evs[:4] + _evs(16, 20)))
    assert [o.duplicate for o in mixed] == [True] * 4 + [False] * 4
    assert [o.decision for o in mixed[:4]] == [o.decision for o in first[:4]]
    assert h.status().seen == 20


def test_duplicates_inside_one_batch(make):
    pub = RecordingPublisher()
    h = make(pub)
    e0, e1, e2 = _ev(0), _ev(1), _ev(2)
    outs = run(h.submit([e0, e1, e0, e2, e1, e0]))
    assert [o.event_id for o in outs] == ["ev-0", "ev-1", "ev-0", "ev-2", "ev-1", "ev-0"]
    assert [o.duplicate for o in outs] == [False, False, True, False, True, True]
    assert outs[2].decision == outs[0].decision == outs[5].decision
    assert outs[4].decision == outs[1].decision
    st = h.status()
    assert st.seen == 3
    n_acc = sum(o.decision.accept for o in outs[:2] + outs[3:4])
    assert st.spent == n_acc
    ids = [r.request_id for r in pub.published]
    assert len(ids) == len(set(ids)) == n_acc


# --------------------------------------------------------------------------- publish failure
def test_publish_failure_commits_nothing_and_retry_publishes_once(make):
    good, bad = RecordingPublisher(), FailingPublisher()
    h = make(good)
    n_warm = len(good.published)
    evs = _evs(0, 20)  # cold engine: warm-up accepts some of these at random
    before = _snap(h)
    spent0 = h.status().spent

    h.publisher = bad
    with pytest.raises(ConnectionError, match="broker unreachable"):
        run(h.submit(evs))
    _same(before, _snap(h))
    assert bad.calls == 1 and bad.attempted  # the accepted events were offered, then lost

    h.publisher = good
    outs = run(h.submit(evs))
    assert not any(o.duplicate for o in outs)  # the failed attempt remembered nothing
    accepted = [o.event_id for o in outs if o.decision.accept]
    assert [r.request_id for r in good.published[n_warm:]] == accepted
    # same state, same batch -> the retry decided exactly what the failed attempt proposed
    assert [r.request_id for r in bad.attempted] == accepted
    assert h.status().spent == spent0 + len(accepted)
    assert h.status().seen == 20

    # a redelivery after that is a duplicate and published nowhere
    calls = good.calls
    again = run(h.submit(evs))
    assert all(o.duplicate for o in again) and good.calls == calls


# --------------------------------------------------------------------------- bad input
BAD_EVENTS = {
    "empty batch": (lambda: [], "empty batch"),
    "unknown modality": (lambda: [_ev(0), _ev(2, "audio", vector=np.zeros(12, np.float32))],
                         "unknown modality 'audio'"),
    "wrong dimension": (lambda: [_ev(1), _ev(2, "image", vector=np.zeros(5, np.float32))],
                        "wrong dimension 5, expected 12"),
    "NaN": (lambda: [_ev(0), _ev(3, "text", vector=np.full(8, np.nan, np.float32))],
            "NaN or inf"),
    "inf": (lambda: [_ev(4, "image", vector=np.array([0.0] * 11 + [np.inf], np.float32))],
            "NaN or inf"),
    "missing event_id": (lambda: [_ev(0), _ev(1, event_id="")], "missing event_id"),
    "missing item_id": (lambda: [IncomingEvent("ev-x", "", "image", _vec(0, "image"))],
                        "missing item_id"),
}


@pytest.mark.parametrize("case", list(BAD_EVENTS))
def test_bad_input_raises_value_error_and_changes_nothing(make, case):
    build, msg = BAD_EVENTS[case]
    pub = RecordingPublisher()
    h = make(pub)
    run(h.submit(_evs(100, 110)))
    calls = pub.calls
    before = _snap(h)
    with pytest.raises(ValueError, match=msg):
        run(h.submit(build()))
    _same(before, _snap(h))
    assert pub.calls == calls
    # the good events of the rejected batch were not remembered: they are decided normally later
    outs = run(h.submit([_ev(0), _ev(1)]))
    assert not any(o.duplicate for o in outs)


def test_finite_overflowing_vector_does_not_poison_the_engine(make):
    h = make(RecordingPublisher())
    big = _ev(0, "image", event_id="ev-big", vector=np.full(12, 3e38, np.float32))
    before = _snap(h)
    try:
        outs = run(h.submit([big, _ev(1)]))
    except ValueError as exc:  # rejecting it is fine, if clean and explicit
        _same(before, _snap(h))
        assert "ev-big" in str(exc), str(exc)
    else:
        for o in outs:
            d = o.decision
            assert all(np.isfinite(v) for v in (d.utility, d.diversity, d.uncertainty)), d
    for lo in range(10, 60, 10):  # the stream goes on
        outs = run(h.submit(_evs(lo, lo + 10)))
        assert len(outs) == 10


# --------------------------------------------------------------------------- labels, retraining
def test_labels_build_pairs_and_retrain_hot_swaps_the_model(make):
    models, met, pub = [], RecordingMetrics(), RecordingPublisher()
    h = make(pub, met, retrain_every=3, on_model=models.append)

    async def body():
        outs = await h.submit(_evs(0, 20))
        acc = [o.decision for o in outs if o.decision.accept]
        assert len(acc) >= 4
        labels = []
        for d in acc[:4]:
            pid, pvec = _partner(d)
            labels.append(Label(item_id=d.item_id, modality=d.modality, partner_item_id=pid,
                                status="MATCH", request_id=d.item_id, partner_vector=pvec))
        r1 = await h.report_alignment(labels[:2])
        assert r1 == LabelResult(accepted=2, ignored=0, model_version=1)
        assert h.status().pairs_acquired == 2 and h.learning.training is None
        # the same label again (same request id) is a duplicate: no second pair, not counted
        r_dup = await h.report_alignment(labels[:1])
        assert (r_dup.duplicates == 1 and r_dup.accepted == 0
                and h.status().pairs_acquired == 2 and h.learning.training is None)
        # a revealed partner is now in that modality's selected-set cache
        other = h.model.other(labels[0].modality)
        assert _min_dist(h, other, labels[0].partner_vector) < 1e-3

        r2 = await h.report_alignment(labels[2:3])  # third pair -> retrain starts
        assert r2.accepted == 1 and h.status().pairs_acquired == 3
        assert h.learning.training is not None
        await h.wait_for_training()
        assert h.model_version == 2
        assert h.status().model_version == 2
        assert len(models) == 1 and models[0].version == 2 and models[0] is h.model
        assert [(v, ok) for v, _, ok in met.retrains] == [(2, True)]

        later = await h.submit(_evs(40, 46))
        assert all(o.decision.model_version == 2 for o in later)

        # one more pair is below retrain_every: no second retrain
        await h.report_alignment(labels[3:4])
        await h.wait_for_training()
        assert h.model_version == 2 and len(models) == 1
        assert h.status().labels == {"MATCH": 4, "NO_MATCH": 0, "UNSURE": 0}
        assert met.labels == [("MATCH", 1)] * 4

    run(body())


def test_label_statuses_unknown_partners_and_unknown_status(make):
    met = RecordingMetrics()
    h = make(RecordingPublisher(), met)

    async def body():
        await h.submit(_evs(0, 10))
        img = "i0"
        res = await h.report_alignment([
            Label(img, "image", "t1", "NO_MATCH"),
            Label(img, "image", "t1", "UNSURE"),
        ])
        assert res == LabelResult(0, 2, 1)
        assert h.status().pairs_acquired == 0
        assert h.status().labels == {"MATCH": 0, "NO_MATCH": 1, "UNSURE": 1}

        # partner never seen and no vector given -> unresolved, saying why
        res = await h.report_alignment([Label(img, "image", "t-never-seen", "MATCH")])
        assert (res.accepted, res.ignored, len(res.unresolved)) == (0, 0, 1)
        assert "send its vector in partner_vector" in res.unresolved[0]
        # item never seen -> unresolved (even with a partner vector)
        res = await h.report_alignment([Label("i-unknown", "image", "t3", "MATCH",
                                              partner_vector=_vec(3, "text"))])
        assert (res.accepted, len(res.unresolved)) == (0, 1)
        # MATCH without a partner id -> unresolved
        res = await h.report_alignment([Label(img, "image", "", "MATCH",
                                              partner_vector=_vec(0, "text"))])
        assert res.unresolved == ("MATCH label for 'i0' (image): no partner_item_id",)
        # partner seen in the stream (t1 is a text event of this worker) -> its vector is used
        res = await h.report_alignment([Label(img, "image", "t1", "MATCH")])
        assert (res.accepted, res.ignored) == (1, 0)
        # text-side label with an image partner vector
        res = await h.report_alignment([Label("t3", "text", "i3-p", "MATCH",
                                              partner_vector=_vec(3, "image"))])
        assert (res.accepted, res.ignored) == (1, 0)
        assert h.status().pairs_acquired == 2

        before = _snap(h)
        with pytest.raises(ValueError, match=r"unknown status 'MAYBE'"):
            await h.report_alignment([Label(img, "image", "t1", "MATCH"),
                                      Label(img, "image", "t1", "MAYBE")])
        with pytest.raises(ValueError, match="unknown modality 'audio'"):
            await h.report_alignment([Label(img, "audio", "t1", "MATCH")])
        _same(before, _snap(h))
        assert h.status().labels == {"MATCH": 5, "NO_MATCH": 1, "UNSURE": 1}

    run(body())


def test_status_never_shows_a_version_with_its_predecessors_recall(make, monkeypatch):
    """The selector's version changes inside the executor, before the learning loop sets the new
    recall; a status served in between showed the new version with the old recall (a flaky
    two-worker integration test found it). It reports the pair in use until the swap is done."""
    import threading
    h = make()
    entered, release = threading.Event(), threading.Event()
    swap = h.selector.set_model

    def slow_swap(model):
        swap(model)  # the selector's version is the new one from here
        entered.set()
        release.wait(10)
    monkeypatch.setattr(h.selector, "set_model", slow_swap)
    newer = copy.deepcopy(h.selector.model)
    newer.version = h.selector.model_version + 5
    before = h.status()

    async def go():
        task = asyncio.ensure_future(h.learning.offer_model(
            ModelRelease(newer, pairs_seen=3, validation_pairs=4,
                         validation_recall={1: 0.5}, worker_id="w9", trained_at=1.0)))
        while not entered.is_set():
            await asyncio.sleep(0.005)
        assert h.selector.model_version == newer.version  # the race window is open
        during = h.status()
        release.set()
        assert await task is True
        return during

    during = asyncio.run(go())
    assert (during.model_version, during.validation_recall) == (before.model_version,
                                                                 before.validation_recall)
    after = h.status()
    assert (after.model_version, after.validation_recall) == (newer.version, {1: 0.5})


def test_failed_retrain_keeps_model_and_stream_running(make, monkeypatch):
    models, met, pub = [], RecordingMetrics(), RecordingPublisher()
    h = make(pub, met, retrain_every=2, on_model=models.append)

    def boom(*a, **k):
        raise RuntimeError("trainer exploded")

    monkeypatch.setattr(h.trainer, "fit", boom)

    async def body():
        outs = await h.submit(_evs(0, 20))
        acc = [o.decision for o in outs if o.decision.accept][:2]
        labels = [Label(d.item_id, d.modality, _partner(d)[0], "MATCH",
                        partner_vector=_partner(d)[1]) for d in acc]
        res = await h.report_alignment(labels)
        assert res.accepted == 2
        await h.wait_for_training()
        assert h.model_version == 1 and not models
        assert len(met.retrains) == 1
        version, seconds, ok = met.retrains[0]
        assert (version, ok) == (1, False) and seconds >= 0
        later = await h.submit(_evs(20, 30))
        assert len(later) == 10 and all(o.decision.model_version == 1 for o in later)
        assert h.status().seen == 30

    run(body())


# --------------------------------------------------------------------------- scale-out
def test_remote_selection_counts_here_and_dedups_its_event(make):
    other = make(RecordingPublisher(), worker_id="w-other")
    pub = RecordingPublisher()
    h = make(pub)

    async def body():
        await h.submit(_evs(100, 110))
        outs = await other.submit(_evs(0, 20))
        o = next(x for x in outs if x.decision.accept)
        i = int(o.event_id[3:])
        vec = _vec(i, o.decision.modality)
        st0 = h.status()
        d0 = _min_dist(h, o.decision.modality, vec)
        assert d0 > 1e-2

        assert await h.observe_remote_selection(o, vec) is True
        st1 = h.status()
        assert st1.spent == st0.spent + 1
        assert st1.seen == st0.seen  # not decided here
        assert _min_dist(h, o.decision.modality, vec) < 1e-3

        calls = pub.calls
        again = await h.submit([_ev(i)])
        assert again[0].duplicate and again[0].decision == o.decision
        assert again[0].worker_id == "w-other"
        assert pub.calls == calls
        assert h.status().spent == st1.spent and h.status().seen == st1.seen
        # folding the same remote selection twice changes nothing
        before = _snap(h)
        assert await h.observe_remote_selection(o, vec) is False
        _same(before, _snap(h))

    run(body())


def test_a_worker_over_the_total_keeps_deciding_and_logging(make):
    """A worker whose view of the shared budget is over the total (another worker's accept
    raced its own: README, Scale-out) keeps deciding every event: skips, logged, nothing spent.
    (Its budget used to refuse every commit, and the stream dead-lettered each batch.)"""
    mine = RecordingPublisher()
    h, other = make(mine, total=6), make(RecordingPublisher(), total=6, worker_id="w-other")

    async def body():
        await h.submit(_evs(0, 8))  # spends part of the budget here
        outs = await other.submit(_evs(100, 140))  # the other worker spends all of its own
        for o in outs:  # ... and this worker folds them all in: over the total
            if o.decision.accept:
                i = int(o.event_id[3:])
                await h.observe_remote_selection(o, _vec(i, o.decision.modality))
        st = h.status()
        assert st.spent > st.budget_total
        spent, n_req = st.spent, len(mine.published)
        later = await h.submit(_evs(200, 260))
        assert len(later) == 60 and not any(x.decision.accept for x in later)
        assert {x.decision.reason for x in later} == {"skip:budget_exhausted"}
        assert h.status().spent == spent and len(mine.published) == n_req
        assert set(mine.logged) >= {f"ev-{i}" for i in range(200, 260)}

    run(body())


def test_own_selection_read_back_is_skipped(make):
    h = make(RecordingPublisher())

    async def body():
        outs = await h.submit(_evs(0, 20))
        o = next(x for x in outs if x.decision.accept)
        before = _snap(h)
        assert await h.observe_remote_selection(o, _vec(int(o.event_id[3:]),
                                                         o.decision.modality)) is False
        _same(before, _snap(h))

    run(body())


class ReadBackPublisher(NullPublisher):
    """Like Kafka + the SelectionFollower on the same worker: once a request is durably
    written, the follower (another task on the same loop) can read it back right away."""

    def __init__(self):
        self.handler = None
        self.published = []
        self.readbacks = []

    async def publish_requests(self, requests):
        self.published.extend(requests)
        for r in requests:
            self.readbacks.append(asyncio.ensure_future(
                self.handler.observe_remote_selection(r.outcome, r.vector)))


def test_own_selection_read_back_during_submit_is_not_counted_twice(make):
    pub = ReadBackPublisher()
    h = make(pub)
    pub.handler = h

    async def body():
        outs = await h.submit(_evs(0, 20))
        n_acc = sum(o.decision.accept for o in outs)
        assert n_acc > 0 and len(pub.readbacks) == n_acc
        folded = await asyncio.gather(*pub.readbacks)
        assert h.status().spent == n_acc
        assert not any(folded)

    run(body())


# --------------------------------------------------------------------------- pool mode
@pytest.mark.parametrize("strategy", ["default", "random", "coreset", "entropy"])
def test_select_pool_returns_budget_distinct_candidates(make, strategy):
    h = make(RecordingPublisher())
    run(h.submit(_evs(100, 120)))
    ids = [f"c{i}" for i in range(30)]
    mods = ["image" if i % 2 == 0 else "text" for i in range(30)]
    vecs = [_vec(200 + i, m) for i, m in enumerate(mods)]
    before = _snap(h)
    picks = run(h.select_pool(ids, mods, vecs, budget=6, strategy=strategy, seed=1))
    assert len(picks) == 6 and len(set(picks)) == 6 and set(picks) <= set(ids)
    _same(before, _snap(h))  # pool mode spends nothing of the stream budget


def test_select_pool_errors(make):
    h = make()
    with pytest.raises(ValueError) as ei:
        run(h.select_pool(["a"], ["image"], [_vec(0, "image")], 1, strategy="nope"))
    msg = str(ei.value)
    assert "unknown pool strategy 'nope'" in msg
    for name in list(STRATEGIES) + ["default"]:
        assert name in msg
    with pytest.raises(ValueError, match="no candidates"):
        run(h.select_pool([], [], [], 1))
    with pytest.raises(ValueError, match="budget must be >= 0"):
        run(h.select_pool(["a"], ["image"], [_vec(0, "image")], -1))
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        run(h.select_pool(["a"], ["audio"], [_vec(0, "image")], 1))
    assert run(h.select_pool(["a", "b"], ["image", "text"],
                             [_vec(0, "image"), _vec(1, "text")], 0)) == []


def test_constructor_rejects_bad_retrain_every():
    _, _, model = _data_and_model()
    sel = StreamingSelector(copy.deepcopy(model), SelectorConfig(index_size=16, cache_capacity=8),
                            device="cpu")
    with pytest.raises(ValueError, match="retrain_every must be >= 1"):
        SelectionHandler(sel, AlignmentTrainer(DIMS), retrain_every=0)



class DecisionLog(NullPublisher):
    def __init__(self):
        self.logged = []

    async def publish_decisions(self, outcomes, decided_at):
        self.logged.extend((o.event_id, o.decision.accept, decided_at) for o in outcomes)


def test_every_fresh_decision_is_logged_and_logged_skips_answer_redeliveries(make):
    pub = DecisionLog()
    h = make(pub, clock=lambda: 123.0)

    async def body():
        outs = await h.submit(_evs(0, 20))
        assert sorted(e for e, _, _ in pub.logged) == sorted(o.event_id for o in outs)
        assert all(at == 123.0 for _, _, at in pub.logged)
        await h.submit(_evs(0, 4))  # a redelivery: answered from memory, not logged again
        assert len(pub.logged) == 20
        # a fresh worker (a restart) replays the log: skips are remembered, accepts are not
        # (their spend comes from the requests topic)
        h2 = make(DecisionLog())
        skips = [o for o in outs if not o.decision.accept]
        assert skips and await h2.observe_remote_decisions(outs) == len(skips)
        again = await h2.submit(_evs(0, 20))
        assert [o.duplicate for o in again] == [not o.decision.accept for o in outs]
        assert [o.decision.reason for o in again if o.duplicate] == \
            [o.decision.reason for o in skips]

    run(body())


def test_a_selection_known_only_from_the_requests_topic_is_logged_when_redelivered(make):
    """A worker killed between writing a request and its decision record: after the restart the
    selection comes back from the requests topic, and its redelivered event (answered as a
    duplicate) writes the missing decision record, once."""
    other = make(RecordingPublisher(), worker_id="w-killed")
    pub = DecisionLog()
    h = make(pub, clock=lambda: 7.0)

    async def body():
        outs = await other.submit(_evs(0, 20))
        accepted = [o for o in outs if o.decision.accept]
        assert len(accepted) >= 3
        a, b = accepted[:2]
        for o in (a, b):
            assert await h.observe_remote_selection(o, _vec(int(o.event_id[3:]),
                                                             o.decision.modality))
        # the decision log's tail holds b (read back by the decisions follower), not a
        assert await h.observe_remote_decisions([b]) == 0
        got = await h.submit([_ev(int(a.event_id[3:])), _ev(int(b.event_id[3:]))])
        assert [o.duplicate for o in got] == [True, True]
        assert pub.logged == [(a.event_id, True, 7.0)]
        await h.submit([_ev(int(a.event_id[3:]))])  # a second redelivery: logged already
        assert pub.logged == [(a.event_id, True, 7.0)]
        # the decision log read before the request is folded in (the followers race): known
        c = accepted[2]
        assert await h.observe_remote_decisions([c]) == 0
        assert await h.observe_remote_selection(c, _vec(int(c.event_id[3:]),
                                                         c.decision.modality))
        assert (await h.submit([_ev(int(c.event_id[3:]))]))[0].duplicate
        assert pub.logged == [(a.event_id, True, 7.0)]

    run(body())


def _dedup_state(h):
    return (list(h._decided._lru.items()), list(h._logged_accepts.items()))


def test_a_decision_record_the_handler_holds_as_logged_changes_nothing_when_folded(make):
    """The decisions follower skips decoding a record when ``holds_logged_decision`` says so
    (a worker reads its own log back): folding any such record, accept or skip, whatever it
    says, must leave the dedup memory as it was; the ids it refuses are the ones a fold
    changes."""
    other = make(RecordingPublisher(), worker_id="w-other")
    h = make(DecisionLog())

    async def body():
        mine = await h.submit(_evs(0, 12))  # decided and logged here
        theirs = await other.submit(_evs(20, 40))
        sel = [o for o in theirs if o.decision.accept]
        assert len(sel) >= 2 and any(not o.decision.accept for o in theirs)
        # a selection known from the requests topic only: remembered, not yet logged
        assert await h.observe_remote_selection(sel[0], _vec(int(sel[0].event_id[3:]),
                                                             sel[0].decision.modality))
        assert not h.holds_logged_decision(sel[0].event_id)  # its record must be read
        assert not h.holds_logged_decision(theirs[-1].event_id)  # unknown here
        flipped = [type(o)(o.event_id, other_decision, o.duplicate, o.worker_id)
                   for o, other_decision in zip(mine, [t.decision for t in theirs], strict=False)]
        held, changed = 0, 0
        for record in [*mine, *flipped, *theirs]:
            before = _dedup_state(h)
            skip = h.holds_logged_decision(record.event_id)
            await h.observe_remote_decisions([record])
            if skip:
                held += 1
                assert _dedup_state(h) == before, record
            elif _dedup_state(h) != before:
                changed += 1
        assert held == 2 * len(mine)  # own records, as logged and with another verdict
        assert changed >= 1  # the others' skips are remembered
        assert h.holds_logged_decision(sel[0].event_id)  # its record marked it logged

    run(body())


def test_requests_written_before_a_failed_publish_reach_the_log_on_the_retry(make):
    """A publish that failed part-way folds in the requests the broker acknowledged; the retry
    answers them as duplicates and logs their decisions (no verdict missing from the log)."""

    class HalfThenLog(DecisionLog):
        failed = False

        async def publish_requests(self, requests):
            if not self.failed:
                self.failed = True
                raise PartialPublish(list(range(len(requests))), RuntimeError("broker gone"))

    pub = HalfThenLog()
    h = make(pub)

    async def body():
        with pytest.raises(PartialPublish):
            await h.submit(_evs(0, 20))
        assert pub.logged == []
        again = await h.submit(_evs(0, 20))
        logged = {e for e, _, _ in pub.logged}
        assert logged == {o.event_id for o in again}
        assert len(pub.logged) == len(logged)

    run(body())


# --------------------------------------------------------------------------- budget ledger


def test_two_workers_that_never_see_each_other_spend_the_total_exactly_with_a_ledger(make):
    """The worst case of the race (neither worker ever folds in the other's selections): each
    alone would spend the whole total; with the ledger they spend it once, together."""
    def spend(ledger):
        pubs = [RecordingPublisher(), RecordingPublisher()]
        hs = [make(pubs[0], total=6), make(pubs[1], total=6, worker_id="w-other")]
        if ledger is not None:
            for h in hs:
                h.shared_budget = ledger

        async def body():
            outs = await asyncio.gather(hs[0].submit(_evs(0, 40)), hs[1].submit(_evs(100, 140)))
            outs += await asyncio.gather(hs[0].submit(_evs(40, 80)),
                                         hs[1].submit(_evs(140, 180)))
            return [o for batch in outs for o in batch]

        outs = run(body())
        requested = [r.request_id for p in pubs for r in p.published]
        accepted = [o.event_id for o in outs if o.decision.accept]
        assert sorted(requested) == sorted(accepted)  # a request for every accept, no other
        return requested, outs, hs

    requested, _, _ = spend(None)
    assert len(requested) == 12  # the control: each worker spent its view of the total
    ledger = SharedLedger(6)
    requested, outs, hs = spend(ledger)
    assert len(set(requested)) == len(requested) == 6
    assert ledger.ledger.granted == 6
    assert sum(h.status().spent for h in hs) == 6
    denied = [o for o in outs if o.decision.reason == "skip:budget_exhausted"]
    assert denied and not any(o.decision.accept for o in denied)


def test_a_ledger_that_cannot_answer_leaves_nothing_spent_and_a_retry_is_granted_free(make):
    pub = RecordingPublisher()
    h = make(pub, total=30)
    broken = {"on": True}

    class Unreachable(SharedLedger):
        async def reserve(self, ids):
            if broken["on"]:
                self.tried = list(ids)
                raise PartialPublish((), TimeoutError("ledger not read back"))
            return await super().reserve(ids)

    h.shared_budget = ledger = Unreachable(30)

    async def body():
        before = _snap(h)
        with pytest.raises(PartialPublish):
            await h.submit(_evs(0, 30))
        _same(before, _snap(h))
        assert pub.published == [] and pub.logged == []
        # the failed reservation was written all the same (the ledger applied it)
        first = ledger.ledger.apply(ledger.tried, ledger.holder)
        assert all(first) and len(first) < 30
        broken["on"] = False
        outs = await h.submit(_evs(0, 30))
        acc = [o.event_id for o in outs if o.decision.accept]
        assert sorted(acc) == sorted(ledger.tried)  # the same decisions, redelivered
        assert ledger.ledger.granted == len(first)  # the retry took no new unit
        assert sorted(r.request_id for r in pub.published) == sorted(acc)

    run(body())


def _fence_reading(h, *publishers):
    """A publish fence for ``h`` that folds in what ``publishers`` wrote (the selection
    follower reading the requests topic to its end); ``calls`` counts the read-backs."""
    read = {"calls": 0, "at": [0] * len(publishers)}

    async def fence():
        read["calls"] += 1
        for k, p in enumerate(publishers):
            new = p.published[read["at"][k]:]
            read["at"][k] = len(p.published)
            if new:
                await h.observe_remote_selections([(r.outcome, r.vector) for r in new])
        return True

    h.publish_fence = fence
    return read


def test_a_unit_another_worker_reserved_and_requested_is_read_back_not_requested_again(make):
    """The other worker decided and requested these events; they reach this worker (its
    partition moved) before it has read those requests: the foreign-held units make it read the
    requests topic back first, and the events are answered as duplicates."""
    ledger = SharedLedger(30)
    other_pub, pub = RecordingPublisher(), RecordingPublisher()
    other, h = make(other_pub, worker_id="w-other"), make(pub)
    other.shared_budget, h.shared_budget = ledger.view("other"), ledger.view("here")
    read = _fence_reading(h, other_pub)

    async def body():
        first = await other.submit(_evs(0, 30))
        requested = {o.event_id for o in first if o.decision.accept}
        assert requested and {r.request_id for r in other_pub.published} == requested
        again = await h.submit(_evs(0, 30))
        assert read["calls"] == 1
        # none requested again (the others, skipped there, are decided afresh here: this worker
        # has not read the other's decision log in this test)
        assert requested.isdisjoint(r.request_id for r in pub.published)
        assert {o.event_id for o in again if o.duplicate} == requested
        assert all(o.decision.accept for o in again if o.event_id in requested)
        assert ledger.ledger.granted == len(requested) + len(pub.published)

    run(body())


def test_a_unit_whose_first_holder_died_before_publishing_is_requested_after_the_read_back(
        make):
    """The other worker reserved the units and died before its publish: the read-back finds no
    request, and this worker requests the events itself, once, on the units already held."""
    ledger = SharedLedger(30)
    pub = RecordingPublisher()
    dead, h = make(FailingPublisher(), worker_id="w-dead"), make(pub)
    dead.shared_budget, h.shared_budget = ledger.view("dead"), ledger.view("here")
    read = _fence_reading(h)

    async def body():
        with pytest.raises(ConnectionError):
            await dead.submit(_evs(0, 30))
        reserved = dead.shared_budget.calls[0]
        outs = await h.submit(_evs(0, 30))
        assert read["calls"] == 1  # one read-back, then the batch is decided and published
        mine = sorted(r.request_id for r in pub.published)
        assert mine == sorted(reserved) == sorted(o.event_id for o in outs if o.decision.accept)
        assert ledger.ledger.granted == len(reserved)  # no new unit for the same events

    run(body())
