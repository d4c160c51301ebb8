"""The retrieval rule of an alignment model: cosine, corrected for hubness by CSLS.

In a shared space fitted on few pairs some items are *hubs*: close to almost everything in the
other modality, so plain nearest-neighbour retrieval returns them for many queries and buries the
true partners. CSLS ([Lample2018], cross-domain similarity local scaling) scores a pair
``2 cos(a, b) - r_a - r_b``, with ``r_x`` the mean cosine of ``x`` to its ``k`` nearest
neighbours among the candidates of the other side: a hub's high ``r`` discounts it. The trainer's
self-learning already matches pseudo-pairs this way; :class:`~service.alignment.AlignmentModel`
ranks candidates this way too when its ``retrieval_csls_k`` is > 0 (every trained model by
default, :class:`~service.alignment.TrainerConfig`).

Measured on tuning seeds 100-105 with random pairs (``python scripts/retrieval_rule_check.py``,
``reports/retrieval-rule.md``): R@1 on the held-out pairs rises at every budget on both real
sets, for the project's learner and for the plain ridge baseline alike.
"""

from __future__ import annotations

import numpy as np


def csls_scores(sims: np.ndarray, k: int) -> np.ndarray:
    """CSLS of a similarity matrix.

    Parameters
    ----------
    sims : ndarray of shape (p, q)
        Cosines of p queries (rows) against q candidates (columns).
    k : int
        Neighbourhood size, >= 1 (capped at the set sizes).

    Returns
    -------
    ndarray of shape (p, q)
        ``2 sims - r_rows[:, None] - r_cols[None, :]``, ``r_rows`` (p,) the mean of each row's
        ``k`` largest values and ``r_cols`` (q,) the same per column. An empty matrix is
        returned as it is.
    """
    s = np.asarray(sims, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"sims must be a (p, q) matrix, got shape {s.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if s.size == 0:
        return s.copy()
    kr, kc = min(k, s.shape[1]), min(k, s.shape[0])
    r_rows = -np.partition(-s, kr - 1, axis=1)[:, :kr].mean(axis=1)
    r_cols = -np.partition(-s, kc - 1, axis=0)[:kc, :].mean(axis=0)
    return 2 * s - r_rows[:, None] - r_cols[None, :]
