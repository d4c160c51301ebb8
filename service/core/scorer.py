"""Batched uncertainty scorer: owns the alignment model, the device and the recent-item index.

For an item of modality m, the scorer embeds it with the current model and compares it with a
bounded ring buffer (``index_size`` = K) of recent items of the OTHER modality. One matmul per
batch gives the (B, K) similarity matrix; margin, entropy and least-confidence come from it.
All torch work runs under ``torch.inference_mode()`` on CUDA when available, else CPU.

The index keeps raw vectors too, so a hot-swapped model re-embeds it (see :meth:`set_model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from service.core.cross_modal_model import CrossModalModel
from service.core.uncertainty import uncertainties_from_logits
from service.core.validation import as_matrix, check_modality


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class UncertaintyScores:
    """Per-item scores of one batch, each of shape (B,) float64 (NaN-free).

    ``valid`` is False while the other modality's index holds fewer than 2 items; the scores are
    then 0.5 placeholders and must not be trusted.
    """

    margin: np.ndarray
    entropy: np.ndarray
    least_confidence: np.ndarray
    valid: bool

    def get(self, kind: str) -> np.ndarray:
        return {"margin": self.margin, "entropy": self.entropy,
                "least_confidence": self.least_confidence}[kind]


CSLS_SHORTLIST = 20
"""Partner candidates re-ranked by CSLS come from this many best by cosine (per query)."""
CSLS_REFERENCE = 1024
"""A candidate's CSLS neighbourhood is taken among at most this many recent items of the query
modality (a bounded sample of the index: the cost per call stays one (shortlist x 1024) product
however large the index)."""


class _RingIndex:
    def __init__(self, size: int, raw_dim: int, dim: int, device: torch.device):
        self.size = size
        self.raw = np.zeros((size, raw_dim), dtype=np.float32)
        self.emb = torch.zeros((size, dim), dtype=torch.float32, device=device)
        self.ids: list[str | None] = [None] * size
        self.count = 0  # total ever pushed
        self.pos = 0

    @property
    def filled(self) -> int:
        return min(self.count, self.size)

    def push(self, raw: np.ndarray, emb: torch.Tensor, ids=None) -> None:
        n = len(raw)
        ids = list(ids) if ids is not None else [None] * n
        if n >= self.size:
            raw, emb, ids, n = raw[-self.size:], emb[-self.size:], ids[-self.size:], self.size
        for i, item_id in enumerate(ids):
            self.ids[(self.pos + i) % self.size] = item_id
        end = self.pos + n
        first = min(end, self.size) - self.pos
        self.raw[self.pos:self.pos + first] = raw[:first]
        self.emb[self.pos:self.pos + first] = emb[:first]
        if first < n:
            self.raw[: n - first] = raw[first:]
            self.emb[: n - first] = emb[first:]
        self.pos = end % self.size
        self.count += n


def top_k_mean(sims: torch.Tensor, k: int) -> np.ndarray:
    """Mean of the ``k`` largest values of each row (``k`` capped at the row length).

    On the CPU a linear-time selection (:func:`numpy.partition`) on a view of the same memory,
    several times faster than ``torch.topk`` (B = 128 rows: 5.7x at 1,024 columns, 1.3x at 16,384,
    one thread); the k values are then put in ``topk``'s (descending) order and averaged by torch,
    so the result is bit for bit ``sims.topk(k).values.mean(dim=1)``, the rule everywhere else.

    Shape: sims (B, n) float32 -> (B,) float64.
    """
    n = sims.shape[1]
    k = min(int(k), n)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if sims.device.type == "cpu":
        best = np.partition(sims.numpy(), n - k, axis=1)[:, n - k:]
        best.sort(axis=1)
        return torch.from_numpy(np.ascontiguousarray(best[:, ::-1])).mean(dim=1).double().numpy()
    return sims.topk(k, dim=1).values.mean(dim=1).double().cpu().numpy()


class UncertaintyScorer:
    """See module docstring.

    Parameters
    ----------
    model : CrossModalModel
    index_size : int
        K, the number of recent items of each modality kept to score the other modality against.
    tau : float
        Softmax temperature over cosine similarities.
    device : str or torch.device or None
        None picks CUDA when available, else CPU.
    """

    def __init__(self, model: CrossModalModel, index_size: int = 4096, tau: float = 0.05,
                 device: str | torch.device | None = None):
        if index_size < 2:
            raise ValueError(f"index_size must be >= 2, got {index_size}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.device = torch.device(device) if device is not None else default_device()
        self.tau = float(tau)
        self.index_size = int(index_size)
        self.model = model.to(self.device).eval()
        self._index = {m: _RingIndex(index_size, d, model.dim_out, self.device)
                       for m, d in model.dims.items()}

    @property
    def modalities(self) -> tuple[str, str]:
        return self.model.modalities

    @property
    def model_version(self) -> int:
        return self.model.version

    def index_fill(self, modality: str) -> int:
        return self._index[check_modality(modality, self.modalities)].filled

    def embed(self, modality: str, x) -> torch.Tensor:
        """Validate raw (B, d_m) and embed it -> (B, k) on the scorer's device."""
        arr = as_matrix(x, self.model.dims[check_modality(modality, self.modalities)],
                        name=modality)
        return self.embed_valid(modality, arr)

    def embed_valid(self, modality: str, arr: np.ndarray) -> torch.Tensor:
        """Embed vectors the caller already validated (no check: the selector's hot path).

        Shape: ``arr`` (B, d_m) C-contiguous float32 -> (B, k) on the scorer's device.
        """
        with torch.inference_mode():
            return self.model(modality, torch.from_numpy(arr).to(self.device))

    def score(self, modality: str, z: torch.Tensor) -> UncertaintyScores:
        """Scores of embedded items (B, k) of ``modality`` against the other modality's index."""
        idx = self._index[self.model.other(modality)]
        b = z.shape[0]
        if idx.filled < 2:
            half = np.full(b, 0.5)
            return UncertaintyScores(half, half, half, valid=False)
        with torch.inference_mode():
            logits = (z * (1.0 / self.tau)) @ idx.emb[: idx.filled].T  # (B, K), scaled queries
            out = {k: v.double().cpu().numpy()
                   for k, v in uncertainties_from_logits(logits).items()}
        return UncertaintyScores(out["margin"], out["entropy"], out["least_confidence"], valid=True)

    def typicality(self, modality: str, z: torch.Tensor, k: int) -> np.ndarray | None:
        """Mean cosine of each embedded item (B, k_dim) of ``modality`` to its ``k`` nearest items
        in ``modality``'s OWN recent index ([TypiClust]'s density; ``k`` capped at the fill).

        Returns shape (B,) float64, or None while that index holds fewer than 2 items. Costs one
        (B, K) matmul and a top-k, like :meth:`score`.
        """
        idx = self._index[check_modality(modality, self.modalities)]
        n = idx.filled
        if n < 2:
            return None
        with torch.inference_mode():
            return top_k_mean(z @ idx.emb[:n].T, int(k))

    def observe(self, modality: str, raw: np.ndarray, z: torch.Tensor, ids=None) -> None:
        """Add items (with optional item ids) to ``modality``'s recent index (at commit time)."""
        self._index[check_modality(modality, self.modalities)].push(
            np.asarray(raw, dtype=np.float32), z.detach().to(self.device), ids)

    def top_partners(self, modality: str, z: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """The ``k`` best partners among the recent items of the OTHER modality for each row of z
        (B, k_dim), under the model's retrieval rule.

        With the model's ``retrieval_csls_k`` = c > 0 the cosine shortlist (the best
        ``max(k, c, CSLS_SHORTLIST)``) is re-ranked by CSLS, ``2 cos - r_query - r_candidate``
        (:mod:`service.alignment.retrieval`): ``r_query`` is the mean of the row's c best
        cosines among the candidates, ``r_candidate`` the mean of a candidate's c best cosines
        among (up to ``CSLS_REFERENCE``) recent items of ``modality``; so a hub (close to
        everything) no longer crowds out the true partner. Cost: one (shortlisted candidates x
        ``CSLS_REFERENCE``) product per call.

        Returns, per row, ``[(item_id, cosine similarity), ...]`` best first (items pushed without
        an id are left out).
        """
        idx = self._index[self.model.other(modality)]
        n = idx.filled
        if n == 0 or k <= 0:
            return [[] for _ in range(z.shape[0])]
        c = int(getattr(self.model, "retrieval_csls_k", 0))
        with torch.inference_mode():
            sims = z @ idx.emb[:n].T
            if c <= 0:
                vals_t, pos_t = torch.topk(sims, min(k, n), dim=1)
            else:
                vals_t, pos_t = self._csls_rerank(modality, sims, idx, min(k, n), c)
        vals, pos = vals_t.cpu().numpy(), pos_t.cpu().numpy()
        return [[(idx.ids[p], float(v)) for v, p in zip(vr, pr, strict=True)
                 if idx.ids[p] is not None]
                for vr, pr in zip(vals, pos, strict=True)]

    def _csls_rerank(self, modality: str, sims: torch.Tensor, idx: _RingIndex, k: int,
                     c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cosines (B, k), positions (B, k)) of the best k of the cosine shortlist by CSLS."""
        n = sims.shape[1]
        short_v, short_p = torch.topk(sims, min(n, max(k, c, CSLS_SHORTLIST)), dim=1)
        r_query = short_v[:, :min(c, n)].mean(dim=1)  # the shortlist holds the c best
        queries = self._index[modality]
        nq = min(queries.filled, CSLS_REFERENCE)
        uniq, inverse = torch.unique(short_p, return_inverse=True)
        if nq:
            cs = idx.emb[uniq] @ queries.emb[:nq].T
            r_cand = torch.topk(cs, min(c, nq), dim=1).values.mean(dim=1)[inverse]
        else:  # nothing of the query modality seen yet: no neighbourhood to discount by
            r_cand = torch.zeros_like(short_v)
        csls = 2 * short_v - r_query[:, None] - r_cand
        order = torch.topk(csls, k, dim=1).indices
        return short_v.gather(1, order), short_p.gather(1, order)

    def set_model(self, model: CrossModalModel) -> None:
        """Hot-swap the model and re-embed the recent-item index in the new space."""
        if model.dims != self.model.dims or model.dim_out != self.model.dim_out:
            raise ValueError(
                f"new model has dims {model.dims}->{model.dim_out}, scorer expects "
                f"{self.model.dims}->{self.model.dim_out}")
        self.model = model.to(self.device).eval()
        with torch.inference_mode():
            for m, idx in self._index.items():
                n = idx.filled
                if n:
                    idx.emb[:n] = self.model(m, torch.from_numpy(idx.raw[:n]).to(self.device))
