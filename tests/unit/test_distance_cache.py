"""Distance cache invariants: bounded size, exact distances, monotone coverage,
coverage-keeping eviction."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.distance_cache import DistanceCache, pairwise_sq_dist


def _unit(rng, n, k):
    x = rng.normal(size=(n, k)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_min(x, c, empty=2.0):
    if len(c) == 0:
        return np.full(len(x), empty)
    return np.sqrt(((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)).min(1)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), cap=st.integers(1, 12), n_add=st.integers(1, 40),
       chunk=st.integers(1, 7))
def test_never_exceeds_capacity_and_matches_brute_force(seed, cap, n_add, chunk):
    rng = np.random.default_rng(seed)
    cache = DistanceCache(dim=4, capacity=cap)
    pts = _unit(rng, n_add, 4)
    probe = _unit(rng, 9, 4)
    for i in range(0, n_add, chunk):
        cache.add(pts[i:i + chunk])
        assert cache.size <= cap
        cached = cache.embeddings.numpy()
        np.testing.assert_allclose(cache.min_distance(probe), _brute_min(probe, cached), atol=1e-4)
        # the neighbour cache is exact
        if cache.size >= 2:
            d = np.sqrt(((cached[:, None] - cached[None]) ** 2).sum(-1))
            np.fill_diagonal(d, np.inf)
            np.testing.assert_allclose(cache.neighbour_distances(), d.min(1), atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30))
def test_min_distance_never_increases_while_below_capacity(seed, n):
    rng = np.random.default_rng(seed)
    cache = DistanceCache(dim=3, capacity=64)
    probe = _unit(rng, 20, 3)
    prev = cache.min_distance(probe)
    for p in _unit(rng, n, 3):
        cache.add(p[None])
        cur = cache.min_distance(probe)
        # float32 |x|^2 + |c|^2 - 2 x.c: the same distance recomputed differs by ~1e-6 near 0.05
        assert np.all(cur <= prev + 1e-5)
        prev = cur


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_eviction_loses_at_most_the_evicted_points_nn_distance(seed):
    rng = np.random.default_rng(seed)
    cache = DistanceCache(dim=3, capacity=6)
    cache.add(_unit(rng, 6, 3))
    probe = _unit(rng, 30, 3)
    before = cache.min_distance(probe)
    worst_nn = cache.neighbour_distances().min()
    cache.add(_unit(rng, 1, 3))
    after = cache.min_distance(probe)
    # triangle inequality: removing e raises any distance by at most nn_dist(e)
    assert np.all(after <= before + worst_nn + 1e-5)


def test_eviction_keeps_outliers_not_fifo():
    cache = DistanceCache(dim=2, capacity=3)
    far = np.array([[10.0, 0.0]], np.float32)
    cache.add(far)
    cache.add(np.array([[0.0, 0.0], [0.01, 0.0]], np.float32))
    cache.add(np.array([[0.0, 5.0]], np.float32))  # full: one of the two near-duplicates goes
    kept = cache.embeddings.numpy()
    assert cache.size == 3 and cache.evictions == 1
    assert any(np.allclose(k, far[0]) for k in kept)  # the oldest point (an outlier) survives
    assert any(np.allclose(k, [0.0, 5.0]) for k in kept)


def test_redundant_new_point_is_dropped_when_full():
    cache = DistanceCache(dim=2, capacity=2)
    cache.add(np.array([[0.0, 0.0], [1.0, 0.0]], np.float32))
    cache.add(np.array([[0.0, 0.001]], np.float32))
    assert cache.size == 2 and cache.evictions == 1
    assert cache.min_distance(np.array([[1.0, 0.0]]))[0] == pytest.approx(0.0, abs=1e-5)


def test_reproject_uses_raw_and_tags_and_sets_version():
    cache = DistanceCache(dim=2, capacity=8, raw_dim=3)
    cache.add(np.array([[1.0, 0.0]], np.float32), raw=np.array([[1.0, 2.0, 3.0]]), tag=0)
    cache.add(np.array([[0.0, 1.0]], np.float32), raw=np.array([[5.0, 6.0]]), tag=1)
    seen = []

    def embed(raw, tag):
        seen.append((tag, raw.shape))
        return np.tile(np.array([[0.6, 0.8]], np.float32), (len(raw), 1))

    cache.reproject(embed, model_version=7)
    assert sorted(seen) == [(0, (1, 3)), (1, (1, 2))]
    assert cache.model_version == 7 and cache.size == 2
    np.testing.assert_allclose(cache.embeddings.numpy(), [[0.6, 0.8], [0.6, 0.8]], atol=1e-6)


def test_bad_input_raises_clear_errors():
    cache = DistanceCache(dim=4, capacity=4)
    with pytest.raises(ValueError, match="wrong dimension 3, expected 4"):
        cache.min_distance(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN or inf"):
        cache.add(np.array([[np.nan, 0, 0, 0]]))
    with pytest.raises(ValueError, match="empty batch"):
        cache.add(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="capacity must be"):
        DistanceCache(dim=4, capacity=0)
    with pytest.raises(ValueError, match="keeps no raw"):
        cache.reproject(lambda r, t: r, 1)
    with pytest.raises(ValueError, match="expected shape"):
        cache.min_distance(torch.zeros(2, 5))


def test_empty_cache_reports_empty_value():
    cache = DistanceCache(dim=2, capacity=2, empty_value=2.0)
    np.testing.assert_array_equal(cache.min_distance(np.ones((3, 2))), [2.0, 2.0, 2.0])


def _union_nn(points):
    d = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return d.min(1)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), cap=st.integers(2, 10), n_add=st.integers(1, 60),
       dup=st.floats(0.0, 0.5))
def test_lazy_neighbour_upkeep_evicts_a_most_redundant_point(seed, cap, n_add, dup):
    """Against the eager rule, point by point: when full, the point dropped from cache ∪ {new}
    has the smallest nearest-neighbour distance there (mutual nearest neighbours tie, so which
    of the two goes is up to float rounding), and the stale bookkeeping never lets a point with
    a larger distance go first."""
    rng = np.random.default_rng(seed)
    pts = _unit(rng, n_add, 3)
    near = rng.random(n_add) < dup  # some near-duplicates of earlier points
    for i in np.flatnonzero(near)[1:]:
        pts[i] = pts[rng.integers(i)] + 1e-2 * rng.normal(size=3).astype(np.float32)
    cache = DistanceCache(dim=3, capacity=cap)
    for p in pts:
        before = cache.embeddings.numpy().copy()
        cache.add(p[None])
        after = cache.embeddings.numpy()
        if len(before) < cap:
            assert len(after) == len(before) + 1
            continue
        union = np.vstack([before, p[None]])
        nn = _union_nn(union)
        gone = [i for i, u in enumerate(union)
                if np.sqrt(((after - u) ** 2).sum(-1)).min() > 1e-7]
        assert len(gone) == 1 and len(after) == cap
        assert nn[gone[0]] <= nn.min() + 1e-4  # float32 |a|^2+|b|^2-2ab: ~1e-5 at d ~ 0.01
    assert cache.evictions == max(0, n_add - cap)


def _add_row_by_row(cache: DistanceCache, x: np.ndarray, clock: float) -> None:
    """The reference of ``DistanceCache._add_sequential``: every row through ``_add_one``, its
    distances to the cache as it is then (the batch's new-to-cache and new-to-new products)."""
    t = torch.from_numpy(x)
    with torch.inference_mode():
        d_xe = np.full((len(x), cache.capacity), np.inf)
        m0 = cache.size
        if m0:
            d_xe[:, :m0] = pairwise_sq_dist(t, cache._emb[:m0], cache._sq[:m0]) \
                .sqrt_().double().numpy()
        d_xx = pairwise_sq_dist(t, t, (t * t).sum(dim=1)).sqrt_().double().numpy()
        src = np.full(cache.capacity, -1)
        for i in range(len(x)):
            d_new = d_xe[i, :cache.size].copy()
            moved = np.flatnonzero(src[:cache.size] >= 0)
            d_new[moved] = d_xx[i, src[moved]]
            slot = cache._add_one(t[i], None, 0, d_new, (t[i] * t[i]).sum())
            if slot is not None:
                src[slot] = i
                cache._born[slot] = clock


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), cap=st.integers(1, 24), batches=st.integers(1, 6),
       size=st.integers(1, 40), dup=st.floats(0.0, 0.8), grid=st.booleans())
