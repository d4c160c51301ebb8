"""LearningLoop in isolation: labels -> published pairs -> retrain -> gate -> one lineage (no
facade, no transport; the publisher is an in-memory recorder)."""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.alignment import AlignmentTrainer
from service.alignment.quality_gate import GateConfig
from service.core.selector import SelectorConfig, StreamingSelector
from service.core.types import FeatureItem
from service.learning_loop import LearningLoop
from service.messages import Label, LabelResult, ModelRelease, TrainingPair
from tests.support import DIMS
from tests.support import data_and_model as _data_and_model


class RecordingMetrics:
    def __init__(self):
        self.labels, self.retrains, self.duplicates, self.judged, self.quality = [], [], 0, [], []
        self.gains = []

    def labels_received(self, status, n=1):
        self.labels.append((status, n))

    def labels_duplicate(self, n=1):
        self.duplicates += n

    def retrained(self, version, seconds, ok):
        self.retrains.append((version, ok))

    def candidate_judged(self, outcome):
        self.judged.append(outcome)

    def model_quality(self, recall, validation_pairs, expected_gain=float("nan"), horizon=0):
        self.quality.append((dict(recall), validation_pairs))
        self.gains.append((expected_gain, horizon))


class RecordingPublisher:
    """Keeps what was published; ``fail`` makes the next calls raise (nothing written)."""

    def __init__(self):
        self.pairs, self.models, self.fail = [], [], False

    async def publish_requests(self, requests):
        return None

    async def publish_pairs(self, pairs):
        if self.fail:
            raise ConnectionError("broker down")
        self.pairs.extend(pairs)

    async def publish_model(self, release):
        if self.fail:
            raise ConnectionError("broker down")
        self.models.append(release)


def _vec(i, modality):
    a, b, _ = _data_and_model()
    return (a[i] if modality == "image" else b[i]).copy()


def _selector():
    _, _, model = _data_and_model()
    return StreamingSelector(copy.deepcopy(model), SelectorConfig(index_size=64, cache_capacity=32),
                             seed=0, device="cpu")


def run_loop(body, **kw):
    """Build a loop (fresh selector, its own executor, lock and publisher) in a running event
    loop and run ``body(loop, metrics, models, publisher)``. Validation is off unless asked."""
    kw.setdefault("validation_share", 0.0)

    async def main():
        metrics, models, pub = RecordingMetrics(), [], RecordingPublisher()
        with ThreadPoolExecutor(max_workers=1) as ex:
            loop = LearningLoop(_selector(), AlignmentTrainer(DIMS, seed=0), executor=ex,
                                lock=asyncio.Lock(), metrics=metrics, on_model=models.append,
                                publisher=pub, worker_id="w1", clock=lambda: 1000.0, **kw)
            return await asyncio.wait_for(body(loop, metrics, models, pub), 30)
    return asyncio.run(main())


def _remember_rows(loop, rows):
    for i in rows:
        loop.remember(f"i{i}", "image", _vec(i, "image"))
        loop.remember(f"t{i}", "text", _vec(i, "text"))


def _match(i, **kw):
    return Label(f"i{i}", "image", f"t{i}", "MATCH", request_id=kw.pop("request_id", f"r{i}"),
                 **kw)


def _pair(i, request_id=None):
    return TrainingPair(f"i{i}", f"t{i}", _vec(i, "image"), _vec(i, "text"),
                        request_id=request_id or f"r{i}", labeled_item_id=f"i{i}")


