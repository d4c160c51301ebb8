"""The alignment model: one affine projection head per modality into a shared, L2-normalised space.

A head is ``z = normalize(W^T (x - mu))``; with ``blocks = 2`` the ``dim_out`` outputs are two
halves, each L2-normalised on its own before the whole is (so the cosine of two embeddings is the
mean of the two halves' cosines: the two-way ridge learner scores a pair by the mean of its
``a -> b`` and ``b -> a`` maps' cosines this way). Heads are plain ``torch.nn.Linear`` layers so
the scorer can run them batched on CPU or CUDA; the trainer builds them in closed form (ridge
maps, or PCA whitening + CCA) and may fine-tune them with a contrastive loss. It satisfies the
core's :class:`~service.core.cross_modal_model.CrossModalModel` interface; checkpoint files are
written and read by :mod:`service.alignment.checkpoint`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from service.alignment.checkpoint import (
    checkpoint_bytes,
    load_checkpoint,
    load_checkpoint_bytes,
    save_checkpoint,
)
from service.alignment.retrieval import csls_scores
from service.core.validation import as_matrix, check_dims, check_modality


class AlignmentModel(nn.Module):
    """Per-modality projection heads into a shared ``dim_out``-dimensional space.

    Parameters
    ----------
    dims : mapping of str to int
        Input dimension of each of the two modalities, e.g. ``{"image": 512, "text": 384}``.
    dim_out : int
        Dimension ``k`` of the shared space.
    version : int
        Monotonic model version; 0 means "not trained on any pair yet".
    blocks : int
        Number of equal slices of the output normalised separately (1 or more; must divide
        ``dim_out``).
    retrieval_csls_k : int
        How :meth:`retrieval_scores` ranks candidates: 0 by cosine, ``k`` > 0 by CSLS with
        neighbourhood ``k`` (:func:`~service.alignment.retrieval.csls_scores`).

    Shape
    -----
    embed(modality, x): (n, d_modality) -> (n, dim_out), rows of unit norm.
    """

    def __init__(self, dims: dict[str, int], dim_out: int, version: int = 0, blocks: int = 1,
                 retrieval_csls_k: int = 0):
        super().__init__()
        self.dims = check_dims(dims)
        self.modalities: tuple[str, str] = tuple(self.dims)  # type: ignore[assignment]
        if dim_out <= 0:
            raise ValueError(f"dim_out must be positive, got {dim_out}")
        if blocks < 1 or dim_out % blocks:
            raise ValueError(f"blocks must be >= 1 and divide dim_out = {dim_out}, got {blocks}")
        self.dim_out = int(dim_out)
        self.blocks = int(blocks)
        if retrieval_csls_k < 0:
            raise ValueError(f"retrieval_csls_k must be >= 0 (0: plain cosine), got "
                             f"{retrieval_csls_k}")
        self.retrieval_csls_k = int(retrieval_csls_k)
        self.version = int(version)
        self.n_pairs = 0
        # Heads are keyed by position ("0", "1"): modality names are user strings and may hold
        # characters ModuleDict keys cannot. Their default init would draw from the global torch
        # RNG; the weights are always overwritten (trainer or checkpoint), so fork it away.
        with torch.random.fork_rng(devices=[]):
            self.heads = nn.ModuleDict(
                {str(i): nn.Linear(d, self.dim_out) for i, d in enumerate(self.dims.values())})

    def head(self, modality: str) -> nn.Linear:
        check_modality(modality, self.modalities)
        return cast(nn.Linear, self.heads[str(self.modalities.index(modality))])

    def other(self, modality: str) -> str:
        """The other modality's name."""
        check_modality(modality, self.modalities)
        a, b = self.modalities
        return b if modality == a else a

    def forward(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Project and L2-normalise (each block, then the whole). Shape: (n, d_modality) ->
        (n, dim_out)."""
        z = self.head(modality)(x)
        if self.blocks > 1:
            n = z.shape[0]
            z = nn.functional.normalize(z.reshape(n, self.blocks, -1), dim=2).reshape(n, -1)
        return nn.functional.normalize(z, dim=1)

    def set_affine(self, modality: str, mean: np.ndarray, weight: np.ndarray) -> None:
        """Load ``z = weight^T (x - mean)`` into a head. weight: (d_modality, dim_out)."""
        head = self.head(modality)
        w = torch.as_tensor(np.asarray(weight, dtype=np.float32).T.copy())
        if tuple(w.shape) != tuple(head.weight.shape):
            raise ValueError(
                f"weight for {modality!r} has shape {tuple(weight.shape)}, expected "
                f"{(head.in_features, head.out_features)}"
            )
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(-(w @ torch.as_tensor(np.asarray(mean, dtype=np.float32))))

    def embed(self, modality: str, x, device: torch.device | str | None = None) -> np.ndarray:
        """Validated numpy convenience wrapper. Shape: (n, d_modality) -> (n, dim_out) float32."""
        arr = as_matrix(x, self.dims[check_modality(modality, self.modalities)], name=modality)
        dev = torch.device(device) if device is not None else next(self.parameters()).device
        with torch.inference_mode():
            z = self.forward(modality, torch.from_numpy(arr).to(dev))
        return z.cpu().numpy()

    def retrieval_scores(self, za: np.ndarray, zb: np.ndarray) -> np.ndarray:
        """How well each of ``za`` matches each of ``zb`` under this model's retrieval rule.

        Parameters
        ----------
        za : ndarray of shape (p, dim_out)
        zb : ndarray of shape (q, dim_out)
            Embeddings (:meth:`embed`) of queries and candidates, one modality each.

        Returns
        -------
        ndarray of shape (p, q)
            Cosines, or their CSLS when ``retrieval_csls_k`` > 0 (higher = better match).
        """
        sims = np.asarray(za, dtype=np.float64) @ np.asarray(zb, dtype=np.float64).T
        return csls_scores(sims, self.retrieval_csls_k) if self.retrieval_csls_k else sims

    # ------------------------------------------------------------------ checkpoints
    def meta(self) -> dict:
        """What a checkpoint records besides the weights (plain JSON data)."""
        return {"dims": self.dims, "dim_out": self.dim_out, "version": self.version,
                "n_pairs": self.n_pairs, "modalities": list(self.modalities),
                "blocks": self.blocks, "retrieval_csls_k": self.retrieval_csls_k}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``model-v{version:06d}.pt`` (+ ``.json`` metadata) and point ``LATEST`` at it.

        See :mod:`service.alignment.checkpoint` (atomic writes).
        """
        return save_checkpoint(self, self.meta(), directory)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AlignmentModel:
        """Load a checkpoint file, or the ``LATEST`` one when ``path`` is a directory."""
        return load_checkpoint(path, cls.from_meta)

    def to_bytes(self) -> bytes:
        """The checkpoint as bytes (what the models topic carries)."""
        return checkpoint_bytes(self, self.meta())

    @classmethod
    def from_bytes(cls, blob: bytes) -> AlignmentModel:
        """Inverse of :meth:`to_bytes`; raises ``ValueError`` on anything else."""
        return load_checkpoint_bytes(blob, cls.from_meta)

    @classmethod
    def from_meta(cls, meta: dict) -> AlignmentModel:
        """An untrained model shaped as ``meta`` (see :meth:`meta`) describes."""
        model = cls({m: meta["dims"][m] for m in meta["modalities"]}, meta["dim_out"],
                    version=meta["version"], blocks=int(meta.get("blocks", 1)),
                    retrieval_csls_k=int(meta.get("retrieval_csls_k", 0)))
        model.n_pairs = int(meta.get("n_pairs", 0))
        return model