def test_a_batch_turned_away_together_evicts_exactly_as_row_by_row(seed, cap, batches, size,
                                                                    dup, grid):
    """The batched insertion (the rows a full cache turns away decided together) leaves the
    cache bit for bit as the row-by-row rule does: the same slots, neighbour distances, stale
    marks and eviction count, batch after batch (near-duplicates make rows go in and be turned
    away in mixed runs, exact copies tie with the eviction candidate, and stale minima reach
    it). On a small integer grid every distance is exact, so ties are common."""
    rng = np.random.default_rng(seed)

    def draw(n):
        return rng.integers(0, 3, size=(n, 5)).astype(np.float32) if grid else _unit(rng, n, 5)

    fast, ref = DistanceCache(dim=5, capacity=cap), DistanceCache(dim=5, capacity=cap)
    seen = draw(1)
    for b in range(batches):
        x = draw(size)
        near = rng.random(size) < dup
        k = int(near.sum())
        exact = rng.random((k, 1)) < 0.5  # exact copies: distance 0 to a cached point
        x[near] = seen[rng.integers(len(seen), size=k)] \
            + np.where(exact, 0.0, 1e-3 * rng.normal(size=(k, 5))).astype(np.float32)
        seen = np.vstack([seen, x])
        with torch.inference_mode():
            if fast.size + size <= cap:  # fits: the bulk path, the same for both
                fast.add(x, clock=b)
                ref.add(x, clock=b)
                continue
            fast._add_sequential(torch.from_numpy(x), None, 0, np.full(size, float(b)))
        _add_row_by_row(ref, x, float(b))
        n = ref.size
        assert fast.size == n and fast.evictions == ref.evictions
        np.testing.assert_array_equal(fast.embeddings.numpy(), ref.embeddings.numpy())
        np.testing.assert_array_equal(fast._nn[:n], ref._nn[:n])
        np.testing.assert_array_equal(fast._nn_idx[:n], ref._nn_idx[:n])
        np.testing.assert_array_equal(fast._stale[:n], ref._stale[:n])
        np.testing.assert_array_equal(fast._born[:n], ref._born[:n])
