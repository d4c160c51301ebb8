"""Input checks for the core: every error is a ``ValueError`` that names the bad input.

The core never drops an item silently: a batch is either valid as a whole or rejected with a
message an operator can act on (adapters turn it into a dead letter or ``INVALID_ARGUMENT``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

#: Largest |value| accepted in a feature vector. Finite float32 values beyond this overflow to
#: inf once projected (squares exceed float32 range near 1.8e19) and would poison the caches.
MAX_ABS_FEATURE = 1e15


def check_modality(modality: str, known: Iterable[str]) -> str:
    """Return ``modality`` if it is one of ``known``, else raise ``ValueError``."""
    known = tuple(known)
    if modality not in known:
        raise ValueError(f"unknown modality {modality!r}; expected one of {list(known)}")
    return modality


def as_matrix(x, dim: int | None, *, name: str = "vectors", allow_empty: bool = False) -> np.ndarray:
    """Validate and normalise a batch of vectors to a C-contiguous float32 matrix.

    Parameters
    ----------
    x : array-like of shape (n, d) or (d,)
        The vectors. A single vector is promoted to shape (1, d).
    dim : int or None
        The expected feature dimension ``d``; ``None`` accepts any.
    name : str
        How to call the input in error messages.
    allow_empty : bool
        Whether ``n == 0`` is accepted.

    Returns
    -------
    numpy.ndarray of shape (n, d), dtype float32

    Raises
    ------
    ValueError
        Wrong rank or dimension, an empty batch, or a NaN/inf entry (the first bad row is named).
    """
    try:
        arr = np.ascontiguousarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot convert to a float32 matrix ({exc})") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected shape (n, d), got shape {arr.shape}")
    if arr.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name}: empty batch (shape {arr.shape})")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name}: wrong dimension {arr.shape[1]}, expected {dim}")
    if arr.size and not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        raise ValueError(
            f"{name}: {len(bad)} row(s) contain NaN or inf (first bad row index {int(bad[0])})"
        )
    if arr.size and np.abs(arr).max() > MAX_ABS_FEATURE:
        bad = np.flatnonzero((np.abs(arr) > MAX_ABS_FEATURE).any(axis=1))
        raise ValueError(
            f"{name}: {len(bad)} row(s) contain NaN or inf-like magnitudes above "
            f"{MAX_ABS_FEATURE:g} (first bad row index {int(bad[0])}, max |x| = "
            f"{float(np.abs(arr).max()):.3g})"
        )
    return arr


def check_dims(dims: Mapping[str, int]) -> dict[str, int]:
    """Validate a ``{modality: dimension}`` mapping of exactly two positive dimensions."""
    dims = dict(dims)
    if len(dims) != 2:
        raise ValueError(f"exactly two modalities are supported, got {list(dims)}")
    for m, d in dims.items():
        if not isinstance(m, str) or not m:
            raise ValueError(f"modality names must be non-empty strings, got {m!r}")
        if int(d) <= 0:
            raise ValueError(f"dimension of modality {m!r} must be positive, got {d}")
    return {m: int(d) for m, d in dims.items()}


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> float:
    """Raise ``ValueError`` unless ``value`` is a finite positive number."""
    ok = np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value


def check_fraction(value: float, name: str) -> float:
    """Raise ``ValueError`` unless ``0 <= value <= 1``."""
    if not (np.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)