def test_match_labels_become_published_pairs_keyed_in_modality_order():
    async def body(loop, metrics, models, pub):
        _remember_rows(loop, range(4))
        res = await loop.add_labels([
            Label("i0", "image", "t0", "MATCH", request_id="r0", annotator="ann", cost=2.5),
            Label("t1", "text", "i1", "MATCH", request_id="r1"),      # text-side label
            Label("i2", "image", "t2-new", "MATCH", partner_vector=_vec(2, "text")),
            Label("i3", "image", "t3", "NO_MATCH"),
            Label("i3", "image", "t3", "UNSURE"),
        ])
        assert res == LabelResult(accepted=3, ignored=2, model_version=1)
        assert loop.pairs_acquired == 3
        # one key per pair, whichever side was labelled: (image item, text item)
        assert set(loop.pairs) == {("i0", "t0"), ("i1", "t1"), ("i2", "t2-new")}
        for key, row in ((("i0", "t0"), 0), (("i1", "t1"), 1), (("i2", "t2-new"), 2)):
            np.testing.assert_array_equal(loop.pairs[key].vector_a, _vec(row, "image"))
            np.testing.assert_array_equal(loop.pairs[key].vector_b, _vec(row, "text"))
        p0 = loop.pairs[("i0", "t0")]
        assert (p0.request_id, p0.annotator, p0.cost, p0.worker_id, p0.labeled_item_id,
                p0.labeled_at) == ("r0", "ann", 2.5, "w1", "i0", 1000.0)
        assert loop.pairs[("i1", "t1")].labeled_item_id == "t1"
        # published before they were stored, all three, and the NO_MATCH as a partnerless record
        assert [p.key for p in pub.pairs] == [("i0", "t0"), ("i1", "t1"), ("i2", "t2-new"),
                                              ("i3", "")]
        assert pub.pairs[-1].partnerless and set(loop.partnerless) == {("i3", "")}
        assert "t2-new" in loop.items and loop.items["t2-new"][0] == "text"
        assert loop.labels_by_status == {"MATCH": 3, "NO_MATCH": 1, "UNSURE": 1}
        assert [s for s, _ in metrics.labels] == ["MATCH"] * 3 + ["NO_MATCH", "UNSURE"]
        assert loop.training is None and not models  # retrain_every=25 not reached

    run_loop(body)


def test_a_resent_label_counts_once_and_a_relabelled_pair_replaces_itself():
    async def body(loop, metrics, models, pub):
        _remember_rows(loop, range(2))
        assert await loop.add_labels([_match(0)]) == LabelResult(1, 0, 1)
        # the same request id again (an annotation tool retrying): counted once, nothing changes
        res = await loop.add_labels([_match(0), Label("i1", "image", "t1", "NO_MATCH",
                                                      request_id="r0")])
        assert res == LabelResult(0, 0, 1, duplicates=2)
        assert loop.labels_by_status["MATCH"] == 1 and metrics.duplicates == 2
        assert len(pub.pairs) == 1
        # twice in one call: the second is the duplicate
        res = await loop.add_labels([_match(1), _match(1)])
        assert (res.accepted, res.duplicates, loop.pairs_acquired) == (1, 1, 2)
        # a new request for the same pair (labelled again, new vector): it replaces the pair
        newer = _vec(5, "text")
        res = await loop.add_labels([_match(0, request_id="r0-again", partner_vector=newer)])
        assert res.accepted == 1 and loop.pairs_acquired == 2
        np.testing.assert_array_equal(loop.pairs[("i0", "t0")].vector_b, newer)

    run_loop(body)


def test_unresolvable_labels_are_reported_with_the_reason_and_a_fixed_resend_is_taken():
    async def body(loop, metrics, models, pub):
        _remember_rows(loop, range(2))
        bad = [
            Label("i-unknown", "image", "t1", "MATCH", partner_vector=_vec(1, "text")),
            Label("i1", "image", "t-never-seen", "MATCH", request_id="r-fix"),
            Label("i1", "image", "", "MATCH", partner_vector=_vec(1, "text")),
            Label("t1", "image", "t0", "MATCH"),   # item known under the other modality
            Label("i1", "image", "i0", "MATCH"),   # partner known, but of the same modality
        ]
        res = await loop.add_labels(bad)
        assert (res.accepted, res.ignored) == (0, 0) and len(res.unresolved) == 5
        why = "\n".join(res.unresolved)
        for needed in ("'i-unknown' (image): the item's vector is unknown",
                       "partner 't-never-seen' (text) is unknown here; send its vector in "
                       "partner_vector", "no partner_item_id", "is known as 'text', not 'image'",
                       "partner 'i0' is known as 'image', not 'text'"):
            assert needed in why, why
        assert loop.pairs_acquired == 0 and not pub.pairs
        # the tool resends with the partner's vector under the same request id: taken
        fixed = Label("i1", "image", "t-never-seen", "MATCH", request_id="r-fix",
                      partner_vector=_vec(1, "text"))
        assert (await loop.add_labels([fixed])).accepted == 1

    run_loop(body)


