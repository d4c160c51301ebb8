"""LearningLoop in isolation: labels -> pairs -> retrain -> hot swap (no facade, no transport)."""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.alignment import AlignmentTrainer
from service.core.selector import SelectorConfig, StreamingSelector
from service.learning_loop import LearningLoop
from service.messages import Label, LabelResult
from tests.support import DIMS
from tests.support import data_and_model as _data_and_model


class RecordingMetrics:
    def __init__(self):
        self.labels, self.retrains = [], []

    def labels_received(self, status, n=1):
        self.labels.append((status, n))

    def retrained(self, version, seconds, ok):
        self.retrains.append((version, ok))


def _vec(i, modality):
    a, b, _ = _data_and_model()
    return (a[i] if modality == "image" else b[i]).copy()


def run_loop(body, **kw):
    """Build a loop (fresh selector, its own executor and lock) in a running event loop and run
    ``body(loop, metrics, models)``."""
    async def main():
        _, _, model = _data_and_model()
        sel = StreamingSelector(copy.deepcopy(model),
                                SelectorConfig(index_size=64, cache_capacity=32), seed=0,
                                device="cpu")
        metrics, models = RecordingMetrics(), []
        with ThreadPoolExecutor(max_workers=1) as ex:
            loop = LearningLoop(sel, AlignmentTrainer(DIMS, seed=0), executor=ex,
                                lock=asyncio.Lock(), metrics=metrics, on_model=models.append,
                                **kw)
            return await asyncio.wait_for(body(loop, metrics, models), 30)
    return asyncio.run(main())


def _remember_rows(loop, rows):
    for i in rows:
        loop.remember(f"i{i}", "image", _vec(i, "image"))
        loop.remember(f"t{i}", "text", _vec(i, "text"))


def test_match_labels_become_pairs_in_modality_order():
    async def body(loop, metrics, models):
        _remember_rows(loop, range(4))
        res = await loop.add_labels([
            Label("i0", "image", "t0", "MATCH"),                      # partner from the memory
            Label("t1", "text", "i1", "MATCH"),                       # text-side label
            Label("i2", "image", "t2-new", "MATCH", partner_vector=_vec(2, "text")),
            Label("i3", "image", "t3", "NO_MATCH"),
            Label("i3", "image", "t3", "UNSURE"),
        ])
        assert res == LabelResult(accepted=3, ignored=2, model_version=1)
        assert loop.pairs_acquired == 3
        assert set(loop.pairs) == {("i0", "t0"), ("t1", "i1"), ("i2", "t2-new")}
        for key, row in ((("i0", "t0"), 0), (("t1", "i1"), 1), (("i2", "t2-new"), 2)):
            a, b = loop.pairs[key]  # always (image vector, text vector)
            np.testing.assert_array_equal(a, _vec(row, "image"))
            np.testing.assert_array_equal(b, _vec(row, "text"))
        assert "t2-new" in loop.items and loop.items["t2-new"][0] == "text"
        assert loop.labels_by_status == {"MATCH": 3, "NO_MATCH": 1, "UNSURE": 1}
        assert [s for s, _ in metrics.labels] == ["MATCH"] * 3 + ["NO_MATCH", "UNSURE"]
        assert loop.training is None and not models  # retrain_every=25 not reached

    run_loop(body)


def test_duplicates_and_unknown_items_are_handled_as_the_handler_did():
    async def body(loop, metrics, models):
        _remember_rows(loop, range(2))
        assert await loop.add_labels([Label("i0", "image", "t0", "MATCH")]) == LabelResult(1, 0, 1)
        # the same label again: counted as accepted, but it replaces its pair
        assert (await loop.add_labels([Label("i0", "image", "t0", "MATCH")])).accepted == 1
        assert loop.pairs_acquired == 1
        ignored = [
            Label("i-unknown", "image", "t1", "MATCH", partner_vector=_vec(1, "text")),
            Label("i1", "image", "t-never-seen", "MATCH"),              # no partner vector
            Label("i1", "image", "", "MATCH", partner_vector=_vec(1, "text")),  # no partner id
            Label("t1", "image", "t0", "MATCH"),   # item known under the other modality
            Label("i1", "image", "i0", "MATCH"),   # partner known, but of the same modality
        ]
        res = await loop.add_labels(ignored)
        assert res == LabelResult(0, len(ignored), 1)
        assert loop.pairs_acquired == 1
        assert loop.labels_by_status["MATCH"] == 2 + len(ignored)

    run_loop(body)


