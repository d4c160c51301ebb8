"""Typicality: how densely an item's own modality surrounds it (TypiClust's measure).

At low budgets the items worth labelling first are the *typical* ones: those in dense regions,
which a model generalises from to many others, rather than the uncertain or the far-out ones
([TypiClust]: Hacohen, Dekel and Weinshall, "Active learning on a budget: opposite strategies
suit high and low budgets", ICML 2022). Typicality here is the mean cosine similarity of an item
to its ``k`` nearest other items of the same set (TypiClust uses the inverse mean distance; on
unit vectors the two order items alike).
"""

from __future__ import annotations

import numpy as np
import torch


def typicality(z: np.ndarray, k: int = 20, block: int = 1024) -> np.ndarray:
    """Mean cosine of each row to its ``k`` nearest other rows.

    Parameters
    ----------
    z : ndarray of shape (n, d)
        Unit rows (e.g. candidates in the shared space).
    k : int
        Neighbours averaged (capped at ``n - 1``).
    block : int
        Rows per similarity block: memory stays O(block * n), not O(n^2).

    Returns
    -------
    ndarray of shape (n,), float64; zeros when ``n < 2``.
    """
    if k < 1 or block < 1:
        raise ValueError(f"k and block must be >= 1, got k={k}, block={block}")
    n = len(z)
    if n < 2:
        return np.zeros(n)
    kk = min(k, n - 1)
    t = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
    out = np.empty(n)
    with torch.inference_mode():
        for start in range(0, n, block):
            sims = t[start:start + block] @ t.T
            rows = torch.arange(len(sims))
            sims[rows, rows + start] = -torch.inf  # not its own neighbour
            out[start:start + block] = sims.topk(kk, dim=1).values.mean(dim=1).double().numpy()
    return out
