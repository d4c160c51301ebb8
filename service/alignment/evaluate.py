"""Evaluation of an alignment model: cross-modal retrieval recall@k on held-out true pairs."""

from __future__ import annotations

import numpy as np
import torch

from service.alignment.model import AlignmentModel


def recall_at_k(za: np.ndarray, zb: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """Recall@k of retrieving row i of ``zb`` from row i of ``za`` and back.

    Parameters
    ----------
    za, zb : ndarray of shape (n, k)
        Embeddings of n held-out true pairs (row i of each is a pair).
    ks : iterable of int

    Returns
    -------
    dict
        ``r{k}`` (mean of both directions), ``r{k}_ab`` and ``r{k}_ba`` for every k.
    """
    if za.shape[0] != zb.shape[0] or za.shape[0] == 0:
        raise ValueError(f"need the same non-zero number of rows, got {za.shape} and {zb.shape}")
    s = torch.as_tensor(za) @ torch.as_tensor(zb).T
    n = s.shape[0]
    diag = s.diagonal()
    # rank of the true partner = number of candidates scored strictly higher
    rank_ab = (s > diag[:, None]).sum(dim=1)
    rank_ba = (s > diag[None, :]).sum(dim=0)
    out: dict[str, float] = {}
    for k in ks:
        ab = float((rank_ab < k).float().mean())
        ba = float((rank_ba < k).float().mean())
        out[f"r{k}_ab"], out[f"r{k}_ba"], out[f"r{k}"] = ab, ba, (ab + ba) / 2
    out["n"] = n
    return out


def retrieval_recall(model: AlignmentModel, xa, xb, ks=(1, 5)) -> dict[str, float]:
    """Embed held-out pairs with ``model`` and return :func:`recall_at_k`."""
    ma, mb = model.modalities
    return recall_at_k(model.embed(ma, xa), model.embed(mb, xb), ks)
