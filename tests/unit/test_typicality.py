"""Typicality (``service.core.pool.typicality``) and its term in the pool default
(``HybridStrategy(typicality=...)``)."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.pool.hybrid import HybridStrategy
from service.core.pool.typicality import typicality
from tests.unit.test_pool_strategies import hand_state, make_state


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_typicality_is_the_mean_cosine_to_the_k_nearest_other_rows():
    rng = np.random.default_rng(0)
    z = _unit(rng.standard_normal((50, 6)))
    got = typicality(z, k=5)
    sims = z @ z.T
    np.fill_diagonal(sims, -np.inf)
    want = np.sort(sims, axis=1)[:, -5:].mean(axis=1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # blocks change memory, not the result
    np.testing.assert_allclose(typicality(z, k=5, block=7), got, atol=1e-6)
    # k is capped at n - 1; fewer than two rows have no neighbours
    np.testing.assert_allclose(typicality(z[:3], k=10), typicality(z[:3], k=2))
    assert typicality(z[:1]).tolist() == [0.0] and typicality(z[:0]).shape == (0,)
    with pytest.raises(ValueError, match="k and block must be >= 1, got k=0, block=1024"):
        typicality(z, k=0)


def test_a_dense_cluster_is_more_typical_than_an_outlier():
    rng = np.random.default_rng(1)
    cluster = _unit(np.array([1.0, 0, 0]) + 0.05 * rng.standard_normal((30, 3)))
    outlier = _unit(np.array([[0.0, 0.0, 1.0]]))
    t = typicality(np.concatenate([cluster, outlier]), k=5)
    assert t[-1] < t[:-1].min()


def test_typicality_steers_the_default_away_from_outliers():
    # diversity alone (nothing acquired yet) is a tie everywhere; with typicality the first picks
    # come from the dense cluster, never the isolated outliers
    rng = np.random.default_rng(2)
    k = 4
    dense = _unit(np.array([1.0, 0, 0, 0]) + 0.05 * rng.standard_normal((40, k)))
    outliers = _unit(rng.standard_normal((5, k)) * np.array([0, 1, 1, 1]))
    emb = {m: np.concatenate([dense, outliers]).astype(np.float32) for m in ("image", "text")}
    state = hand_state(emb)
    picks = HybridStrategy(weight=0.0, typicality=0.5).select(state, 6,
                                                               np.random.default_rng(0))
    assert all(j < 40 for _, j in picks)


def test_zero_typicality_is_the_plain_default_pick_for_pick():
    state = make_state(seed=3, affine=True)
    a = HybridStrategy().select(state, 20, np.random.default_rng(4))
    b = HybridStrategy(typicality=0.0).select(state, 20, np.random.default_rng(4))
    assert a == b


@pytest.mark.parametrize(("kw", "msg"), [
    ({"weight": 0.8, "typicality": 0.3}, r"typicality must be in \[0, 1 - weight\] = \[0, 0.2\]"),
    ({"typicality": -0.1}, "typicality must be in"),
    ({"typicality_k": 0}, "typicality_k must be >= 1, got 0"),
])
def test_bad_typicality_settings_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        HybridStrategy(**kw)


def test_picks_are_distinct_and_within_budget_with_typicality():
    state = make_state(seed=5, affine=True)
    picks = HybridStrategy(typicality=0.35).select(state, 40, np.random.default_rng(0))
    assert len(picks) == 40 and len(set(picks)) == 40
    assert all(0 <= j < state.size(m) for m, j in picks)


def test_the_service_and_the_benchmark_run_the_same_pool_default():
    from service import handlers
    from service.core.pool import DEFAULT_STRATEGY, default_pool_strategy
    from service.evaluation import simulator

    assert handlers.DEFAULT_POOL_STRATEGY is DEFAULT_STRATEGY is default_pool_strategy
    assert simulator._pool_strategies()["default"] is DEFAULT_STRATEGY
    strat = default_pool_strategy()
    assert (strat.weight, strat.typicality, strat.typicality_k) == (0.0, 0.5, 20)
    # the earlier default stays runnable by name, for comparisons
    assert simulator._pool_strategies()["margin-0.3"]().weight == 0.3
