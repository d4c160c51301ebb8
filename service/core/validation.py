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


class VectorError(ValueError):
    """A feature vector the core refuses; the message echoes the bad input (one format).

    ``{subject}: {problem} ({first bad value, if any;} shape {shape}, dtype {dtype})``, e.g.
    ``item 'i7' (image): 1 value(s) are NaN or inf (first at index 3: nan; shape (12,), dtype
    float32)``. The wire codec uses the same format for what it rejects.

    Attributes
    ----------
    kind : str
        ``"wrong_dimension"``, ``"non_finite"`` (NaN/inf or a magnitude above
        :data:`MAX_ABS_FEATURE`) or ``"undecodable"`` (not a real vector at all).
    index : int or None
        Position of the bad item in the batch it came in, when there was one.
    """

    def __init__(self, kind: str, message: str, index: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.index = index

    def prefixed(self, prefix: str) -> VectorError:
        """The same error with ``prefix`` in front of the message."""
        return VectorError(self.kind, f"{prefix}{self}", self.index)


MAX_ID_CHARS = 256
"""Longest event or item id accepted (ids travel in every record, log line and dead letter)."""


def _layout(arr) -> str:
    return f"shape {tuple(arr.shape)}, dtype {arr.dtype}"


def vector_value_problem(vec: np.ndarray, subject: str, index: int | None = None,
                         original=None) -> VectorError | None:
    """The error for the first NaN/inf or too-large value of ``vec`` (any shape), else None.

    Shape: ``vec`` (d,) or (n, d); the index reported is the flat one within ``vec``. The shape
    and dtype echoed are those of ``original`` (what the caller was given) when passed.
    """
    flat = vec.reshape(-1)
    vec = vec if original is None else np.asarray(original)
    bad = ~np.isfinite(flat)
    if bad.any():
        idx = np.flatnonzero(bad)
        return VectorError("non_finite",
                           f"{subject}: {len(idx)} value(s) are NaN or inf (first at index "
                           f"{int(idx[0])}: {flat[idx[0]].item():.7g}; {_layout(vec)})", index)
    huge = np.abs(flat) > MAX_ABS_FEATURE
    if huge.any():
        idx = np.flatnonzero(huge)
        return VectorError("non_finite",
                           f"{subject}: {len(idx)} value(s) exceed |x| <= {MAX_ABS_FEATURE:g} and "
                           f"would overflow once projected (first at index {int(idx[0])}: "
                           f"{flat[idx[0]].item():.7g}; {_layout(vec)})", index)
    return None


def item_vectors(vectors, dim: int, *, item_ids, modality: str,
                 positions=None) -> np.ndarray:
    """Validate the vectors of one modality's items and stack them (the core's entry check).

    Parameters
    ----------
    vectors : sequence of array-like, each of shape (dim,)
    dim : int
        The modality's feature dimension.
    item_ids : sequence of str
        The items' ids, for the error message.
    modality : str
    positions : sequence of int, optional
        The items' positions in the caller's batch (``VectorError.index``); default 0..n-1.

    Returns
    -------
    numpy.ndarray of shape (n, dim), dtype float32, C-contiguous

    Raises
    ------
    VectorError
        Naming the first bad item (id, modality, shape/dtype, first bad value).
    """
    pos = range(len(vectors)) if positions is None else positions
    mat = _stacked_if_plain(vectors, dim, item_ids)
    if mat is None:  # not all plain (dim,) vectors: check one by one, naming the first bad one
        mat = np.stack(_checked_rows(vectors, dim, item_ids, modality, pos))
    mat = np.ascontiguousarray(mat, dtype=np.float32)
    if not np.isfinite(mat).all() or (mat.size and np.abs(mat).max() > MAX_ABS_FEATURE):
        arrs = _checked_rows(vectors, dim, item_ids, modality, pos)
        for row, a, item_id, p in zip(mat, arrs, item_ids, pos, strict=True):
            err = vector_value_problem(row, f"item {item_id!r} ({modality})", p, original=a)
            if err is not None:
                raise err
    zero = ~mat.any(axis=1)
    if zero.any():
        j = int(np.flatnonzero(zero)[0])
        raise VectorError("zero_vector", f"item {list(item_ids)[j]!r} ({modality}): all {dim} "
                                         "values are 0 (no direction: its cosine to anything "
                                         "is undefined)", list(pos)[j])
    return mat


def _stacked_if_plain(vectors, dim: int, item_ids) -> np.ndarray | None:
    """``np.stack(vectors)`` when that is already the checked result: every vector of shape
    (dim,) and real (one C call for the batch); None when any is not (or the stack fails), for
    :func:`_checked_rows` to name it."""
    if len(vectors) == 0 or len(item_ids) != len(vectors):
        return None
    try:
        mat = np.stack(vectors)
    except (ValueError, TypeError):
        return None
    if mat.ndim != 2 or mat.shape[1] != dim or mat.dtype.kind not in "fiub":
        return None
    return mat


def _checked_rows(vectors, dim: int, item_ids, modality: str, pos) -> list[np.ndarray]:
    """Each vector as a (dim,) real array, or a :class:`VectorError` naming the first that is
    not (a (1, dim) row of a matrix reads as (dim,))."""
    arrs = []
    for v, item_id, p in zip(vectors, item_ids, pos, strict=True):
        a = np.asarray(v)
        if a.ndim == 2 and a.shape[0] == 1:  # one row of a matrix: (1, dim) reads as (dim,)
            a = a[0]
        if a.ndim != 1 or a.shape[0] != dim or a.dtype.kind not in "fiub":
            what = (f"wrong dimension {a.shape[0]}, expected {dim}" if a.ndim == 1
                    and a.dtype.kind in "fiub" else f"expected a real vector of shape ({dim},)")
            kind = "wrong_dimension" if a.dtype.kind in "fiub" else "undecodable"
            raise VectorError(kind, f"item {item_id!r} ({modality}): {what} ({_layout(a)})", p)
        arrs.append(a)
    return arrs


def check_modality(modality: str, known: Iterable[str]) -> str:
    """Return ``modality`` if it is one of ``known``, else raise ``ValueError``."""
    known = tuple(known)
    if modality not in known:
        raise ValueError(f"unknown modality {modality!r}; expected one of {list(known)}")
    return modality


def as_matrix(x, dim: int | None, *, name: str = "vectors",
              allow_empty: bool = False) -> np.ndarray:
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


def check_fraction(value: float, name: str) -> float:
    """Raise ``ValueError`` unless ``0 <= value <= 1``."""
    if not (np.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)