def test_bad_labels_raise_naming_them_and_nothing_is_counted():
    async def body(loop, metrics, models, pub):
        _remember_rows(loop, range(1))
        with pytest.raises(ValueError, match=r"label for 'i0': unknown status 'MAYBE'"):
            await loop.add_labels([_match(0), Label("i0", "image", "t0", "MAYBE")])
        with pytest.raises(ValueError, match="unknown modality 'audio'"):
            await loop.add_labels([Label("i0", "audio", "t0", "MATCH")])
        with pytest.raises(ValueError, match=r"label for 'i0': cost must be a finite number >= 0, "
                                             r"got -1.0"):
            await loop.add_labels([_match(0), Label("i0", "image", "t0", "MATCH", cost=-1.0)])
        with pytest.raises(ValueError, match="partner of 'i0'"):
            await loop.add_labels([_match(0), Label("i0", "image", "t9", "MATCH",
                                                    partner_vector=np.zeros(5, np.float32))])
        assert loop.pairs_acquired == 0 and metrics.labels == [] and not pub.pairs

    run_loop(body)


def test_a_failed_publish_changes_nothing_and_the_retry_is_not_a_duplicate():
    async def body(loop, metrics, models, pub):
        _remember_rows(loop, range(1))
        pub.fail = True
        with pytest.raises(ConnectionError):
            await loop.add_labels([_match(0)])
        assert loop.pairs_acquired == 0 and metrics.labels == []
        pub.fail = False
        assert await loop.add_labels([_match(0)]) == LabelResult(1, 0, 1)

    run_loop(body)


def test_ingested_pairs_join_the_store_once_and_their_request_ids_deduplicate_labels():
    async def body(loop, metrics, models, pub):
        assert await loop.ingest_pairs([_pair(0), _pair(1)]) == 2
        assert await loop.ingest_pairs([_pair(0)]) == 0  # our own publication read back
        assert loop.pairs_acquired == 2 and not pub.pairs  # ingesting never re-publishes
        assert loop.items["t1"][0] == "text"  # both vectors are known now
        # the label that produced r1 arrives again (a restart re-reading the labels topic)
        _remember_rows(loop, range(2))
        assert (await loop.add_labels([_match(1)])).duplicates == 1

    run_loop(body)


def test_retrain_publishes_then_swaps_and_counts_pairs_from_the_last_version():
    async def body(loop, metrics, models, pub):
        _remember_rows(loop, range(10))
        v0, m0 = loop.model_version, loop.model
        await loop.add_labels([_match(i) for i in range(2)])
        assert loop.training is None and loop.maybe_retrain() is False
        await loop.add_labels([_match(2)])  # third pair -> retrain
        assert loop.training is not None
        assert loop.maybe_retrain() is False  # one in flight (or nothing new): no second
        await loop.settle()
        assert loop.model_version == v0 + 1 and loop.model is not m0
        assert loop.selector.model is loop.model
        assert models == [loop.model] and loop.model.n_pairs == 3
        assert [r.version for r in pub.models] == [v0 + 1] and pub.models[0].model is loop.model
        assert (pub.models[0].pairs_seen, pub.models[0].worker_id) == (3, "w1")
        assert metrics.retrains == [(v0 + 1, True)] and metrics.judged == ["published"]
        await loop.add_labels([_match(i) for i in (3, 4)])
        await loop.wait_for_training()
        assert loop.model_version == v0 + 1 and len(models) == 1
        await loop.add_labels([_match(5)])
        await loop.settle()
        assert loop.model_version == v0 + 2 and loop.model.n_pairs == 6 and len(models) == 2

    run_loop(body, retrain_every=3)


def test_validation_pairs_are_never_trained_on_and_measure_each_version():
    async def body(loop, metrics, models, pub):
        _remember_rows(loop, range(80))
        await loop.add_labels([_match(i) for i in range(80)])
        await loop.settle()
        held = {k for k in loop.pairs if loop.is_validation(k)}
        assert 10 <= len(held) <= 40 and loop.validation_pairs == len(held)  # share 0.3 of 80
        release = pub.models[-1]
        assert loop.model.n_pairs == 80 - len(held)  # trained on the others only
        assert release.validation_pairs == len(held)
        assert set(release.validation_recall) == {1, 5}
        assert release.validation_recall[1] > 0.5  # the latent is shared: well above chance
        assert loop.validation_recall == release.validation_recall
        assert metrics.quality[-1] == (release.validation_recall, len(held))

    run_loop(body, retrain_every=80, validation_share=0.3)


