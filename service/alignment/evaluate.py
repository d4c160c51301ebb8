"""Evaluation of an alignment model: cross-modal retrieval recall@k on held-out true pairs."""

from __future__ import annotations

import numpy as np
import torch

from service.alignment.model import AlignmentModel
from service.alignment.retrieval import csls_scores


def recall_at_k(za: np.ndarray, zb: np.ndarray, ks=(1, 5),
                csls_k: int = 0) -> dict[str, float]:
    """Recall@k of retrieving row i of ``zb`` from row i of ``za`` and back.

    Parameters
    ----------
    za, zb : ndarray of shape (n, k)
        Embeddings of n held-out true pairs (row i of each is a pair).
    ks : iterable of int
    csls_k : int
        0: rank by cosine; > 0: by CSLS with this neighbourhood
        (:func:`~service.alignment.retrieval.csls_scores`).

    Returns
    -------
    dict
        ``r{k}`` (mean of both directions), ``r{k}_ab`` and ``r{k}_ba`` for every k.
    """
    if za.shape[0] != zb.shape[0] or za.shape[0] == 0:
        raise ValueError(f"need the same non-zero number of rows, got {za.shape} and {zb.shape}")
    sims = (torch.as_tensor(za) @ torch.as_tensor(zb).T).numpy()
    return recall_from_scores(csls_scores(sims, csls_k) if csls_k else sims, ks)


def recall_from_scores(s: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """Recall@k from a square score matrix: column i is row i's true partner; both directions
    (rows retrieve columns, ``_ab``; columns retrieve rows, ``_ba``). Shape (n, n); keys as
    :func:`recall_at_k`."""
    diag = np.diagonal(s)
    # rank of the true partner = number of candidates scored strictly higher
    rank_ab = (s > diag[:, None]).sum(axis=1)
    rank_ba = (s > diag[None, :]).sum(axis=0)
    out: dict[str, float] = {}
    for k in ks:
        ab = float((rank_ab < k).mean())
        ba = float((rank_ba < k).mean())
        out[f"r{k}_ab"], out[f"r{k}_ba"], out[f"r{k}"] = ab, ba, (ab + ba) / 2
    out["n"] = len(s)
    return out


def retrieval_recall(model: AlignmentModel, xa, xb, ks=(1, 5)) -> dict[str, float]:
    """Embed held-out pairs with ``model`` and return :func:`recall_at_k` under the model's own
    retrieval rule (cosine, or CSLS when its ``retrieval_csls_k`` > 0)."""
    ma, mb = model.modalities
    return recall_at_k(model.embed(ma, xa), model.embed(mb, xb), ks,
                       csls_k=model.retrieval_csls_k)
