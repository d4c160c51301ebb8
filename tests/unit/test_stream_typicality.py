"""Stream typicality: density of an arrival among its own modality's recent items ([TypiClust])."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.core.acquisition import AcquisitionConfig, ModalityAwareAcquisition
from service.core.budget import BudgetConfig
from service.core.scorer import top_k_mean
from service.core.selector import SelectorConfig, StreamingSelector
from service.core.types import FeatureItem
from tests.unit.test_selector import _batch, _data, _selector


def _typ_selector(tw=1.0, uw=0.0, dw=0.0, k=5, cw=0.0):
    sel, a, b, tr = _selector(total=200, rate=0.3)
    sel.acquisition = ModalityAwareAcquisition(
        sel.modalities, AcquisitionConfig(uncertainty_weight=uw, diversity_weight=dw,
                                          coverage_weight=cw, typicality_weight=tw,
                                          typicality_k=k))
    sel.config = SelectorConfig(index_size=sel.config.index_size,
                                cache_capacity=sel.config.cache_capacity,
                                budget=sel.config.budget, acquisition=sel.acquisition.config)
    return sel, a, b


def test_scorer_typicality_is_the_mean_of_the_k_nearest_own_modality_cosines():
    sel, a, b, _ = _selector()
    assert sel.scorer.typicality("image", sel.scorer.embed("image", a[:3]), 5) is None  # empty
    sel.commit(sel.propose(_batch(a, b, 0, 100)))  # 50 images, 50 texts in the recent index
    z = sel.scorer.embed("image", a[300:310])
    got = sel.scorer.typicality("image", z, 5)
    own = sel.scorer.embed("image", a[0:100:2]).numpy()  # the indexed images
    sims = z.numpy() @ own.T
    want = np.sort(sims, axis=1)[:, ::-1][:, :5].mean(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # k larger than the fill: the mean over all of them
    np.testing.assert_allclose(sel.scorer.typicality("image", z, 10_000), sims.mean(axis=1),
                               rtol=1e-5, atol=1e-6)


def test_typical_arrival_beats_an_outlier_and_decisions_carry_typicality():
    sel, a, b = _typ_selector()
    for lo in range(0, 200, 20):  # history: recent index and the typicality normaliser
        sel.commit(sel.propose(_batch(a, b, lo, lo + 20)))
    typical = a[0] + 0.01 * np.random.default_rng(0).normal(size=a.shape[1]).astype(np.float32)
    outlier = (-10 * a.mean(axis=0) + 5.0).astype(np.float32)
    p = sel.propose([FeatureItem("typical", "image", typical),
                     FeatureItem("outlier", "image", outlier)])
    d_typ, d_out = p.decisions
    assert d_typ.typicality > d_out.typicality
    assert d_typ.utility > d_out.utility  # typicality is the only weighted term here
    assert all(np.isfinite(d.typicality) for d in p.decisions)


def test_zero_weight_computes_nothing(monkeypatch):
    """Off by weight: the scorer's typicality is never called (no extra matmul), every decision
    carries typicality 0 and the normaliser of typicality stays untouched."""
    calls = []
    sel, a, b = _typ_selector(tw=0.0, uw=0.7, dw=0.3, cw=0.1)
    monkeypatch.setattr(sel.scorer, "typicality", lambda *x: calls.append(x))
    spent = 0
    for lo in range(0, 200, 25):
        p = sel.propose(_batch(a, b, lo, lo + 25))
        assert all(d.typicality == 0.0 for d in p.decisions)
        sel.commit(p)
        spent += len(p.accepted)
    assert calls == [] and spent > 0
    assert all(sel.acquisition._norm[(m, "t")].n == 0 for m in sel.modalities)
    assert all(sel.acquisition._norm[(m, "d")].n == 100 for m in sel.modalities)


def test_propose_leaves_the_typicality_normaliser_alone_and_commit_folds_it_in():
    sel, a, b = _typ_selector()
    sel.commit(sel.propose(_batch(a, b, 0, 20)))  # the recent index is empty on the first batch
    assert all(sel.acquisition._norm[(m, "t")].n == 0 for m in sel.modalities)
    p = sel.propose(_batch(a, b, 20, 40))
    assert all(sel.acquisition._norm[(m, "t")].n == 0 for m in sel.modalities)
    sel.commit(p)
    assert [sel.acquisition._norm[(m, "t")].n for m in sel.modalities] == [10, 10]


@pytest.mark.parametrize("kw, msg", [
    ({"typicality_weight": -0.1}, "typicality_weight must be a finite number >= 0, got -0.1"),
    ({"typicality_weight": float("nan")}, "typicality_weight must be a finite number"),
    ({"typicality_k": 0}, "typicality_k must be an integer >= 1, got 0"),
    ({"typicality_k": 2.5}, "typicality_k must be an integer >= 1, got 2.5"),
])
def test_bad_typicality_settings_are_refused_with_the_value(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
        AcquisitionConfig(**kw)


def test_typicality_follows_a_model_swap():
    """The recent index is re-embedded on a model swap, so typicality is measured in the new
    space (scores equal a fresh computation there)."""
    sel, a, b, tr = _selector()
    sel.commit(sel.propose(_batch(a, b, 0, 100)))
    new = tr.fit(a[:120], b[:120])
    sel.set_model(new)
    z = sel.scorer.embed("text", b[300:305])
    own = torch.as_tensor(new.embed("text", b[1:100:2]))
    want = (z @ own.T).topk(3, dim=1).values.mean(dim=1).double().numpy()
    np.testing.assert_allclose(sel.scorer.typicality("text", z, 3), want, rtol=1e-5, atol=1e-6)


def test_selector_with_typicality_spends_exactly_its_budget():
    a, b = _data(3)
    sel, _, _ = _typ_selector()
    cfg = SelectorConfig(index_size=64, cache_capacity=32,
                         budget=BudgetConfig(total=15, target_rate=0.2, min_history=8, window=64),
                         acquisition=AcquisitionConfig(typicality_weight=0.3))
    s2 = StreamingSelector(sel.model, cfg, seed=1, device="cpu")
    for lo in range(0, 400, 16):
        s2.commit(s2.propose(_batch(a, b, lo, lo + 16)))
    assert s2.budget.spent == 15
    assert any(d.typicality != 0.0 for d in s2.propose(_batch(a, b, 0, 16)).decisions)


@pytest.mark.parametrize("shape,k", [((7, 50), 5), ((33, 1024), 20), ((4, 6), 10), ((3, 9), 9)])
def test_top_k_mean_is_bit_for_bit_torchs_topk_mean(shape, k):
    # the CPU path selects with numpy.partition; the result must be exactly the old rule's
    gen = torch.Generator().manual_seed(shape[1])
    sims = torch.randn(shape, generator=gen)
    sims[0, : shape[1] // 2] = sims[0, 0]  # ties in the top k
    before = sims.clone()
    want = sims.topk(min(k, shape[1]), dim=1).values.mean(dim=1).double().numpy()
    got = top_k_mean(sims, k)
    assert got.dtype == np.float64 and got.shape == (shape[0],)
    assert np.array_equal(got, want)
    assert torch.equal(sims, before)  # nothing written into the caller's tensor
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        top_k_mean(sims, 0)