def test_a_worse_candidate_is_rejected_by_the_gate_and_the_model_stays():
    async def body(loop, metrics, models, pub):
        _remember_rows(loop, range(120))
        await loop.add_labels([_match(i) for i in range(60)])
        await loop.settle()
        good = loop.model
        assert loop.validation_recall[1] > 0.5
        fit = loop.trainer.fit

        def scrambled(a, b, init=None):  # a broken learner: the partner side shuffled
            return fit(a, np.random.default_rng(0).permutation(b), init=init)
        loop.trainer.fit = scrambled
        await loop.add_labels([_match(i) for i in range(60, 120)])
        await loop.settle()
        assert loop.model is good and len(pub.models) == 1
        assert metrics.judged == ["published", "rejected"]
        assert loop.candidates["rejected"] == 1

    run_loop(body, retrain_every=60, validation_share=0.4,
             gate=GateConfig(tolerance=0.02, min_pairs=10))


def test_only_the_trainer_trains_and_a_new_trainer_starts_without_a_new_label():
    role = {"trainer": False}

    async def body(loop, metrics, models, pub):
        _remember_rows(loop, range(4))
        await loop.add_labels([_match(i) for i in range(4)])
        assert loop.training is None and not pub.models  # enough pairs, but not the trainer
        role["trainer"] = True  # e.g. the labels partition moved here in a rebalance
        assert loop.maybe_retrain() is True
        await loop.settle()
        assert loop.model_version == 2 and len(pub.models) == 1

    run_loop(body, retrain_every=2, is_trainer=lambda: role["trainer"])


def test_offered_versions_install_newest_only_and_training_continues_the_numbering():
    async def body(loop, metrics, models, pub):
        newer = copy.deepcopy(loop.model)
        newer.version = 7
        release = ModelRelease(newer, pairs_seen=3, validation_pairs=4,
                               validation_recall={1: 0.5, 5: 0.75}, worker_id="w0",
                               trained_at=5.0)
        assert await loop.offer_model(release) is True
        assert loop.model is newer and models == [newer]
        assert loop.validation_recall == {1: 0.5, 5: 0.75}
        older = copy.deepcopy(newer)
        older.version = 6
        assert await loop.offer_model(ModelRelease(older, 2, 0, {}, "w0", 1.0)) is False
        assert loop.model is newer
        # the version offered was trained when the store held 3 pairs: the next is due at 3 + 5
        _remember_rows(loop, range(8))
        await loop.add_labels([_match(i) for i in range(7)])
        assert loop.training is None
        await loop.add_labels([_match(7)])
        await loop.settle()
        assert loop.model_version == 8  # newest offered + 1

    run_loop(body, retrain_every=5)


def test_a_model_for_other_modalities_is_not_installed():
    async def body(loop, metrics, models, pub):
        from service.alignment import AlignmentModel
        foreign = AlignmentModel({"audio": 3, "video": 4}, 8, version=9)
        assert await loop.offer_model(ModelRelease(foreign, 0, 0, {}, "x", 0.0)) is False
        assert loop.model_version == 1
        # same modalities, another shared-space size (a worker with another embedding_dim):
        # skipped with a warning instead of failing the worker (found by the chaos suite)
        wider = AlignmentModel(dict(loop.dims), loop.model.dim_out * 2, version=9)
        assert await loop.offer_model(ModelRelease(wider, 0, 0, {}, "x", 0.0)) is False
        assert loop.model_version == 1

    run_loop(body)


def test_a_failed_model_publish_keeps_the_model_and_retries_with_the_next_pairs():
    async def body(loop, metrics, models, pub):
        _remember_rows(loop, range(3))
        await loop.add_labels([_match(i) for i in range(2)])
        pub.fail = True
        await loop.settle()
        assert loop.model_version == 1 and not models and metrics.judged == ["failed"]
        pub.fail = False
        await loop.add_labels([_match(2)])  # one more pair is enough: the count was restored
        await loop.settle()
        assert loop.model_version == 2 and metrics.judged == ["failed", "published"]

    run_loop(body, retrain_every=2)


def test_failed_retrain_keeps_the_model():
    async def body(loop, metrics, models, pub):
        def boom(*a, **k):
            raise RuntimeError("trainer exploded")
        loop.trainer.fit = boom
        _remember_rows(loop, range(2))
        await loop.add_labels([_match(i) for i in range(2)])
        await loop.settle()
        assert loop.model_version == 1 and not models and metrics.retrains == [(1, False)]
        assert metrics.judged == ["failed"] and not pub.models

    run_loop(body, retrain_every=2)


