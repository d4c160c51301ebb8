"""Cross-modal uncertainty scores: functions of a similarity matrix, oriented "higher = less sure".

An item of one modality is compared with a bank of items of the OTHER modality in the shared
embedding space. The softmax of its similarities (temperature ``tau``) is the model's belief about
which of them is its partner; the flatter that belief, the more an alignment label would teach.

All functions take ``sims`` of shape (n, K) (torch or numpy) and return shape (n,).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _probs(sims: torch.Tensor, tau: float) -> torch.Tensor:
    if tau <= 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    return torch.softmax(sims / tau, dim=1)


def _as_tensor(sims) -> torch.Tensor:
    t = torch.as_tensor(sims)
    if t.ndim != 2:
        raise ValueError(f"sims: expected shape (n, K), got {tuple(t.shape)}")
    if t.shape[1] < 2:
        raise ValueError(f"sims: need at least 2 candidates per row, got K={t.shape[1]}")
    return t


def margin_uncertainty(sims, tau: float = 0.05) -> torch.Tensor:
    """``1 - (p1 - p2)``: one minus the gap between the two most likely partners.

    Shape: sims (n, K) -> (n,), values in [0, 1].
    """
    p = _probs(_as_tensor(sims), tau)
    top2 = torch.topk(p, 2, dim=1).values
    return 1.0 - (top2[:, 0] - top2[:, 1])


def entropy_uncertainty(sims, tau: float = 0.05) -> torch.Tensor:
    """Entropy of the partner belief, divided by ``log K`` so it lies in [0, 1].

    Shape: sims (n, K) -> (n,).
    """
    t = _as_tensor(sims)
    logp = torch.log_softmax(t / tau, dim=1) if tau > 0 else _probs(t, tau)
    ent = -(logp.exp() * logp).sum(dim=1)
    return ent / math.log(t.shape[1])


def least_confidence(sims, tau: float = 0.05) -> torch.Tensor:
    """``1 - p1``: one minus the probability of the most likely partner. Shape (n, K) -> (n,)."""
    p = _probs(_as_tensor(sims), tau)
    return 1.0 - p.max(dim=1).values


def top2(x: torch.Tensor, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest and second-largest value of each row; a tied maximum counts twice.

    For rows of ``K >= 2 * block`` values with ``K % block == 0`` (the recent-item index at
    steady state) this is one ``amax`` pass over (n, K/block, block) blocks plus ``topk`` on the
    small (n, K/block) block maxima and on the winning block: the second largest value is either
    the runner-up block maximum or the runner-up inside the winning block. On CPU that is several
    times faster than ``topk(2)`` or ``max(dim)`` with indices over the whole row. Other shapes
    use ``topk``.

    Shape: x (n, K) contiguous -> ((n,), (n,)).
    """
    n, k = x.shape
    if k < 2 * block or k % block or not x.is_contiguous():
        v = torch.topk(x, 2, dim=1).values
        return v[:, 0], v[:, 1]
    blocks = x.view(n, k // block, block)
    best = torch.topk(blocks.amax(dim=2), 2, dim=1)
    winner = blocks[torch.arange(n, device=x.device), best.indices[:, 0]]
    inner = torch.topk(winner, 2, dim=1).values
    return best.values[:, 0], torch.maximum(best.values[:, 1], inner[:, 1])


def uncertainties_from_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """All three scores from ``logits = sims / tau``, which this OVERWRITES (hot path: the
    caller scales the (n, k) queries by ``1 / tau`` before the matmul, so no (n, K) pass is spent
    on the division, and the logits are shifted in place).

    With the logits shifted by their row maximum ``m1`` and ``e = exp(l)``, ``s = sum e``:
    ``p1 = 1 / s``, ``p2 = exp(m2 - m1) / s`` (``m2`` from :func:`top2`) and the entropy
    ``H = log s - sum(e * l) / s`` (one elementwise product, summed).

    Shape: logits (n, K) -> dict of (n,) tensors ``margin``, ``entropy``, ``least_confidence``.
    """
    t = _as_tensor(logits)
    m1, m2 = top2(t)
    t.sub_(m1[:, None])
    e = torch.exp(t)
    s = e.sum(dim=1)
    # sum(e * l) in place in e (no longer needed): ~7x faster than a batched (1, K) @ (K, 1)
    # bmm on the CPU at K = 16k, 17x at 1k
    dot = e.mul_(t).sum(dim=1)
    p1, p2 = 1.0 / s, torch.exp(m2 - m1) / s
    entropy = (torch.log(s) - dot / s) / math.log(t.shape[1])
    return {"margin": 1.0 - (p1 - p2), "entropy": entropy.clamp_(0.0, 1.0),
            "least_confidence": 1.0 - p1}


def all_uncertainties(sims, tau: float = 0.05) -> dict[str, torch.Tensor]:
    """All three scores in a few passes over the logits (see :func:`uncertainties_from_logits`);
    ``sims`` is left untouched.

    Shape: sims (n, K) -> dict of (n,) tensors ``margin``, ``entropy``, ``least_confidence``.
    """
    t = _as_tensor(sims)
    if tau <= 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    return uncertainties_from_logits(t / tau)


UNCERTAINTY_FUNCTIONS = {
    "margin": margin_uncertainty,
    "entropy": entropy_uncertainty,
    "least_confidence": least_confidence,
}


def uncertainty(kind: str, sims, tau: float = 0.05, block: int = 1024) -> np.ndarray:
    """Dispatch by name (``margin``, ``entropy``, ``least_confidence``) and return numpy (n,).

    Computed ``block`` rows at a time with :func:`uncertainties_from_logits` (the fused hot path
    of the stream scorer): for a pool's (7k, 7k) similarity matrix this is ~4x faster than a
    full softmax + ``topk`` and never allocates more than a (block, K) copy; the values equal
    :data:`UNCERTAINTY_FUNCTIONS`'s to float rounding.

    Shape: sims (n, K) -> (n,) float64.
    """
    if kind not in UNCERTAINTY_FUNCTIONS:
        raise ValueError(
            f"unknown uncertainty {kind!r}; expected one of {sorted(UNCERTAINTY_FUNCTIONS)}")
    if tau <= 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    t = _as_tensor(sims)
    out = np.empty(t.shape[0], dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, t.shape[0], block):
            logits = t[start:start + block] / tau  # a fresh tensor: overwritten below
            out[start:start + block] = uncertainties_from_logits(logits)[kind].cpu().numpy()
    return out
