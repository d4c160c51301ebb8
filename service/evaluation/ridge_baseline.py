"""The plain ridge baseline of issue 13, a named learner of the benchmark (``--learner
ridge-baseline``): what a user gets without pairsieve's learner.

Two ridge maps fitted on the acquired pairs, ``a -> b`` and ``b -> a`` (each centred on the pairs'
means), each lambda chosen by exact leave-one-out squared error on the acquired pairs only; a
candidate pair is scored by the mean of the two cosines ``cos(W_ab a, b)`` and ``cos(a, W_ba b)``.
Nothing but the acquired pairs is used (no unpaired items, no test split).
"""

from __future__ import annotations

import numpy as np

from service.alignment.evaluate import recall_from_scores

__all__ = ["RidgeBaseline", "recall_from_scores", "ridge_loo_mse"]

LAMBDAS = tuple(float(x) for x in np.logspace(-3, 3, 13))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def ridge_loo_mse(x: np.ndarray, y: np.ndarray, lambdas=LAMBDAS) -> tuple[float, np.ndarray]:
    """Ridge ``x -> y`` (both centred) with lambda by exact leave-one-out squared error.

    Parameters
    ----------
    x : ndarray (n, d)
    y : ndarray (n, k)
    lambdas : sequence of float (> 0)

    Returns
    -------
    (lambda, W (d, k)) of the lambda with the smallest leave-one-out mean squared error
    (residual ``r_i / (1 - h_ii)``, closed form from one SVD of ``x``).
    """
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    uty = u.T @ y
    best = (np.inf, float(lambdas[0]))
    for lam in lambdas:
        f = s**2 / (s**2 + lam)
        h = (u**2) @ f
        resid = y - u @ (f[:, None] * uty)
        loo = float(np.mean((resid / np.maximum(1.0 - h, 1e-9)[:, None]) ** 2))
        if loo < best[0]:
            best = (loo, float(lam))
    lam = best[1]
    return lam, vt.T @ ((s / (s**2 + lam))[:, None] * uty)


class RidgeBaseline:
    """Fitted two-map ridge baseline.

    Parameters
    ----------
    a : ndarray (n, d_a)
    b : ndarray (n, d_b)
        The acquired pairs (row i with row i), n >= 2.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if len(a) != len(b) or len(a) < 2:
            raise ValueError(f"ridge baseline: need >= 2 pairs of equal count, got {len(a)} "
                             f"and {len(b)} rows")
        self.mean_a, self.mean_b = a.mean(axis=0), b.mean(axis=0)
        ca, cb = a - self.mean_a, b - self.mean_b
        self.lambda_ab, self.w_ab = ridge_loo_mse(ca, cb)
        self.lambda_ba, self.w_ba = ridge_loo_mse(cb, ca)

    def scores(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Pair scores, shape (p, d_a), (q, d_b) -> (p, q): the mean of both maps' cosines."""
        ca = np.asarray(a, np.float64) - self.mean_a
        cb = np.asarray(b, np.float64) - self.mean_b
        return 0.5 * (_unit(ca @ self.w_ab) @ _unit(cb).T + _unit(ca) @ _unit(cb @ self.w_ba).T)
