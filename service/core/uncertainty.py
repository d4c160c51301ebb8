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


def all_uncertainties(sims, tau: float = 0.05) -> dict[str, torch.Tensor]:
    """All three scores in a few passes over the logits (what the scorer uses on the hot path).

    The top two probabilities come from two max passes over the logits (cheaper than
    ``topk`` on CPU), the entropy from ``H = lse - sum(p * logits)``.

    Shape: sims (n, K) -> dict of (n,) tensors ``margin``, ``entropy``, ``least_confidence``.
    """
    t = _as_tensor(sims)
    if tau <= 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    logits = t / tau
    lse = torch.logsumexp(logits, dim=1)
    m1, i1 = logits.max(dim=1)
    m2 = logits.scatter(1, i1[:, None], float("-inf")).max(dim=1).values
    p1, p2 = torch.exp(m1 - lse), torch.exp(m2 - lse)
    p = torch.exp(logits - lse[:, None])
    entropy = (lse - (p * logits).sum(dim=1)) / math.log(t.shape[1])
    return {"margin": 1.0 - (p1 - p2), "entropy": entropy.clamp_(0.0, 1.0),
            "least_confidence": 1.0 - p1}


UNCERTAINTY_FUNCTIONS = {
    "margin": margin_uncertainty,
    "entropy": entropy_uncertainty,
    "least_confidence": least_confidence,
}


def uncertainty(kind: str, sims, tau: float = 0.05) -> np.ndarray:
    """Dispatch by name (``margin``, ``entropy``, ``least_confidence``) and return numpy (n,)."""
    try:
        fn = UNCERTAINTY_FUNCTIONS[kind]
    except KeyError:
        raise ValueError(
            f"unknown uncertainty {kind!r}; expected one of {sorted(UNCERTAINTY_FUNCTIONS)}"
        ) from None
    with torch.inference_mode():
        return fn(sims, tau).detach().cpu().numpy().astype(np.float64)
