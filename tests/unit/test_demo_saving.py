"""The demo's reference arms: random picks from the same stream prefix
(``service.demo.random_curve``) and the end-to-end figure, pairs the service needed to reach the
plain ridge baseline's R@1 at the last pair count (``service.demo.end_to_end_saving``)."""

from __future__ import annotations

import pytest

from service.demo import end_to_end_saving, random_curve
from service.evaluation.datasets import get_dataset


def _points(pairs, r1, key="r1"):
    return [{"pairs": p, key: r} for p, r in zip(pairs, r1, strict=True)]


def test_saving_interpolates_where_the_service_crosses_the_baseline_target():
    service = _points((0, 25, 50, 100), (0.0, 0.2, 0.6, 0.8))
    base = _points((0, 25, 50, 100), (0.0, 0.1, 0.2, 0.4), key="baseline_r1")
    got = end_to_end_saving(service, base)
    # 0.4 is reached half way from 25 (0.2) to 50 (0.6): 37.5 of 100 pairs, 62.5 % fewer
    assert got == {"target_r1": 0.4, "pairs_needed": 37.5, "saved": pytest.approx(0.625)}


def test_saving_is_none_when_the_service_never_reaches_the_target():
    service = _points((0, 50), (0.0, 0.3))
    base = _points((0, 50), (0.0, 0.35), key="baseline_r1")
    assert end_to_end_saving(service, base) == {"target_r1": 0.35, "pairs_needed": None,
                                                "saved": None}


def test_random_arm_picks_distinct_rows_from_the_stream_prefix_only():
    ds = get_dataset("synthetic", seed=0)
    rows = list(range(200))
    stream = [(m, r) for r in rows for m in (ds.modality_a, ds.modality_b)]
    test = list(range(200, 300))
    out = random_curve(ds, stream, test, [(60, 10), (400, 40)], dim=8, seed=1, draws=2)
    assert [(p["seen"], p["pairs"]) for p in out] == [(60, 10), (400, 40)]
    # 40 pairs from the whole stream learn more than 10 from its first 60 events
    assert out[1]["r1"] > out[0]["r1"] and out[1]["baseline_r1"] > out[0]["baseline_r1"]
    # the same seed gives the same curve
    assert random_curve(ds, stream, test, [(60, 10)], dim=8, seed=1, draws=2)[0] == out[0]


def test_random_arm_knows_only_the_prefix():
    # the first 60 events are rows 0..29 (both modalities): 30 picks must be exactly those rows,
    # and the learner's unpaired data exactly those events, whatever the draw
    from service.alignment import AlignmentTrainer, TrainerConfig, retrieval_recall

    ds = get_dataset("synthetic", seed=0)
    ma, mb = ds.modality_a, ds.modality_b
    stream = [(m, r) for r in range(200) for m in (ma, mb)]
    test = list(range(200, 300))
    got = random_curve(ds, stream, test, [(60, 30)], dim=8, seed=5, draws=1)[0]
    tr = AlignmentTrainer({ma: ds.a.shape[1], mb: ds.b.shape[1]}, TrainerConfig(dim_out=8),
                          seed=5)
    tr.fit_unpaired({ma: ds.a[:30], mb: ds.b[:30]})
    want = retrieval_recall(tr.fit(ds.a[:30], ds.b[:30]), ds.a[test], ds.b[test])
    assert got["r1"] == want["r1"] and got["r5"] == want["r5"]