def test_bad_labels_raise_naming_them_and_nothing_is_counted():
    async def body(loop, metrics, models):
        _remember_rows(loop, range(1))
        with pytest.raises(ValueError, match=r"label for 'i0': unknown status 'MAYBE'"):
            await loop.add_labels([Label("i0", "image", "t0", "MATCH"),
                                   Label("i0", "image", "t0", "MAYBE")])
        with pytest.raises(ValueError, match="unknown modality 'audio'"):
            await loop.add_labels([Label("i0", "audio", "t0", "MATCH")])
        with pytest.raises(ValueError, match="partner of 'i0'"):
            await loop.add_labels([Label("i0", "image", "t9", "MATCH",
                                         partner_vector=np.zeros(5, np.float32))])
        # status and modality are checked before anything is counted; a wrong-dimension partner
        # vector is found while taking the label in, after it was counted (as before the split)
        assert loop.pairs_acquired == 0 and metrics.labels == [("MATCH", 1)]

    run_loop(body)


def test_retrain_swaps_the_model_and_bumps_the_version():
    async def body(loop, metrics, models):
        _remember_rows(loop, range(10))
        v0, m0 = loop.model_version, loop.model
        await loop.add_labels([Label(f"i{i}", "image", f"t{i}", "MATCH") for i in range(2)])
        assert loop.training is None and loop.maybe_retrain() is False
        await loop.add_labels([Label("i2", "image", "t2", "MATCH")])  # third pair -> retrain
        assert loop.training is not None
        assert loop.maybe_retrain() is False  # one in flight (or nothing new): no second
        await loop.settle()
        assert loop.model_version == v0 + 1 and loop.model is not m0
        assert loop.selector.model is loop.model
        assert models == [loop.model] and loop.model.n_pairs == 3
        assert metrics.retrains == [(v0 + 1, True)]
        # below retrain_every new pairs: no second retrain
        await loop.add_labels([Label(f"i{i}", "image", f"t{i}", "MATCH") for i in (3, 4)])
        await loop.wait_for_training()
        assert loop.model_version == v0 + 1 and len(models) == 1
        await loop.add_labels([Label("i5", "image", "t5", "MATCH")])
        await loop.settle()
        assert loop.model_version == v0 + 2 and loop.model.n_pairs == 6 and len(models) == 2

    run_loop(body, retrain_every=3)


def test_failed_retrain_keeps_the_model():
    async def body(loop, metrics, models):
        def boom(*a, **k):
            raise RuntimeError("trainer exploded")
        loop.trainer.fit = boom
        _remember_rows(loop, range(2))
        await loop.add_labels([Label(f"i{i}", "image", f"t{i}", "MATCH") for i in range(2)])
        await loop.settle()
        assert loop.model_version == 1 and not models and metrics.retrains == [(1, False)]

    run_loop(body, retrain_every=2)


def test_retraining_on_its_own_executor_leaves_the_torch_executor_free():
    """With ``train_executor`` a retrain in flight does not hold up the scoring thread: work
    submitted to the torch executor completes while the trainer is still blocked."""
    import threading

    release = threading.Event()

    async def main():
        _, _, model = _data_and_model()
        sel = StreamingSelector(copy.deepcopy(model),
                                SelectorConfig(index_size=64, cache_capacity=32), seed=0,
                                device="cpu")
        with ThreadPoolExecutor(max_workers=1) as ex, ThreadPoolExecutor(max_workers=1) as tx:
            loop = LearningLoop(sel, AlignmentTrainer(DIMS, seed=0), executor=ex,
                                train_executor=tx, lock=asyncio.Lock(), retrain_every=2)
            fit = loop.trainer.fit

            def slow_fit(*a, **k):
                release.wait(10)
                return fit(*a, **k)
            loop.trainer.fit = slow_fit
            _remember_rows(loop, range(2))
            await loop.add_labels([Label(f"i{i}", "image", f"t{i}", "MATCH") for i in range(2)])
            assert loop.training is not None and not loop.training.done()
            # the scoring thread answers while the retrain waits
            got = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(ex, lambda: "scored"), 5)
            assert got == "scored" and not loop.training.done() and loop.model_version == 1
            release.set()
            await loop.settle()
            assert loop.model_version == 2
    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_older_pending_model_is_not_swapped_in():
    async def body(loop, metrics, models):
        old = copy.deepcopy(loop.model)
        loop._pending_model = old  # e.g. a retrain that finished after a newer swap
        loop.swap_in_pending()
        assert loop.model is not old and not models
        loop.swap_in_pending()  # nothing pending: no-op
        assert not models

    run_loop(body)


def test_constructor_rejects_bad_retrain_every():
    _, _, model = _data_and_model()
    sel = StreamingSelector(copy.deepcopy(model), SelectorConfig(index_size=16, cache_capacity=8),
                            device="cpu")
    with ThreadPoolExecutor(max_workers=1) as ex:
        with pytest.raises(ValueError, match="retrain_every must be >= 1, got 0"):
            LearningLoop(sel, AlignmentTrainer(DIMS), executor=ex, lock=asyncio.Lock(),
                         retrain_every=0)
