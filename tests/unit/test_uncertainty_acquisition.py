"""Unit tests for uncertainty scores, modality-aware acquisition and the batched scorer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from service.alignment.model import AlignmentModel
from service.core.acquisition import (
    AcquisitionConfig,
    EWNormalizer,
    ModalityAwareAcquisition,
    RankNormalizer,
)
from service.core.scorer import UncertaintyScorer
from service.core.uncertainty import (
    UNCERTAINTY_FUNCTIONS,
    all_uncertainties,
    entropy_uncertainty,
    least_confidence,
    margin_uncertainty,
    uncertainty,
)

FUNCS = [margin_uncertainty, entropy_uncertainty, least_confidence]


# --- uncertainty scores ------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 5, 16])
def test_uniform_similarities_are_maximally_uncertain(k):
    sims = np.full((3, k), 0.3)
    np.testing.assert_allclose(entropy_uncertainty(sims).numpy(), 1.0, atol=1e-9)
    np.testing.assert_allclose(margin_uncertainty(sims).numpy(), 1.0, atol=1e-9)
    np.testing.assert_allclose(least_confidence(sims).numpy(), 1 - 1 / k, atol=1e-9)


def test_dominant_candidate_is_certain():
    # One candidate 1.0 above the rest: at tau=0.05 its softmax weight is 1 - O(e^-20).
    sims = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    for fn in FUNCS:
        out = fn(sims, tau=0.05).numpy()
        assert out.shape == (2,)
        assert np.all(out >= 0) and np.all(out < 1e-6), fn.__name__


def test_two_candidates_closed_form():
    # K=2, gap g: p1 = sigmoid(g/tau), margin = 1 - (2 p1 - 1), lc = 1 - p1.
    g, tau = 0.1, 0.1
    p1 = 1 / (1 + math.exp(-g / tau))
    sims = torch.tensor([[g, 0.0]], dtype=torch.float64)
    assert margin_uncertainty(sims, tau).item() == pytest.approx(2 - 2 * p1)
    assert least_confidence(sims, tau).item() == pytest.approx(1 - p1)
    h = -(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1)) / math.log(2)
    assert entropy_uncertainty(sims, tau).item() == pytest.approx(h)


def test_all_uncertainties_matches_individual_functions():
    rng = np.random.default_rng(0)
    sims = torch.as_tensor(rng.uniform(-1, 1, size=(20, 7)))
    both = all_uncertainties(sims, tau=0.1)
    assert set(both) == set(UNCERTAINTY_FUNCTIONS)
    for name, fn in UNCERTAINTY_FUNCTIONS.items():
        torch.testing.assert_close(both[name], fn(sims, 0.1))
        np.testing.assert_allclose(uncertainty(name, sims, 0.1), fn(sims, 0.1).numpy())


@pytest.mark.parametrize("fn", FUNCS + [all_uncertainties])
def test_bad_inputs_raise(fn):
    with pytest.raises(ValueError, match=r"need at least 2 candidates per row, got K=1"):
        fn(np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"expected shape \(n, K\), got \(4,\)"):
        fn(np.zeros(4))
    for tau in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature tau must be > 0"):
            fn(np.zeros((3, 4)), tau)


def test_uncertainty_dispatch_unknown_name():
    with pytest.raises(ValueError, match=r"unknown uncertainty 'nope'; expected one of "
                                         r"\['entropy', 'least_confidence', 'margin'\]"):
        uncertainty("nope", np.zeros((2, 3)))


def test_uncertainty_dispatch_returns_float64_numpy():
    out = uncertainty("entropy", np.zeros((2, 3), dtype=np.float32))
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (2,)


@pytest.mark.parametrize("kind", ["margin", "entropy", "least_confidence"])
@pytest.mark.parametrize("block", [1, 7, 64, 1024])
def test_uncertainty_dispatch_in_blocks_equals_the_per_kind_function(kind, block):
    # 150 rows: blocks of 7 and 64 leave a ragged last block; 1024 is one block; 150 columns
    # exercise top2's blocked path (K >= 128, K % 64 != 0 falls back to topk) and 128 its fast one
    rng = np.random.default_rng(3)
    for k in (150, 128):
        sims = (rng.standard_normal((150, k)) * 0.3).astype(np.float32)
        before = sims.copy()
        got = uncertainty(kind, sims, 0.05, block=block)
        want = UNCERTAINTY_FUNCTIONS[kind](sims, 0.05).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(sims, before)  # the caller's matrix is left untouched
    with pytest.raises(ValueError, match="block must be >= 1, got 0"):
        uncertainty(kind, sims, 0.05, block=0)


@settings(max_examples=60, deadline=None)
@given(
    sims=st.integers(2, 12).flatmap(lambda k: arrays(
        np.float64, st.tuples(st.integers(1, 6), st.just(k)),
        elements=st.floats(-1.0, 1.0, allow_nan=False))),
    tau=st.floats(0.01, 2.0),
)
def test_scores_in_unit_interval(sims, tau):
    for name, vals in all_uncertainties(sims, tau).items():
        v = vals.numpy()
        assert np.all(np.isfinite(v)), name
        assert np.all(v >= -1e-9) and np.all(v <= 1 + 1e-9), (name, v)


# --- normalisers -------------------------------------------------------------------------


def test_ew_normalizer_before_history_returns_zeros():
    ew = EWNormalizer()
    np.testing.assert_array_equal(ew.transform(np.array([1.0, 5.0])), [0.0, 0.0])
    ew.update(np.array([3.0]))
    np.testing.assert_array_equal(ew.transform(np.array([1.0, 5.0])), [0.0, 0.0])


def test_ew_normalizer_first_two_values_exact():
    # While 1/n > alpha the estimates are the plain sample mean / population variance.
    ew = EWNormalizer(alpha=0.01)
    ew.update(np.array([2.0, 6.0]))
    assert ew.mean == pytest.approx(4.0)
    assert ew.var == pytest.approx(4.0)
    np.testing.assert_allclose(ew.transform(np.array([4.0, 8.0])), [0.0, 2.0], atol=1e-6)


def test_ew_normalizer_zscores_stationary_stream():
    rng = np.random.default_rng(0)
    ew = EWNormalizer(alpha=0.01)
    ew.update(rng.normal(3.0, 2.0, size=4000))
    z = ew.transform(rng.normal(3.0, 2.0, size=4000))
    assert abs(z.mean()) < 0.25
    assert 0.75 < z.std() < 1.3


def test_rank_normalizer_is_empirical_cdf():
    rk = RankNormalizer(window=100)
    np.testing.assert_array_equal(rk.transform(np.array([-5.0, 0.0, 7.0])), [0.5, 0.5, 0.5])
    rk.update(np.array([4.0, 1.0, 3.0, 2.0]))
    # below all -> 0, above all -> 1, between -> fraction below, ties count half.
    np.testing.assert_allclose(rk.transform(np.array([0.0, 10.0, 2.5, 2.0])),
                               [0.0, 1.0, 0.5, 3 / 8])


def test_rank_normalizer_window_is_bounded():
    rk = RankNormalizer(window=3)
    for v in range(1, 11):
        rk.update(np.array([float(v)]))
    assert len(rk) == 3 and rk.n == 10
    # only 8, 9, 10 remain: 7.5 is below all of them, 9 is the median.
    np.testing.assert_allclose(rk.transform(np.array([7.5, 9.0, 11.0])), [0.0, 0.5, 1.0])


# --- modality-aware acquisition ----------------------------------------------------------

MODS = ("a", "b")


def test_coverage_bonus_prefers_farther_modality():
    acq = ModalityAwareAcquisition(MODS)
    assert acq.coverage_bonus() == {"a": 0.0, "b": 0.0}
    acq.commit("a", np.full(4, 0.5), np.full(4, 3.0), accepted=0)
    assert acq.coverage_bonus() == {"a": 0.0, "b": 0.0}  # until both modalities have history
    acq.commit("b", np.full(4, 0.5), np.full(4, 1.0), accepted=0)
    bonus = acq.coverage_bonus()
    # gaps 3 and 1, mean 2: (3 - 2) / 2 = 0.5 and (1 - 2) / 2 = -0.5.
    assert bonus["a"] == pytest.approx(0.5) and bonus["b"] == pytest.approx(-0.5)


def test_coverage_bonus_clipped_to_unit_interval():
    acq = ModalityAwareAcquisition(MODS)
    acq.commit("a", np.full(2, 0.5), np.full(2, 100.0), accepted=0)
    acq.commit("b", np.full(2, 0.5), np.full(2, 0.0), accepted=0)
    bonus = acq.coverage_bonus()
    assert bonus == {"a": pytest.approx(1.0), "b": pytest.approx(-1.0)}


def test_quota_shares_follow_discrepancy_and_respect_min_share():
    cfg = AcquisitionConfig(quotas=True, quota_min_share=0.2)
    acq = ModalityAwareAcquisition(MODS, cfg)
    assert acq.quota_shares() == {"a": 0.5, "b": 0.5}
    for _ in range(20):  # a much more uncertain than b
        acq.commit("a", np.full(8, 0.9), np.full(8, 1.0), accepted=0)
        acq.commit("b", np.full(8, 0.1), np.full(8, 1.0), accepted=0)
    assert acq.discrepancy > 0
    shares = acq.quota_shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["a"] == pytest.approx(0.8) and shares["b"] == pytest.approx(0.2)


def test_quota_allows_vetoes_over_share():
    acq = ModalityAwareAcquisition(MODS, AcquisitionConfig(quotas=True, quota_min_accepts=10))
    acq.commit("a", np.full(20, 0.5), np.full(20, 1.0), accepted=20)
    acq.commit("b", np.full(20, 0.5), np.full(20, 1.0), accepted=0)
    assert acq.discrepancy == 0.0
    assert acq.accepts == {"a": 20, "b": 0}
    assert not acq.quota_allows("a")  # 21/21 > 0.5 + 0.05
    assert acq.quota_allows("b")


def test_quota_allows_during_min_accepts():
    acq = ModalityAwareAcquisition(MODS, AcquisitionConfig(quotas=True, quota_min_accepts=10))
    assert acq.quota_allows("a", extra={"a": 8})  # total 9 <= 10
    assert not acq.quota_allows("a", extra={"a": 10})


def test_quotas_off_always_allows():
    acq = ModalityAwareAcquisition(MODS, AcquisitionConfig(quotas=False))
    acq.commit("a", np.full(50, 0.9), np.full(50, 1.0), accepted=50)
    acq.commit("b", np.full(50, 0.1), np.full(50, 1.0), accepted=0)
    assert acq.quota_shares() == {"a": 0.5, "b": 0.5}
    assert acq.quota_allows("a") and acq.quota_allows("a", extra={"a": 1000})
    assert acq.quota_allows("b", extra={"b": 1000})


def test_acquisition_config_validation():
    with pytest.raises(ValueError, match=r"normalization must be 'zscore' or 'rank', got 'x'"):
        AcquisitionConfig(normalization="x")
    for name in ("uncertainty_weight", "diversity_weight", "coverage_weight"):
        with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0, got -0.5"):
            AcquisitionConfig(**{name: -0.5})
    with pytest.raises(ValueError,
                       match=r"uncertainty_weight must be a finite number >= 0, got nan"):
        AcquisitionConfig(uncertainty_weight=float("nan"))
    with pytest.raises(ValueError, match="quota_min_share must be <= 0.5, got 0.6"):
        AcquisitionConfig(quota_min_share=0.6)


def test_commit_of_empty_batch_changes_nothing():
    acq = ModalityAwareAcquisition(MODS)
    acq.commit("a", np.array([]), np.array([]), accepted=3)
    assert acq.accepts == {"a": 0, "b": 0}


@pytest.mark.parametrize("normalization", ["zscore", "rank"])
def test_per_modality_normalisation_keeps_modalities_comparable(normalization):
    rng = np.random.default_rng(0)
    cfg = AcquisitionConfig(normalization=normalization, coverage_weight=0.0)
    acq = ModalityAwareAcquisition(MODS, cfg)

    def draw(m, n):  # modality a lives on a 10x larger scale than b
        s = 10.0 if m == "a" else 1.0
        return s * rng.gamma(2.0, 0.5, size=n), s * rng.gamma(3.0, 0.5, size=n)

    for _ in range(25):
        for m in MODS:
            u, d = draw(m, 40)
            acq.commit(m, u, d, accepted=0)
    means, raw_means = {}, {}
    for m in MODS:
        u, d = draw(m, 2000)
        nu, nd = acq.normalized(m, u, d)
        means[m] = acq.utility(nu, nd, 0.0).mean()
        raw_means[m] = acq.utility(u, d, 0.0).mean()
    assert raw_means["a"] > 5 * raw_means["b"]  # without normalisation a would dominate
    assert abs(means["a"] - means["b"]) < 0.15


# --- scorer ------------------------------------------------------------------------------


@pytest.fixture
def scorer():
    torch.manual_seed(0)
    model = AlignmentModel({"a": 4, "b": 3}, dim_out=5).eval()
    return UncertaintyScorer(model, index_size=8, tau=0.1, device="cpu")


def test_score_invalid_until_other_index_has_two_items(scorer):
    za = scorer.embed("a", np.ones((3, 4)))
    s = scorer.score("a", za)
    assert s.valid is False
    for kind in ("margin", "entropy", "least_confidence"):
        np.testing.assert_array_equal(s.get(kind), np.full(3, 0.5))
    xb = np.arange(6, dtype=np.float32).reshape(2, 3)
    scorer.observe("b", xb[:1], scorer.embed("b", xb[:1]))
    assert scorer.score("a", za).valid is False
    scorer.observe("a", np.ones((5, 4)), scorer.embed("a", np.ones((5, 4))))
    assert scorer.score("a", za).valid is False  # a's own index does not count
    scorer.observe("b", xb[1:], scorer.embed("b", xb[1:]))
    s = scorer.score("a", za)
    assert s.valid is True
    for kind in ("margin", "entropy", "least_confidence"):
        v = s.get(kind)
        assert v.shape == (3,) and v.dtype == np.float64
        assert np.all((v >= 0) & (v <= 1))


def test_score_matches_uncertainty_functions(scorer):
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((6, 3)).astype(np.float32)
    zb = scorer.embed("b", xb)
    scorer.observe("b", xb, zb)
    za = scorer.embed("a", rng.standard_normal((4, 4)))
    s = scorer.score("a", za)
    sims = (za @ zb.T).numpy()
    np.testing.assert_allclose(s.entropy, uncertainty("entropy", sims, 0.1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.margin, uncertainty("margin", sims, 0.1), rtol=1e-5, atol=1e-6)


def test_ring_index_keeps_newest_rows(scorer):
    pushed = []
    next_id = 0
    for size in (3, 5, 4, 2, 11, 1):  # wraps several times, one batch larger than the index
        ids = np.arange(next_id, next_id + size, dtype=np.float32)
        next_id += size
        raw = np.stack([ids, -ids, ids * 0.5], axis=1)
        scorer.observe("b", raw, scorer.embed("b", raw))
        pushed.extend(ids.tolist())
        assert scorer.index_fill("b") == min(len(pushed), 8)
    idx = scorer._index["b"]
    kept = idx.raw[: idx.filled]
    assert sorted(kept[:, 0].tolist()) == pushed[-8:]
    # every stored embedding still belongs to the raw row stored beside it
    torch.testing.assert_close(idx.emb[: idx.filled], scorer.embed("b", kept))
    assert scorer.index_fill("a") == 0


def test_set_model_reembeds_index_and_checks_dims(scorer):
    xb = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
    scorer.observe("b", xb, scorer.embed("b", xb))
    torch.manual_seed(7)
    new = AlignmentModel({"a": 4, "b": 3}, dim_out=5, version=3)
    scorer.set_model(new)
    assert scorer.model_version == 3
    torch.testing.assert_close(scorer._index["b"].emb[:5], scorer.embed("b", xb))
    with pytest.raises(ValueError,
                       match=r"new model has dims \{'a': 4, 'b': 2\}->5, scorer expects"):
        scorer.set_model(AlignmentModel({"a": 4, "b": 2}, dim_out=5))
    with pytest.raises(ValueError, match=r"->6, scorer expects"):
        scorer.set_model(AlignmentModel({"a": 4, "b": 3}, dim_out=6))


def test_scorer_constructor_validation():
    model = AlignmentModel({"a": 4, "b": 3}, dim_out=5)
    with pytest.raises(ValueError, match="index_size must be >= 2, got 1"):
        UncertaintyScorer(model, index_size=1, device="cpu")
    with pytest.raises(ValueError, match="tau must be > 0, got 0"):
        UncertaintyScorer(model, tau=0, device="cpu")
    sc = UncertaintyScorer(model, index_size=4, device="cpu")
    with pytest.raises(ValueError, match="unknown modality 'c'"):
        sc.embed("c", np.ones((1, 4)))
    with pytest.raises(ValueError, match="b: wrong dimension 4, expected 3"):
        sc.embed("b", np.ones((1, 4)))


def test_ew_normalizer_without_spread_is_neutral_not_explosive():
    # Cold start: every diversity equals the empty-cache value 2.0 -> variance 0. Dividing by ~0
    # used to turn the next batch's ordinary distances into utilities of about -5e5.
    from service.core.acquisition import EWNormalizer

    n = EWNormalizer(alpha=0.01)
    n.update(np.full(32, 2.0))
    out = n.transform(np.array([0.5, 1.0, 2.0]))
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.0])
    n.update(np.array([0.5, 1.5, 1.0]))
    z = n.transform(np.array([0.5, 2.0]))
    assert np.all(np.isfinite(z)) and z[0] < 0 < z[1] and np.abs(z).max() < 20


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), blocks=st.integers(1, 6),
       ties=st.booleans())
def test_top2_matches_topk_with_and_without_ties(seed, n, blocks, ties):
    from service.core.uncertainty import top2

    rng = np.random.default_rng(seed)
    k = 64 * blocks + (0 if seed % 3 else 5)  # mostly the blocked path, sometimes the fallback
    x = torch.as_tensor(rng.normal(size=(n, k)).astype(np.float32))
    if ties:  # the maximum twice, in the same block or another one
        for r in range(n):
            i, j = rng.choice(k, size=2, replace=False)
            x[r, i] = x[r, j] = x[r].max() + 1.0
    m1, m2 = top2(x)
    ref = torch.topk(x, 2, dim=1).values
    torch.testing.assert_close(m1, ref[:, 0])
    torch.testing.assert_close(m2, ref[:, 1])


def test_blocked_scores_match_the_individual_functions_and_leave_sims_alone():
    rng = np.random.default_rng(1)
    sims = torch.as_tensor(rng.uniform(-1, 1, size=(9, 512)).astype(np.float32))
    sims[0, 3] = sims[0, 400] = 1.5  # a tie: margin must be 1
    before = sims.clone()
    both = all_uncertainties(sims, tau=0.05)
    torch.testing.assert_close(sims, before)
    for name, fn in UNCERTAINTY_FUNCTIONS.items():
        torch.testing.assert_close(both[name], fn(sims, 0.05), atol=1e-5, rtol=1e-4)
    assert both["margin"][0].item() == pytest.approx(1.0)


def test_scorer_scores_equal_the_functions_on_its_similarities():
    from service.alignment.model import AlignmentModel

    torch.manual_seed(0)
    model = AlignmentModel({"a": 6, "b": 5}, dim_out=4)
    sc = UncertaintyScorer(model, index_size=128, tau=0.05, device="cpu")
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(128, 5)).astype(np.float32)
    sc.observe("b", xb, sc.embed("b", xb))
    xa = rng.normal(size=(7, 6)).astype(np.float32)
    za = sc.embed("a", xa)
    got = sc.score("a", za)
    sims = za @ sc.embed("b", xb).T
    ref = all_uncertainties(sims, 0.05)
    for name in ("margin", "entropy", "least_confidence"):
        np.testing.assert_allclose(getattr(got, name), ref[name].double().numpy(), atol=1e-5)


def test_uncertainty_off_keeps_no_window_and_leaves_the_utility_unchanged():
    """uncertainty_weight 0 (the default): no uncertainty window is kept or read, and the
    utility equals the one computed through that window bit for bit (0 * anything in [0, 1]
    is 0); with a weight the window is kept and read."""
    rng = np.random.default_rng(3)
    off = ModalityAwareAcquisition(MODS, AcquisitionConfig())
    on = ModalityAwareAcquisition(MODS, AcquisitionConfig(uncertainty_weight=0.4))
    for _ in range(5):
        u, d = rng.random(30), rng.random(30)
        off.commit("a", u, d, accepted=1)
        on.commit("a", u, d, accepted=1)
    assert len(off._norm[("a", "u")]) == 0 and len(on._norm[("a", "u")]) == 150
    u, d = rng.random(50), rng.random(50)
    nu_off, nd_off = off.normalized("a", u, d)
    nu_on, nd_on = on.normalized("a", u, d)
    assert not nu_off.any() and nu_on.any() and np.array_equal(nd_off, nd_on)
    via_window = off.utility(nu_on, nd_on, 0.1, 0.3)  # weight 0 times the real ranks
    assert np.array_equal(off.utility(nu_off, nd_off, 0.1, 0.3), via_window)
