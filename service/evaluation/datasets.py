"""Built-in two-view datasets for the offline active-learning benchmark.

A dataset is two aligned views of the same ``n`` items: ``a`` of shape (n, d_a) and ``b`` of
shape (n, d_b), both float32, where row ``i`` of ``a`` and row ``i`` of ``b`` are a true pair
(two modalities of one underlying item). Optional per-row metadata:

``labels``
    int64 (n,): the item's class (for an orphan row, the class of its ``a`` item).
``paired``
    bool (n,): ``False`` marks a row whose ``a`` and ``b`` are *not* partners: each is an orphan
    whose partner is missing (the "missing modality" pitfall). ``None`` means all rows are pairs.

The synthetic generator reproduces the pitfalls studied in [MindTheGap] ("Mind the Gap: A
Framework for Assessing Pitfalls in Multimodal Active Learning"): modality difficulty imbalance,
missing modalities, shared / unique /
synergistic interaction structure, noise, class count and long tails, plus near-duplicates.

Nothing here downloads data: the digits views come from the copy bundled with scikit-learn, and
every random draw comes from a ``np.random.default_rng(seed)`` owned by the call.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BUILTIN",
    "DATA_DIR",
    "QUALITY_REAL",
    "REAL",
    "Dataset",
    "describe",
    "get_dataset",
    "load_npz",
    "load_real",
    "make_digits_two_view",
    "make_synthetic",
]

# Latent geometry of the synthetic generator (see ``make_synthetic``).
_CENTER_SCALE = 2.0  # class centres ~ N(0, I) * 2
_WITHIN_SCALE = 0.7  # item latent = centre + N(0, I) * 0.7
_LATENT_STD = math.sqrt(_CENTER_SCALE**2 + _WITHIN_SCALE**2)  # marginal std of one latent dim
_DUPLICATE_JITTER = 0.05  # std of the latent perturbation of a near-duplicate


def _check_views(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Validate the two views and return them as C-contiguous float32 matrices."""
    out = []
    for key, x in (("a", a), ("b", b)):
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"{key} must be a 2-D array of shape (n, d), got shape {x.shape}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"{key} must hold real numbers, got dtype {x.dtype}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{key} must be non-empty, got shape {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        finite = np.isfinite(x)
        if not finite.all():
            bad = np.flatnonzero(~finite.all(axis=1))
            raise ValueError(
                f"{key} has {len(bad)} row(s) with NaN or inf (first bad row index {int(bad[0])})"
            )
        out.append(x)
    a, b = out
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a has {a.shape[0]} rows but b has {b.shape[0]}")
    return a, b


def _check_row_vector(x, key: str, n: int, kind: str) -> np.ndarray:
    """Validate an optional per-row vector: 1-D, length ``n``, integer (``kind="int"``) or bool."""
    x = np.asarray(x)
    if x.ndim != 1 or x.shape[0] != n:
        raise ValueError(f"{key} must have shape ({n},) to match a and b, got shape {x.shape}")
    if kind == "int":
        if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
            raise ValueError(f"{key} must hold integers, got dtype {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.int64)
    if x.dtype != np.bool_:
        raise ValueError(f"{key} must be a bool array, got dtype {x.dtype}")
    return np.ascontiguousarray(x)


def _check_ids(x, n: int) -> np.ndarray:
    """Validate optional row ids: 1-D str array of length ``n``, no repeats."""
    x = np.asarray(x)
    if x.ndim != 1 or x.shape[0] != n:
        raise ValueError(f"ids must have shape ({n},) to match a and b, got shape {x.shape}")
    if x.dtype.kind != "U":
        raise ValueError(f"ids must be a str array, got dtype {x.dtype}")
    values, counts = np.unique(x, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"ids must be unique; {str(values[counts > 1][0])!r} appears "
                         f"{int(counts.max())} times")
    return x


@dataclass(frozen=True, eq=False)
class Dataset:
    """Two aligned views of the same items, with optional labels and pairing flags.

    The constructor validates and normalises its arrays (views to float32, labels to int64),
    so every ``Dataset`` in circulation is well-formed. Equality is identity (``eq=False``):
    compare arrays explicitly.

    Parameters
    ----------
    name : str
        Short identifier (the registry name, or the file stem for ``load_npz``).
    a : np.ndarray of shape (n, d_a)
        View of modality ``modality_a``; float32, finite.
    b : np.ndarray of shape (n, d_b)
        View of modality ``modality_b``; float32, finite. Row ``i`` is the partner of ``a[i]``
        unless ``paired[i]`` is False.
    labels : np.ndarray of shape (n,), optional
        int64 class of each item (of the ``a`` item for an orphan row).
    paired : np.ndarray of shape (n,), optional
        bool; False marks a row whose ``a`` and ``b`` are unrelated orphans. None = all paired.
    ids : np.ndarray of shape (n,), optional
        str id of each row (e.g. the verse reference), unique. None = row numbers.
    modality_a, modality_b : str
        Names of the two modalities.
    learnable : bool
        False for control datasets built so that no linear cross-modal map exists.
    description : str
        One line saying what the dataset exercises.

    Raises
    ------
    ValueError
        A view that is not 2-D, empty, non-numeric or non-finite; views with different row
        counts; ``labels`` / ``paired`` of the wrong shape or dtype.
    """

    name: str
    a: np.ndarray
    b: np.ndarray
    labels: np.ndarray | None = None
    paired: np.ndarray | None = None
    ids: np.ndarray | None = None
    modality_a: str = "a"
    modality_b: str = "b"
    learnable: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        a, b = _check_views(self.a, self.b)
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        n = a.shape[0]
        if self.labels is not None:
            object.__setattr__(self, "labels", _check_row_vector(self.labels, "labels", n, "int"))
        if self.paired is not None:
            object.__setattr__(self, "paired", _check_row_vector(self.paired, "paired", n, "bool"))
        if self.ids is not None:
            object.__setattr__(self, "ids", _check_ids(self.ids, n))
        for key in ("modality_a", "modality_b"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key} must be a non-empty string, got {value!r}")
        if self.modality_a == self.modality_b:
            raise ValueError(f"modality_a and modality_b must differ, both are {self.modality_a!r}")

    @property
    def n(self) -> int:
        """Number of rows."""
        return int(self.a.shape[0])

    @property
    def n_paired(self) -> int:
        """Number of rows whose ``a`` and ``b`` are true partners."""
        return self.n if self.paired is None else int(self.paired.sum())

    def to_npz(self, path: str | os.PathLike) -> None:
        """Write the dataset with ``np.savez_compressed``.

        Keys: ``a``, ``b``, ``labels`` (if any), ``paired`` (if any), ``modality_a`` and
        ``modality_b`` (0-d str arrays). ``name`` is not stored (``load_npz`` takes it from the
        file stem), nor are ``learnable`` and ``description``.

        Parameters
        ----------
        path : str or os.PathLike
            Destination; numpy appends ``.npz`` if the name lacks it.
        """
        arrays: dict[str, Any] = {  # Any: numpy types savez(**kw) against its bool options
            "a": self.a,
            "b": self.b,
            "modality_a": np.array(self.modality_a),
            "modality_b": np.array(self.modality_b),
        }
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.paired is not None:
            arrays["paired"] = self.paired
        if self.ids is not None:
            arrays["ids"] = self.ids
        np.savez_compressed(path, **arrays)


def load_npz(path: str | os.PathLike) -> Dataset:
    """Load a dataset written by ``Dataset.to_npz`` (or any npz with the same keys).

    Parameters
    ----------
    path : str or os.PathLike
        An ``.npz`` file with keys ``a`` (n, d_a) and ``b`` (n, d_b) (any float or integer dtype,
        float16 included), optionally ``a_scale`` (d_a,) / ``b_scale`` (d_b,) positive floats that
        an integer view is multiplied by (int8 storage), ``labels`` (n,) integer, ``paired`` (n,)
        bool, ``ids`` (n,) unique str, ``modality_a`` / ``modality_b`` 0-d str arrays.

    Returns
    -------
    Dataset
        Views as float32, ``name`` = the file stem, ``learnable=True``, empty description.

    Raises
    ------
    ValueError
        A missing ``a`` or ``b`` key; a view that is not 2-D, not numeric or not finite; views
        with different row counts (e.g. "a has 3 rows but b has 4"); a scale of the wrong shape,
        not positive or on a float view; malformed ``labels``, ``paired`` or modality names.
        Pickled object arrays are refused.
    FileNotFoundError
        ``path`` does not exist.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except ValueError as exc:  # object arrays need pickle, which we never allow
        raise ValueError(f"{path}: cannot read without pickle ({exc})") from None
    missing = [k for k in ("a", "b") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; found {sorted(data)}")
    names: dict[str, Any] = {}
    for key in ("modality_a", "modality_b"):
        if key in data:
            v = data[key]
            if v.ndim != 0 or v.dtype.kind != "U":
                raise ValueError(f"{path}: {key} must be a 0-d str array, got {v.dtype} {v.shape}")
            names[key] = str(v)
    views = {k: _dequantised(path, k, data) for k in ("a", "b")}
    try:
        return Dataset(
            name=path.stem,
            a=views["a"],
            b=views["b"],
            labels=data.get("labels"),
            paired=data.get("paired"),
            ids=data.get("ids"),
            **names,
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _dequantised(path: Path, key: str, data: dict[str, np.ndarray]) -> np.ndarray:
    """View ``key`` times its ``KEY_scale`` (one positive float per column), if the file has it."""
    view, scale = data[key], data.get(f"{key}_scale")
    if scale is None:
        return view
    if view.dtype.kind not in "iu" or view.ndim != 2:
        raise ValueError(f"{path}: {key}_scale given but {key} is {view.dtype} {view.shape}, "
                         "not a 2-D integer view")
    scale = np.asarray(scale, dtype=np.float64)
    if scale.shape != (view.shape[1],) or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise ValueError(f"{path}: {key}_scale must be {view.shape[1]} positive finite floats, "
                         f"got shape {scale.shape}, min {scale.min() if scale.size else None!r}")
    return (view.astype(np.float32) * scale.astype(np.float32)).astype(np.float32)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_unit(value, name: str, *, closed: bool) -> float:
    """``value`` in [0, 1] (``closed``) or [0, 1)."""
    v = float(value)
    ok = math.isfinite(v) and 0.0 <= v and (v <= 1.0 if closed else v < 1.0)
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if closed else ')'}, got {value!r}")
    return v


def make_synthetic(
    *,
    n: int = 2000,
    n_classes: int = 10,
    d_a: int = 64,
    d_b: int = 48,
    latent_dim: int = 16,
    shared_frac: float = 1.0,
    unique_dim: int = 8,
    synergy: float = 0.0,
    noise_a: float = 0.3,
    noise_b: float = 0.3,
    missing_rate: float = 0.0,
    class_imbalance: float = 0.0,
    duplicate_rate: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """Generate a two-view dataset with controllable multimodal pitfalls.

    Generative model, all draws from ``np.random.default_rng(seed)``:

    1. Classes: ``p_c ∝ (c + 1) ** (-3 * class_imbalance)`` (0 = uniform, larger = longer tail);
       centres ``mu_c ~ N(0, I) * 2`` in ``latent_dim`` dims. Item latent
       ``s = mu_c + N(0, I) * 0.7``, so retrieving the exact partner needs the within-class part.
    2. Shared / view-private: the first ``round(shared_frac * latent_dim)`` latent dims are seen
       by both views; each view's remaining dims are replaced by independent noise of the same
       marginal scale (so they carry no cross-modal information). Each view also gets a private
       factor ``u ~ N(0, I)`` of ``unique_dim`` dims.
    3. Synergy: the b-side latent is ``(1 - synergy) * s + synergy * s * sign(roll(s - mu_c, 1))``
       (per item, sign-product / XOR-like). The sign gate uses the within-class deviation
       ``s - mu_c`` rather than ``s`` itself: gating on ``s`` leaves a class-level component
       that a linear map recovers from ``a`` (held-out R^2 about 0.4 at ``synergy=1``), while
       the deviation gate makes every linear a->b map useless (R^2 about 0) at ``synergy=1``.
    4. Views: ``x = [latent, u] @ M + noise * N(0, I)`` with ``M ~ N(0, 1) / sqrt(latent_dim +
       unique_dim)`` drawn per view (no tanh). Unequal ``noise_a`` / ``noise_b`` give a
       modality difficulty imbalance.
    5. Near-duplicates: ``round(duplicate_rate * n)`` rows copy the class, latent and private
       factors of a random earlier (original) row, perturbed by ``N(0, 0.05**2)``, with fresh
       view noise at the dataset's ``noise_a`` / ``noise_b``.
    6. Missing modality: ``round(missing_rate * n)`` random rows get ``paired=False`` and their
       ``b`` replaced by the b-view of an independent fresh item (fresh class, latent, private
       factor and noise); ``labels`` stays the class of the ``a`` item.
    7. Rows are shuffled once.

    Parameters
    ----------
    n : int
        Number of rows, >= 2.
    n_classes : int
        Number of classes, >= 1 (with a long tail, the rarest may end up with no rows).
    d_a, d_b : int
        View dimensions, >= 1.
    latent_dim : int
        Dimension of the item latent ``s``, >= 1.
    shared_frac : float in [0, 1]
        Fraction of latent dims both views see.
    unique_dim : int
        Dimension of each view's private factor, >= 0.
    synergy : float in [0, 1]
        Weight of the sign-product transform on the b side; 1 = no linear cross-modal map.
    noise_a, noise_b : float
        Std of the additive Gaussian noise of each view, >= 0.
    missing_rate : float in [0, 1)
        Fraction of orphan rows (``paired=False``).
    class_imbalance : float in [0, 1)
        Zipf-like long-tail strength of the class distribution.
    duplicate_rate : float in [0, 1)
        Fraction of rows that are near-duplicates of another row.
    seed : int
        Seed of the generator's own ``np.random.default_rng``.

    Returns
    -------
    Dataset
        ``name="synthetic"``, ``a`` (n, d_a) and ``b`` (n, d_b) float32, ``labels`` (n,) int64,
        ``paired`` (n,) bool (all True when ``missing_rate == 0``); ``learnable`` is False
        when ``shared_frac == 0`` or ``synergy == 1``.

    Raises
    ------
    ValueError
        Any parameter outside the ranges above (the message echoes it).
    """
    n = _check_int(n, "n", 2)
    n_classes = _check_int(n_classes, "n_classes", 1)
    d_a = _check_int(d_a, "d_a", 1)
    d_b = _check_int(d_b, "d_b", 1)
    latent_dim = _check_int(latent_dim, "latent_dim", 1)
    unique_dim = _check_int(unique_dim, "unique_dim", 0)
    shared_frac = _check_unit(shared_frac, "shared_frac", closed=True)
    synergy = _check_unit(synergy, "synergy", closed=True)
    missing_rate = _check_unit(missing_rate, "missing_rate", closed=False)
    class_imbalance = _check_unit(class_imbalance, "class_imbalance", closed=False)
    duplicate_rate = _check_unit(duplicate_rate, "duplicate_rate", closed=False)
    for key, v in (("noise_a", noise_a), ("noise_b", noise_b)):
        if not (math.isfinite(float(v)) and float(v) >= 0.0):
            raise ValueError(f"{key} must be a finite number >= 0, got {v!r}")

    rng = np.random.default_rng(seed)
    n_shared = int(round(shared_frac * latent_dim))
    k = latent_dim + unique_dim

    class_p = (np.arange(n_classes) + 1.0) ** (-3.0 * class_imbalance)
    class_p /= class_p.sum()
    centers = rng.standard_normal((n_classes, latent_dim)) * _CENTER_SCALE
    mix_a = rng.standard_normal((k, d_a)) / math.sqrt(k)
    mix_b = rng.standard_normal((k, d_b)) / math.sqrt(k)

    def items(m: int) -> dict[str, np.ndarray]:
        """Fresh independent items: class, within-class deviation and per-view private parts."""
        y = rng.choice(n_classes, size=m, p=class_p)
        dev = rng.standard_normal((m, latent_dim)) * _WITHIN_SCALE
        # Non-shared latent dims: independent per view, same marginal scale as the latent.
        priv_a = rng.standard_normal((m, latent_dim - n_shared)) * _LATENT_STD
        priv_b = rng.standard_normal((m, latent_dim - n_shared)) * _LATENT_STD
        u_a = rng.standard_normal((m, unique_dim))
        u_b = rng.standard_normal((m, unique_dim))
        return {"y": y, "dev": dev, "priv_a": priv_a, "priv_b": priv_b, "u_a": u_a, "u_b": u_b}

    def view_a(it: dict[str, np.ndarray]) -> np.ndarray:
        s = centers[it["y"]] + it["dev"]
        z = np.hstack([s[:, :n_shared], it["priv_a"], it["u_a"]])
        return z @ mix_a + noise_a * rng.standard_normal((len(z), d_a))

    def view_b(it: dict[str, np.ndarray]) -> np.ndarray:
        s = centers[it["y"]] + it["dev"]
        gate = np.sign(np.roll(it["dev"], 1, axis=1))
        s_b = (1.0 - synergy) * s + synergy * (s * gate)
        z = np.hstack([s_b[:, :n_shared], it["priv_b"], it["u_b"]])
        return z @ mix_b + noise_b * rng.standard_normal((len(z), d_b))

    n_dup = int(round(duplicate_rate * n))
    n_orig = n - n_dup  # >= 1 since duplicate_rate < 1 and n >= 2
    it = items(n_orig)
    if n_dup:
        src = rng.integers(0, n_orig, size=n_dup)
        dup = {key: v[src] for key, v in it.items()}
        for key in ("dev", "priv_a", "priv_b", "u_a", "u_b"):
            dup[key] = dup[key] + rng.standard_normal(dup[key].shape) * _DUPLICATE_JITTER
        it = {key: np.concatenate([it[key], dup[key]]) for key in it}

    a = view_a(it)
    b = view_b(it)
    paired = np.ones(n, dtype=bool)
    n_missing = int(round(missing_rate * n))
    if n_missing:
        rows = rng.choice(n, size=n_missing, replace=False)
        b[rows] = view_b(items(n_missing))
        paired[rows] = False

    order = rng.permutation(n)
    params = (
        f"n={n} classes={n_classes} d_a={d_a} d_b={d_b} latent={latent_dim} "
        f"shared_frac={shared_frac:g} unique={unique_dim} synergy={synergy:g} "
        f"noise={noise_a:g}/{noise_b:g} missing={missing_rate:g} "
        f"imbalance={class_imbalance:g} dup={duplicate_rate:g} seed={seed}"
    )
    return Dataset(
        name="synthetic",
        a=a[order].astype(np.float32),
        b=b[order].astype(np.float32),
        labels=it["y"][order].astype(np.int64),
        paired=paired[order],
        learnable=bool(n_shared > 0 and synergy < 1.0),
        description=f"synthetic two-view latent model ({params})",
    )


_DIGIT_SPLITS = {
    "top_bottom": ("top", "bottom"),
    "left_right": ("left", "right"),
}


def make_digits_two_view(split: str = "top_bottom", seed: int = 0) -> Dataset:
    """Two views of scikit-learn's bundled 8x8 digits (1797 images; no download).

    Parameters
    ----------
    split : {"top_bottom", "left_right"}
        ``top_bottom``: ``a`` = pixel rows 0-3, ``b`` = rows 4-7. ``left_right``: ``a`` = pixel
        columns 0-3, ``b`` = columns 4-7. Each view has 32 pixels (values 0-16, exact, float32).
    seed : int
        Accepted for a uniform factory signature; unused (no randomness, original row order).

    Returns
    -------
    Dataset
        ``a`` and ``b`` of shape (1797, 32) float32, ``labels`` (1797,) int64 = the digit.

    Raises
    ------
    ValueError
        ``split`` is not one of the two names.
    """
    del seed  # deterministic: exact pixels in the bundled order
    if split not in _DIGIT_SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {list(_DIGIT_SPLITS)}")
    from sklearn.datasets import load_digits  # bundled with scikit-learn, reads a local file

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32)  # (1797, 8, 8)
    n = images.shape[0]
    if split == "top_bottom":
        a, b = images[:, :4, :], images[:, 4:, :]
    else:
        a, b = images[:, :, :4], images[:, :, 4:]
    mod_a, mod_b = _DIGIT_SPLITS[split]
    return Dataset(
        name="digits" if split == "top_bottom" else "digits-lr",
        a=a.reshape(n, -1),
        b=b.reshape(n, -1),
        labels=np.asarray(digits.target, dtype=np.int64),
        modality_a=mod_a,
        modality_b=mod_b,
        description=(
            f"sklearn 8x8 digits split {split.replace('_', '/')}: 32 px per view, 10 classes"
        ),
    )


def _synthetic(
    name: str, description: str, learnable: bool = True, **params
) -> Callable[[int], Dataset]:
    """A registry factory: ``make_synthetic(seed=seed, **params)`` renamed and described."""

    def factory(seed: int = 0) -> Dataset:
        ds = make_synthetic(seed=seed, **params)
        return dataclasses.replace(ds, name=name, learnable=learnable, description=description)

    factory.__name__ = f"make_{name.replace('-', '_')}"
    factory.__doc__ = f"Built-in dataset {name!r}: {description}"
    return factory


BUILTIN: dict[str, Callable[..., Dataset]] = {
    "digits": lambda seed=0: make_digits_two_view("top_bottom", seed=seed),
    "digits-lr": lambda seed=0: make_digits_two_view("left_right", seed=seed),
    "synthetic": _synthetic(
        "synthetic",
        "balanced baseline: 10 classes, all latent dims shared, equal noise 0.3/0.3",
    ),
    "synthetic-imbalanced": _synthetic(
        "synthetic-imbalanced",
        "modality difficulty imbalance (noise a=0.15, b=1.0) plus a class long tail (Zipf 0.6)",
        noise_a=0.15,
        noise_b=1.0,
        class_imbalance=0.6,
    ),
    "synthetic-longtail-dup": _synthetic(
        "synthetic-longtail-dup",
        "30 classes with a strong long tail and 40% near-duplicate rows",
        n_classes=30,
        class_imbalance=0.8,
        duplicate_rate=0.4,
    ),
    "synthetic-missing": _synthetic(
        "synthetic-missing",
        "missing modality: 20% of rows are unrelated orphans (paired=False)",
        missing_rate=0.2,
    ),
    "synthetic-unique": _synthetic(
        "synthetic-unique",
        "half the latent is view-private and each view has 24 unique dims: weak shared signal",
        shared_frac=0.5,
        unique_dim=24,
    ),
    "synthetic-synergy": _synthetic(
        "synthetic-synergy",
        "negative control: b is a sign-product (XOR-like) of the latent, no linear map exists",
        learnable=False,
        synergy=1.0,
    ),
}
"""Built-in datasets: name -> factory(seed). The synthetic and digits sets have n <= 2000 and
view dims <= 64; the real sets (``REAL``, added below) are loaded from ``DATA_DIR``."""


DATA_DIR = Path(__file__).resolve().parent / "data"
"""Committed real datasets (``NAME.npz`` + ``NAME.md``), rebuilt by ``make datasets``."""

REAL_DESCRIPTIONS = {
    "bible-en-es": "real text-text: New Testament verses, English MiniLM-L6 <-> Spanish e5-small "
                   "(7,730 pairs, book order)",
    "emoji-image-name": "real image-text: emoji pictures (EfficientNet-Lite0) <-> their names "
                        "(MiniLM-L6), 1.9k pairs",
    "bible-en-es-full": "real text-text: the whole joined Bible, Genesis to Revelation, English "
                        "MiniLM-L6 <-> Spanish e5-small (30,445 pairs, book order; the long "
                        "stream of make bench-long-stream)",
}


def load_real(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a committed real dataset (see ``DATA_DIR/NAME.md`` for its sources and filters).

    Parameters
    ----------
    name : str
        A key of ``REAL_DESCRIPTIONS``.
    data_dir : path, optional
        Folder holding ``NAME.npz`` (default ``DATA_DIR``).

    Returns
    -------
    Dataset
        Float32 views (stored as float16), ``ids``, ``learnable=True``.

    Raises
    ------
    ValueError
        Unknown name (lists the known ones) or a malformed file (names the problem).
    FileNotFoundError
        The file is missing; the message says how to rebuild it.
    """
    if name not in REAL_DESCRIPTIONS:
        raise ValueError(f"unknown real dataset {name!r}; known: {sorted(REAL_DESCRIPTIONS)}")
    path = Path(data_dir or DATA_DIR) / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: rebuild it with `pairsieve datasets build "
                                f"{name}` (make datasets)")
    ds = load_npz(path)
    return dataclasses.replace(ds, name=name, description=REAL_DESCRIPTIONS[name])


for _name in REAL_DESCRIPTIONS:
    BUILTIN[_name] = (lambda n: lambda seed=0: load_real(n))(_name)
REAL = tuple(REAL_DESCRIPTIONS)
"""Names of the real datasets (also keys of ``BUILTIN``; their factories ignore the seed)."""
QUALITY_REAL = ("bible-en-es", "emoji-image-name")
"""The real sets of ``make bench-quality`` (the whole Bible is the long stream's, too slow for
20 seeds x every strategy)."""


def get_dataset(name: str, seed: int = 0) -> Dataset:
    """Build the built-in dataset ``name`` with ``seed``.

    Parameters
    ----------
    name : str
        A key of ``BUILTIN``.
    seed : int
        Seed passed to the factory (ignored by the deterministic digits datasets).

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        ``name`` is not a built-in; the message lists the known names.
    """
    try:
        factory = BUILTIN[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(BUILTIN)}") from None
    return factory(seed)


def describe(ds: Dataset) -> dict:
    """Summarise a dataset.

    Parameters
    ----------
    ds : Dataset

    Returns
    -------
    dict
        ``name``, ``n``, ``d_a``, ``d_b``, ``n_paired`` (rows whose views are partners),
        ``n_classes`` (distinct labels present, or None without labels), ``learnable``,
        ``description``.
    """
    return {
        "name": ds.name,
        "n": ds.n,
        "d_a": int(ds.a.shape[1]),
        "d_b": int(ds.b.shape[1]),
        "n_paired": ds.n_paired,
        "n_classes": None if ds.labels is None else int(np.unique(ds.labels).size),
        "learnable": bool(ds.learnable),
        "description": ds.description,
    }
