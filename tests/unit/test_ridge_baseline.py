"""The issue-13 ridge baseline: leave-one-out lambda, two-map scores, simulator wiring."""

from __future__ import annotations

import numpy as np
import pytest

from service.evaluation.ridge_baseline import RidgeBaseline, recall_from_scores, ridge_loo_mse


def test_loo_mse_lambda_matches_brute_force_leave_one_out():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 6))
    y = x @ rng.standard_normal((6, 3)) + 0.5 * rng.standard_normal((30, 3))
    lambdas = (0.01, 1.0, 30.0, 1000.0)

    def brute(lam):
        err = []
        for i in range(len(x)):
            keep = np.arange(len(x)) != i
            w = np.linalg.solve(x[keep].T @ x[keep] + lam * np.eye(6), x[keep].T @ y[keep])
            err.append(np.sum((y[i] - x[i] @ w) ** 2) / 3)
        return np.mean(err)

    lam, w = ridge_loo_mse(x, y, lambdas)
    assert lam == min(lambdas, key=brute)
    np.testing.assert_allclose(w, np.linalg.solve(x.T @ x + lam * np.eye(6), x.T @ y),
                               atol=1e-10)


def test_two_map_scores_find_linear_partners():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((120, 8))
    b = a @ rng.standard_normal((8, 5)) + 0.05 * rng.standard_normal((120, 5))
    model = RidgeBaseline(a[:80], b[:80])
    s = model.scores(a[80:], b[80:])
    assert s.shape == (40, 40)
    assert recall_from_scores(s)["r1"] > 0.8
    chance = recall_from_scores(RidgeBaseline(a[:80], b[rng.permutation(80)]).scores(a[80:],
                                                                                     b[80:]))
    assert chance["r1"] < 0.3


def test_recall_from_scores_counts_strictly_higher():
    s = np.array([[1.0, 0.5], [2.0, 0.1]])  # row 1's partner (0.1) is beaten by 2.0
    rec = recall_from_scores(s, ks=(1,))
    assert rec["r1_ab"] == 0.5 and rec["r1_ba"] == 0.0  # column 0: 2.0 beats 1.0


def test_baseline_needs_two_equal_pair_sets():
    with pytest.raises(ValueError, match="need >= 2 pairs of equal count, got 1 and 1"):
        RidgeBaseline(np.zeros((1, 3)), np.zeros((1, 2)))


def test_simulator_runs_the_baseline_for_random_only():
    from service.evaluation.datasets import get_dataset
    from service.evaluation.simulator import SimConfig, simulate

    with pytest.raises(ValueError, match="random selection only, got strategy 'default'"):
        SimConfig(strategy="default", learner="ridge-baseline")
    with pytest.raises(ValueError, match="learner must be 'pairsieve' or 'ridge-baseline'"):
        SimConfig(learner="svm")
    ds = get_dataset("synthetic", seed=0)
    res = simulate(ds, SimConfig(strategy="random", learner="ridge-baseline", budget=60,
                                 test_size=100, seed=3))
    assert res["learner"] == "ridge-baseline"
    assert res["curve"][-1]["pairs"] == 60 and res["curve"][-1]["r1"] > 0.2