def test_retraining_on_its_own_executor_leaves_the_torch_executor_free():
    """With ``train_executor`` a retrain in flight does not hold up the scoring thread: work
    submitted to the torch executor completes while the trainer is still blocked."""
    import threading

    release = threading.Event()

    async def main():
        with ThreadPoolExecutor(max_workers=1) as ex, ThreadPoolExecutor(max_workers=1) as tx:
            loop = LearningLoop(_selector(), AlignmentTrainer(DIMS, seed=0), executor=ex,
                                train_executor=tx, lock=asyncio.Lock(), retrain_every=2)
            fit = loop.trainer.fit

            def slow_fit(*a, **k):
                release.wait(10)
                return fit(*a, **k)
            loop.trainer.fit = slow_fit
            _remember_rows(loop, range(2))
            await loop.add_labels([_match(i) for i in range(2)])
            assert loop.training is not None and not loop.training.done()
            # the scoring thread answers while the retrain waits
            got = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(ex, lambda: "scored"), 5)
            assert got == "scored" and not loop.training.done() and loop.model_version == 1
            release.set()
            await loop.settle()
            assert loop.model_version == 2
    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize(("kw", "pattern"), [
    ({"retrain_every": 0}, "retrain_every must be >= 1, got 0"),
    ({"validation_share": 1.0}, r"validation_share must be in \[0, 1\), got 1.0"),
    ({"validation_share": -0.1}, r"validation_share must be in \[0, 1\), got -0.1"),
])
def test_constructor_rejects_bad_values(kw, pattern):
    with ThreadPoolExecutor(max_workers=1) as ex:
        with pytest.raises(ValueError, match=pattern):
            LearningLoop(_selector(), AlignmentTrainer(DIMS), executor=ex, lock=asyncio.Lock(),
                         **kw)


def test_each_version_extends_the_learning_curve_and_the_stopping_signal_follows():
    async def body(loop, metrics, models, pub):
        _remember_rows(loop, range(200))
        assert loop.expected_gain() is None
        for lo in range(0, 200, 40):
            await loop.add_labels([_match(i) for i in range(lo, lo + 40)])
            await loop.settle()
        hist = pub.models[-1].history
        assert len(hist) == len(pub.models) == 5
        assert [h[0] for h in hist] == [r.model.n_pairs for r in pub.models]  # training pairs
        assert all(h[1] == r.validation_recall[1] for h, r in zip(hist, pub.models, strict=True))
        assert loop.history == hist
        est = loop.expected_gain()
        assert est is not None and est.horizon == 50 and est.gain >= 0
        assert metrics.quality[-1][0] == loop.validation_recall
        assert metrics.gains[-1] == (est.gain, 50)

    run_loop(body, retrain_every=40, validation_share=0.3, gain_horizon=50)


def test_no_match_marks_the_item_partnerless_and_unsure_is_not_final():
    async def body(loop, metrics, models, pub):
        _remember_rows(loop, range(3))
        near = _vec(1, "image") + 1e-3  # a near-duplicate of i1
        before = loop.selector.propose([FeatureItem("probe", "image", near)]).decisions[0]
        assert before.partnerless == 0.0
        res = await loop.add_labels([Label("i1", "image", "", "NO_MATCH", request_id="r1"),
                                     Label("t2", "text", "", "UNSURE", request_id="r2")])
        assert (res.accepted, res.ignored, res.duplicates) == (0, 2, 0)
        assert set(loop.partnerless) == {("i1", "")} and loop.pairs_acquired == 0
        after = loop.selector.propose([FeatureItem("probe", "image", near)]).decisions[0]
        assert after.partnerless > 0.4 and after.utility < before.utility - 0.4
        far = loop.selector.propose([FeatureItem("far", "image", _vec(2, "image"))]).decisions[0]
        assert far.partnerless < after.partnerless  # only items like it
        # UNSURE is not final: the same request answered MATCH later is taken
        res = await loop.add_labels([Label("t2", "text", "i2", "MATCH", request_id="r2")])
        assert res.accepted == 1 and res.duplicates == 0
        # a NO_MATCH re-sent is a duplicate; a NO_MATCH for an unknown item is only counted
        res = await loop.add_labels([Label("i1", "image", "", "NO_MATCH", request_id="r1"),
                                     Label("i-x", "image", "", "NO_MATCH", request_id="r9")])
        assert (res.duplicates, res.ignored, len(loop.partnerless)) == (1, 1, 1)
        # another worker reads the partnerless record back: marked there too, once
        assert await loop.ingest_pairs([pub.pairs[0], pub.pairs[0]]) == 0
        assert len(loop.selector.partnerless["image"]) == 1

    run_loop(body)
