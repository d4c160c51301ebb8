"""Unit tests of the pool-based selection strategies in :mod:`service.core.pool`."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import rankdata

from service.alignment.model import AlignmentModel
from service.core.pool import STRATEGIES
from service.core.pool import kcenter as kcenter_mod
from service.core.pool.badge import BadgeStrategy, gradient_embeddings, kmeans_pp, pca_features
from service.core.pool.base import PoolState, other_modality_sims
from service.core.pool.bmmal import BMMALStrategy, fused_probs, modality_contributions
from service.core.pool.kcenter import CoresetStrategy, k_center_greedy
from service.core.pool.mmal import MMALStrategy, coverage_gaps
from service.core.pool.random import RandomStrategy, joint_embedded
from service.core.pool.uncertainty_sampling import (
    EntropyStrategy,
    MarginStrategy,
    average_ranks,
    rank_normalise,
)
from service.core.pool.vecaf import VeCAFStrategy, loss_distribution, pseudo_loss
from service.core.uncertainty import uncertainty

MODS = ("image", "text")
DIMS = {"image": 20, "text": 12}
K = 8
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------- fixtures
def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _model(seed: int = 0, affine: bool = False) -> AlignmentModel:
    torch.manual_seed(seed)
    model = AlignmentModel(DIMS, K)
    if affine:
        rng = np.random.default_rng(seed)
        for m, d in DIMS.items():
            model.set_affine(m, rng.standard_normal(d), rng.standard_normal((d, K)))
        model.version = 1
    return model


def make_state(n=(150, 120), s=(30, 25), seed=0, affine=False, acquired=None) -> PoolState:
    """Random two-modality pool; ``s`` acquired items per modality (0 = cold start)."""
    rng = np.random.default_rng(seed)
    model = _model(seed, affine)
    raw, emb, sel = {}, {}, {}
    for m, n_m, s_m in zip(MODS, n, s, strict=True):
        raw[m] = rng.standard_normal((n_m, DIMS[m])).astype(np.float32)
        emb[m] = model.embed(m, raw[m]) if n_m else np.zeros((0, K), np.float32)
        sel[m] = (model.embed(m, rng.standard_normal((s_m, DIMS[m])).astype(np.float32))
                  if s_m else np.zeros((0, K), np.float32))
    return PoolState(MODS, raw, emb, sel, model, dict(acquired or {"image": s[0], "text": s[1]}))


def hand_state(emb: dict, selected: dict | None = None, acquired=None) -> PoolState:
    """A state from hand-made embeddings (raw = embeddings padded, only BADGE looks at raw)."""
    k = next(iter(emb.values())).shape[1]
    model = AlignmentModel({m: k for m in MODS}, k)
    sel = selected or {m: np.zeros((0, k), np.float32) for m in MODS}
    emb = {m: np.asarray(v, dtype=np.float32) for m, v in emb.items()}
    return PoolState(MODS, {m: emb[m].copy() for m in MODS}, emb,
                     {m: np.asarray(v, np.float32) for m, v in sel.items()}, model,
                     dict(acquired or {m: 0 for m in MODS}))


STATES = {
    "warm": lambda: make_state(affine=True),
    "cold": lambda: make_state(s=(0, 0), seed=1),
    "lopsided": lambda: make_state(n=(40, 3), s=(10, 0), seed=2),
    "one-text": lambda: make_state(n=(30, 1), s=(5, 5), seed=3),
    "no-text": lambda: make_state(n=(25, 0), s=(5, 5), seed=4),
}


def _valid(state: PoolState, picks) -> bool:
    return all(m in state.modalities and 0 <= i < state.size(m) for m, i in picks)


def _covering_radius(points: np.ndarray, centers: np.ndarray) -> float:
    d = np.linalg.norm(points[:, None, :] - centers[None, :, :], axis=2)
    return float(d.min(axis=1).max())


# ------------------------------------------------------------------ interface, all strategies
@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("state_name", sorted(STATES))
def test_every_strategy_returns_distinct_valid_picks_without_side_effects(name, state_name):
    state = STATES[state_name]()
    snapshot = copy.deepcopy((state.raw, state.embedded, state.selected,
                              state.acquired_per_modality))
    n_total = sum(state.size(m) for m in MODS)
    strategy = STRATEGIES[name]()
    assert strategy.name == name
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    for budget in (0, 1, 7, n_total, n_total + 5):
        picks = strategy.select(state, budget, np.random.default_rng(123))
        assert len(picks) == min(budget, n_total)
        assert len(set(picks)) == len(picks)
        assert _valid(state, picks)
        assert all(isinstance(i, int) for _, i in picks)
        again = strategy.select(state, budget, np.random.default_rng(123))
        assert again == picks  # deterministic for the same rng seed
    # never mutates the state, never touches the global RNGs
    for before, after in zip(snapshot, (state.raw, state.embedded, state.selected,
                                         state.acquired_per_modality), strict=True):
        assert before.keys() == after.keys()
        for key in before:
            assert np.array_equal(before[key], after[key])
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert torch.equal(torch.get_rng_state(), torch_state)
    with pytest.raises(ValueError):
        strategy.select(state, -1, np.random.default_rng(0))


def test_registry_and_unknown_name():
    assert set(STRATEGIES) == {"random", "coreset", "entropy", "margin", "mmal", "badge",
                               "bmmal", "vecaf"}
    assert STRATEGIES["margin"](tau=0.1).tau == pytest.approx(0.1)
    assert isinstance(STRATEGIES["mmal"](candidate_factor=2), MMALStrategy)
    # an unknown name is refused where the service resolves names (SelectionHandler.select_pool,
    # with "default"); its message names the name and the known ones: tests/unit/test_handler.py
    assert "no-such-strategy" not in STRATEGIES
    for bad in ({"tau": 0.0}, {"tau": -1.0}):
        with pytest.raises(ValueError):
            STRATEGIES["entropy"](**bad)


def test_random_strategy_is_uniform_over_both_modalities():
    state = make_state()
    counts = np.zeros(sum(state.size(m) for m in MODS))
    for seed in range(300):
        for m, i in RandomStrategy().select(state, 10, np.random.default_rng(seed)):
            counts[i if m == "image" else state.size("image") + i] += 1
    frac_image = counts[:state.size("image")].sum() / counts.sum()
    assert frac_image == pytest.approx(150 / 270, abs=0.03)
    assert (counts > 0).mean() > 0.99
    assert RandomStrategy().select(state, 5, np.random.default_rng(1)) != \
        RandomStrategy().select(state, 5, np.random.default_rng(2))


# -------------------------------------------------------------------------- k-center greedy
def _clustered(seed: int, n_clusters=8, per=30, k=5, spread=0.05):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, k)) * 3
    return (centers[:, None, :] + spread * rng.standard_normal((n_clusters, per, k))).reshape(-1, k)


@pytest.mark.parametrize("seed", range(6))
def test_k_center_greedy_covers_better_than_random(seed):
    pts = _clustered(seed)
    picks = k_center_greedy(pts, np.zeros((0, 5)), 8)
    rand = np.random.default_rng(seed).choice(len(pts), 8, replace=False)
    greedy_r = _covering_radius(pts, pts[picks])
    assert greedy_r <= _covering_radius(pts, pts[rand])
    assert greedy_r < 0.5  # one pick per cluster: radius of the order of the spread
    assert len({int(np.argmin(np.linalg.norm(pts[i] - pts[::30], axis=1))) for i in picks}) == 8


def test_k_center_greedy_start_and_edge_cases():
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 1.0]])
    # s == 0: the first pick is the point farthest from the mean, then farthest-first
    assert k_center_greedy(pts, np.zeros((0, 2)), 2) == [2, 3]
    assert k_center_greedy(pts, np.zeros((0, 2)), 2, first=1)[0] == 1
    # with a selected set the first pick is the point farthest from it
    assert k_center_greedy(pts, np.array([[10.0, 0.0]]), 1) == [3]
    assert k_center_greedy(pts, np.zeros((0, 2)), 0) == []
    assert sorted(k_center_greedy(pts, np.zeros((0, 2)), 10)) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        k_center_greedy(pts, np.zeros((0, 2)), 1, first=7)


_points = st.integers(1, 25).flatmap(lambda n: st.integers(1, 4).flatmap(
    lambda k: st.tuples(
        st.lists(st.lists(st.integers(-3, 3), min_size=k, max_size=k), min_size=n, max_size=n),
        st.lists(st.lists(st.integers(-3, 3), min_size=k, max_size=k), max_size=6),
        st.integers(0, n + 2),
    )))


@HYP
@given(_points)
def test_k_center_cache_matches_brute_force_and_picks_are_distinct(data):
    pts_l, sel_l, budget = data
    pts = np.array(pts_l, dtype=np.float64)  # small integer grid: many exact duplicates
    sel = np.array(sel_l, dtype=np.float64).reshape(-1, pts.shape[1])
    picks, min_dist = k_center_greedy(pts, sel, budget, return_min_dist=True)
    assert len(picks) == min(budget, len(pts))
    assert len(set(picks)) == len(picks)
    ref = np.concatenate([sel, pts[picks]])
    if len(ref):
        brute = np.linalg.norm(pts[:, None, :] - ref[None, :, :], axis=2).min(axis=1)
        np.testing.assert_allclose(min_dist, brute, atol=1e-6)
    else:
        assert np.isinf(min_dist).all()
    # greedy invariant: every pick was a farthest point when it was taken
    if picks and len(sel):
        before = np.linalg.norm(pts[:, None, :] - sel[None, :, :], axis=2).min(axis=1)
        assert before[picks[0]] == pytest.approx(before.max())


@HYP
@given(st.integers(2, 8).flatmap(lambda n: st.tuples(
    st.lists(st.tuples(st.floats(-5, 5), st.floats(-5, 5)), min_size=n, max_size=n),
    st.integers(1, min(3, n)), st.integers(0, n - 1))))
def test_k_center_greedy_is_a_2_approximation(data):
    pts_l, budget, first = data
    pts = np.array(pts_l, dtype=np.float64)
    opt = min(_covering_radius(pts, pts[list(c)])
              for c in itertools.combinations(range(len(pts)), budget))
    for start in (None, first):
        picks = k_center_greedy(pts, np.zeros((0, 2)), budget, first=start)
        assert _covering_radius(pts, pts[picks]) <= 2 * opt + 1e-9


def test_coreset_uses_the_cache_once_per_modality(monkeypatch):
    calls = []
    real = kcenter_mod.sq_min_dist_to

    def counting(points, ref, *a, **kw):
        calls.append(len(points))
        return real(points, ref, *a, **kw)

    monkeypatch.setattr(kcenter_mod, "sq_min_dist_to", counting)
    state = make_state()
    assert len(CoresetStrategy().select(state, 40, np.random.default_rng(0))) == 40
    assert sorted(calls) == [120, 150]  # initial O(n·s) only; O(n·k) updates afterwards


def test_coreset_does_not_pick_both_sides_of_a_pair():
    rng = np.random.default_rng(0)
    z = _unit(rng.standard_normal((40, 6)))
    state = hand_state({"image": z, "text": z.copy()})  # text i is image i's exact partner
    picks = CoresetStrategy().select(state, 40, np.random.default_rng(0))
    rows = [i for _, i in picks]
    assert len(set(rows)) == 40  # no row index taken on both sides
    # the cache of each modality starts from that modality's own selected set
    sel = {"image": z[:20], "text": np.zeros((0, 6), np.float32)}
    state = hand_state({"image": z, "text": z.copy()}, selected=sel)
    first = CoresetStrategy().select(state, 1, np.random.default_rng(0))
    assert first[0][0] == "text"


# --------------------------------------------------------------------- uncertainty sampling
def _ambiguous_state() -> PoolState:
    e1, e2 = np.eye(3)[0], np.eye(3)[1]
    images = _unit(np.stack([e1, e1 + e2, e1 + 0.2 * e2, -e1 + 0.3 * e2]))
    texts = _unit(np.stack([e1, e2, -e1, -e2]))
    return hand_state({"image": images, "text": texts})


def test_margin_picks_the_candidate_equidistant_to_two_partners():
    state = _ambiguous_state()
    assert MarginStrategy().select(state, 1, np.random.default_rng(0)) == [("image", 1)]
    ranked, raw = MarginStrategy().scores(state)
    assert raw[1] == pytest.approx(1.0) and raw[1] == raw.max()


def test_entropy_ranks_the_equidistant_candidate_first_in_its_modality():
    state = _ambiguous_state()
    picks = EntropyStrategy().select(state, 2, np.random.default_rng(0))
    assert ("image", 1) in picks
    ranked, raw = EntropyStrategy().scores(state)
    assert ranked[1] == 1.0 and raw[1] == raw[:4].max()


@pytest.mark.parametrize("cls", [EntropyStrategy, MarginStrategy])
@pytest.mark.parametrize("budget", [1, 10, 60])
def test_uncertainty_picks_are_the_top_rank_normalised_scores(cls, budget):
    state = make_state(affine=True)
    strategy = cls(tau=0.1)
    picks = strategy.select(state, budget, np.random.default_rng(0))
    joint = []
    for m in MODS:
        raw = uncertainty(cls.kind, other_modality_sims(state, m), 0.1)
        r = (rankdata(raw) - 1) / (len(raw) - 1)
        joint += [(r[i], raw[i], (m, i)) for i in range(len(raw))]
    joint.sort(key=lambda t: (-t[0], -t[1]))
    threshold = joint[budget - 1][0]
    chosen = {p: r for r, _, p in joint}
    assert all(chosen[p] >= threshold for p in picks)
    assert {p for r, _, p in joint if r > threshold} <= set(picks)


def test_rank_normalise():
    np.testing.assert_allclose(rank_normalise(np.array([10.0, -1.0, 3.0])), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(rank_normalise(np.array([2.0, 2.0])), [0.5, 0.5])
    assert rank_normalise(np.array([7.0])).tolist() == [0.5]
    assert rank_normalise(np.array([])).size == 0


def test_average_ranks_by_hand_with_ties():
    # sorted: -1 | 0 0 (-0.0 ties 0.0) | 2 | 3 3 3 | inf  ->  ranks 1 | 2.5 2.5 | 4 | 6 6 6 | 8
    x = np.array([3.0, -1.0, 0.0, 3.0, np.inf, -0.0, 2.0, 3.0])
    expected = np.array([6.0, 1.0, 2.5, 6.0, 8.0, 2.5, 4.0, 6.0])
    got = average_ranks(x)
    assert got.dtype == np.float64 and got.tobytes() == expected.tobytes()
    assert rank_normalise(x).tobytes() == ((expected - 1.0) / 7.0).tobytes()
    assert average_ranks(np.array([5.0, 5.0, 5.0])).tolist() == [2.0, 2.0, 2.0]
    assert average_ranks(np.array([])).size == 0
    assert np.isnan(average_ranks(np.array([1.0, np.nan]))).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, 3).map(float) | st.floats(allow_nan=False), max_size=40))
def test_average_ranks_match_scipy_bit_for_bit(values):
    x = np.array(values, dtype=np.float64)
    assert average_ranks(x).tobytes() == rankdata(x, method="average").astype(np.float64).tobytes()


# ---------------------------------------------------------------------------------- MMAL
def test_mmal_picks_only_from_the_less_covered_modality():
    state = make_state(n=(150, 120), s=(0, 0), seed=5)
    rng = np.random.default_rng(5)
    covered = {  # images: acquired set = the candidates themselves (gap ~0); texts: 3 points
        "image": state.embedded["image"] + 0.01 * rng.standard_normal((150, K)).astype(np.float32),
        "text": state.embedded["text"][:3] * -1.0,
    }
    st_ = PoolState(MODS, state.raw, state.embedded, covered, state.model, {"image": 0, "text": 9})
    gaps, _ = coverage_gaps(st_)
    assert gaps["text"] > gaps["image"]
    picks = MMALStrategy().select(st_, 30, np.random.default_rng(0))
    assert len(picks) == 30 and {m for m, _ in picks} == {"text"}
    # budget beyond the modality: all of it, then filled from the other modality
    picks = MMALStrategy().select(st_, 130, np.random.default_rng(0))
    assert sum(m == "text" for m, _ in picks) == 120
    assert len(set(picks)) == 130


def test_mmal_empty_selected_set_is_least_covered_and_ties_go_to_fewer_acquisitions():
    state = make_state(s=(20, 0), seed=6)
    assert MMALStrategy.modality_order(state)[0] == "text"
    assert {m for m, _ in MMALStrategy().select(state, 12, np.random.default_rng(0))} == {"text"}
    cold = make_state(s=(0, 0), seed=6, acquired={"image": 3, "text": 7})
    assert MMALStrategy.modality_order(cold) == ["image", "text"]
    cold = make_state(s=(0, 0), seed=6, acquired={"image": 8, "text": 7})
    assert MMALStrategy.modality_order(cold) == ["text", "image"]


def test_mmal_third_step_takes_the_lowest_margins_of_the_shortlist():
    state = make_state(s=(10, 0), seed=7)
    budget, factor = 5, 3
    picks = MMALStrategy(candidate_factor=factor).select(state, budget, np.random.default_rng(0))
    shortlist = k_center_greedy(state.embedded["text"], state.selected["text"], budget * factor)
    assert {i for _, i in picks} <= set(shortlist)
    unc = uncertainty("margin", other_modality_sims(state, "text"), 0.05)
    worst_pick = min(unc[i] for _, i in picks)
    rest = [unc[i] for i in shortlist if ("text", i) not in picks]
    assert worst_pick >= max(rest) - 1e-6


# --------------------------------------------------------------------------- k-means++ / BADGE
def test_kmeans_pp_never_picks_a_zero_norm_duplicate_twice():
    g = np.zeros((13, 4))
    g[10:] = np.array([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 3.0, 0]])
    for seed in range(30):
        picks = kmeans_pp(g, 4, np.random.default_rng(seed))
        assert len(set(picks)) == 4
        assert sum(p < 10 for p in picks) == 1  # exactly one of the all-zero rows
        assert picks[0] >= 10  # first center ∝ ||g||²: never a zero row
    assert sorted(kmeans_pp(g, 13, np.random.default_rng(0))) == list(range(13))
    assert kmeans_pp(g, 0, np.random.default_rng(0)) == []


@HYP
@given(st.integers(1, 30), st.integers(1, 6), st.integers(0, 35), st.integers(0, 2**31))
def test_kmeans_pp_distinct_rows_and_vectors(n, n_unique, budget, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(-2, 3, size=(n_unique, 3)).astype(float)
    g = base[rng.integers(0, n_unique, size=n)]
    picks = kmeans_pp(g, budget, np.random.default_rng(seed))
    assert len(picks) == min(budget, n) and len(set(picks)) == len(picks)
    n_distinct = len({tuple(r) for r in g})
    if budget <= n_distinct:
        assert len({tuple(g[p]) for p in picks}) == len(picks)


def test_badge_gradient_embeddings_shape_and_pca_padding():
    state = make_state(affine=True)
    g = gradient_embeddings(state, 0.05, 32)
    assert g.shape == (270, K * 32) and np.isfinite(g).all()
    h = pca_features(state.raw["text"], 32)  # d = 12 < 32: zero padded
    assert h.shape == (120, 32) and np.all(h[:, 12:] == 0)
    assert np.mean(np.sum(h ** 2, axis=1)) == pytest.approx(1.0)
    assert isinstance(BadgeStrategy().select(state, 3, np.random.default_rng(0)), list)


# ---------------------------------------------------------------------------------- BMMAL
def test_bmmal_contributions_and_weights_on_hand_made_inputs():
    c = modality_contributions([0.9, 0.9, 0.5, 0.6], [0.8, 0.3, 0.5, 0.2],
                               [0.3, 0.8, 0.5, 0.9], [0.25, 0.25, 0.5, 0.25])
    np.testing.assert_allclose(c.phi_first[:2], [0.575, 0.075])
    np.testing.assert_allclose(c.phi_second[:2], [0.075, 0.575])
    np.testing.assert_allclose(c.contrib_first + c.contrib_second, 1.0)
    np.testing.assert_allclose(c.contrib_first[:2], [0.575 / 0.65, 0.075 / 0.65])
    rho = (0.575 - 0.075) / 0.65
    np.testing.assert_allclose(c.rho[:2], [rho, rho])
    np.testing.assert_allclose(c.w_first[:2], [1.0, 1 - rho])  # eq. 14: stronger -> 1
    np.testing.assert_allclose(c.w_second[:2], [1 - rho, 1.0])
    # no contribution at all: 0.5 each, no dominance, both weights 1
    assert (c.contrib_first[2], c.contrib_second[2], c.rho[2]) == (0.5, 0.5, 0.0)
    assert (c.w_first[2], c.w_second[2]) == (1.0, 1.0)
    # negative Shapley values count by magnitude (eq. 12)
    assert c.phi_first[3] < 0 < c.phi_second[3]
    assert c.contrib_second[3] > c.contrib_first[3] and c.w_second[3] == 1.0


_v = st.floats(0.0, 1.0)


@HYP
@given(st.lists(st.tuples(_v, _v, _v, _v), min_size=1, max_size=20))
def test_bmmal_contribution_properties(rows):
    vb, v1, v2, v0 = (np.array(col) for col in zip(*rows, strict=True))
    c = modality_contributions(vb, v1, v2, v0)
    np.testing.assert_allclose(c.phi_first + c.phi_second, vb - v0, atol=1e-12)  # efficiency
    np.testing.assert_allclose(c.contrib_first + c.contrib_second, 1.0)
    assert np.all((c.contrib_first >= 0) & (c.contrib_second >= 0))
    np.testing.assert_allclose(np.maximum(c.w_first, c.w_second), 1.0)
    np.testing.assert_allclose(np.minimum(c.w_first, c.w_second), 1.0 - c.rho)
    stronger_first = c.contrib_first >= c.contrib_second
    assert np.all(c.w_first[stronger_first] == 1.0)
    assert np.all(c.w_second[~stronger_first] == 1.0)


def test_bmmal_fusion_and_gradient_embeddings():
    protos = _unit(np.eye(4)[:3])
    zero = np.zeros((2, 4))
    p = fused_probs(zero, zero, protos, 0.05)
    np.testing.assert_allclose(p, 1 / 3)  # both modalities missing -> uniform
    z = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    np.testing.assert_allclose(fused_probs(z, zero, protos, 0.05),
                               fused_probs(z, z, protos, 0.05))
    state = make_state(affine=True)
    g = BMMALStrategy(n_proto=6).gradient_embeddings(state, np.random.default_rng(0))
    assert g.shape == (270, 2 * 6 * K) and np.isfinite(g).all()


# ---------------------------------------------------------------------------------- VeCAF
@pytest.mark.parametrize("seed", range(3))
def test_vecaf_picks_are_spread(seed):
    state = make_state(affine=True, seed=seed)
    strategy = VeCAFStrategy()
    picks = strategy.select(state, 12, np.random.default_rng(seed))
    x = joint_embedded(state)
    min_dist = strategy.effective_min_dist(x)
    assert min_dist > 0
    pz = np.stack([state.embedded[m][i] for m, i in picks]).astype(np.float64)
    d = np.linalg.norm(pz[:, None] - pz[None], axis=2)
    assert d[~np.eye(len(pz), dtype=bool)].min() >= min_dist
    acquired = np.concatenate([state.selected[m] for m in MODS]).astype(np.float64)
    assert np.linalg.norm(pz[:, None] - acquired[None], axis=2).min() >= min_dist


def test_vecaf_infeasible_min_dist_still_fills_the_budget_and_loss_weights():
    state = make_state(affine=True)
    picks = VeCAFStrategy(min_dist=10.0).select(state, 20, np.random.default_rng(0))
    assert len(set(picks)) == 20
    loss = pseudo_loss(state)
    assert loss.shape == (270,) and np.all(loss >= 0)
    p = loss_distribution(loss, 1.0)
    assert p.sum() == pytest.approx(1.0)
    assert np.argmax(p) == np.argmax(loss)
    # higher loss -> higher probability, temperature flattens it
    flat = loss_distribution(loss, 100.0)
    assert flat.max() / flat.min() < p.max() / p.min()
