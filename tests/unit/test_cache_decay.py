"""Drift-aware decay of the distance cache: old selections cover a shrinking ball."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.distance_cache import DistanceCache
from service.core.selector import SelectorConfig
from tests.unit.test_selector import _batch, _selector


def _unit(rng, n, k):
    x = rng.normal(size=(n, k)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_an_old_point_counts_at_twice_its_distance_after_one_half_life():
    c = DistanceCache(3, 8, empty_value=2.0)
    c.add(np.array([[1.0, 0.0, 0.0]], np.float32), clock=100)
    q = np.array([[0.8, 0.6, 0.0]], np.float32)  # distance sqrt(0.4) ~ 0.632
    plain = c.min_distance(q)[0]
    assert c.min_distance(q, clock=100, half_life=50)[0] == pytest.approx(plain, rel=1e-6)
    assert c.min_distance(q, clock=150, half_life=50)[0] == pytest.approx(2 * plain, rel=1e-5)
    # capped at the empty-cache value: a very old selection counts as no selection
    assert c.min_distance(q, clock=10_000, half_life=50)[0] == pytest.approx(2.0)
    np.testing.assert_allclose(c.ages(160), [60.0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), half_life=st.floats(1.0, 1e4), clock=st.floats(0, 2e4))
def test_decayed_distance_is_bounded_by_the_plain_distance_and_the_cap(seed, half_life, clock):
    rng = np.random.default_rng(seed)
    c = DistanceCache(6, 32, empty_value=1.5)
    for t in range(5):
        c.add(_unit(rng, 6, 6) * rng.uniform(0.5, 2.0), clock=t * 1000.0)
    q = _unit(rng, 10, 6) * 1.3
    plain = c.min_distance(q)
    aged = c.min_distance(q, clock=max(clock, 4000.0), half_life=half_life)
    assert np.all(aged >= plain - 1e-5)
    assert np.all(aged <= np.maximum(plain, 1.5) + 1e-5)
    # brute force: min over points of min(d * 2 ** (age / h)), then the cap
    emb = c.embeddings.numpy()
    d = np.linalg.norm(q[:, None, :] - emb[None], axis=2)
    grow = np.exp2(np.minimum(c.ages(max(clock, 4000.0)) / half_life, 60.0))
    want = np.minimum((d * grow[None]).min(axis=1), np.maximum(plain, 1.5))
    np.testing.assert_allclose(aged, want, rtol=1e-4, atol=1e-5)


def test_birth_clocks_survive_evictions_and_reprojection():
    rng = np.random.default_rng(0)
    c = DistanceCache(4, 6, raw_dim=4)
    for t in range(4):  # 12 points into 6 slots: the sequential, evicting path
        x = _unit(rng, 3, 4)
        c.add(x, raw=x, clock=[10.0 * t, 10.0 * t + 1, 10.0 * t + 2])
    raw_of_born = {float(b): c._raw[i].copy() for i, b in enumerate(c._born[: c.size])}
    assert c.size == 6 and c.evictions == 6
    # each survivor's clock is the one it was added with (raw vectors were added as themselves)
    for b, raw in raw_of_born.items():
        t, j = divmod(int(b), 10)
        assert 0 <= j <= 2 and t <= 3
        np.testing.assert_allclose(c._raw[list(c._born[: c.size]).index(b)], raw)
    before = sorted(c._born[: c.size].tolist())
    c.reproject(lambda raw, tag: torch.from_numpy(raw[:, ::-1].copy()), model_version=2)
    assert sorted(c._born[: c.size].tolist()) == before


def test_without_a_half_life_nothing_changes():
    rng = np.random.default_rng(1)
    c = DistanceCache(5, 16)
    c.add(_unit(rng, 10, 5), clock=3)
    q = _unit(rng, 4, 5)
    np.testing.assert_array_equal(c.min_distance(q), c.min_distance(q, clock=1e9))
    with pytest.raises(ValueError, match="decay needs a clock and a half_life > 0"):
        c.min_distance(q, clock=None, half_life=10.0)


@pytest.mark.parametrize("bad", [0.0, -5.0, float("inf"), float("nan")])
def test_selector_refuses_a_bad_half_life(bad):
    with pytest.raises(ValueError, match="cache_half_life must be a number > 0"):
        SelectorConfig(cache_half_life=bad)


def test_a_region_covered_long_ago_is_open_again_under_decay():
    """The same selections (the budget is spent on the first batch), then a long stretch of other
    items: the first region's items score the same diversity as before without decay, and a
    higher one with decay (the selector's clock counts the items offered in between)."""
    runs = {}
    for half_life in (None, 100.0):
        sel, a, b, _ = _selector(total=5, rate=0.3, cache_half_life=half_life)
        sel.commit(sel.propose(_batch(a, b, 0, 40)))
        early = np.array([d.diversity for d in sel.propose(_batch(a, b, 0, 40)).decisions])
        for lo in range(40, 400, 40):
            sel.commit(sel.propose(_batch(a, b, lo, lo + 40)))
        late = np.array([d.diversity for d in sel.propose(_batch(a, b, 0, 40)).decisions])
        assert sel.status()["spent"] == 5 and sel.clock == 400
        runs[half_life] = (early, late)
    (e0, l0), (e1, l1) = runs[None], runs[100.0]
    np.testing.assert_allclose(l0, e0, rtol=1e-6)  # no decay: as covered as it was
    assert np.all(e1 >= e0 - 1e-6) and np.all(l1 >= e1 - 1e-6)  # decay only ever opens up
    assert np.mean(l1) > np.mean(e1) + 0.1
