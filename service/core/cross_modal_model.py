"""What the core needs of an alignment model: an interface, so the core depends on no concrete one.

The concrete model (``service.alignment.model.AlignmentModel``: per-modality linear heads, trained
in ``service.alignment``, checkpointed by ``service.alignment.checkpoint``) satisfies
:class:`CrossModalModel` structurally; the core never imports it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class CrossModalModel(Protocol):
    """Two modalities embedded into one shared, L2-normalised space.

    Attributes
    ----------
    dims : dict of str to int
        Input dimension ``d_m`` of each of the two modalities, in order.
    modalities : tuple of (str, str)
        The two modality names (the keys of ``dims``).
    dim_out : int
        Dimension ``k`` of the shared space.
    version : int
        Monotonic model version; 0 means "not trained on any pair yet".

    Optional attribute ``retrieval_csls_k`` (int, default 0): partner candidates are ranked by
    CSLS with that neighbourhood instead of by cosine (:meth:`UncertaintyScorer.top_partners
    <service.core.scorer.UncertaintyScorer.top_partners>`).
    """

    dims: dict[str, int]
    modalities: tuple[str, str]
    dim_out: int
    version: int

    def other(self, modality: str) -> str:
        """The other modality's name."""
        ...

    def __call__(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Embed validated vectors. Shape: (n, d_modality) float32 -> (n, dim_out), unit rows."""
        ...

    def embed(self, modality: str, x) -> np.ndarray:
        """Validate and embed. Shape: (n, d_modality) array-like -> (n, dim_out) float32."""
        ...

    def to(self, device: torch.device | str) -> CrossModalModel:
        """The model on ``device`` (in place, as ``torch.nn.Module.to``)."""
        ...

    def eval(self) -> CrossModalModel:
        """The model in inference mode (as ``torch.nn.Module.eval``)."""
        ...
