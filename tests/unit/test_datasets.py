"""Unit tests for the benchmark's built-in two-view datasets (``service.evaluation.datasets``)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from service.evaluation.datasets import (
    BUILTIN,
    REAL,
    Dataset,
    describe,
    get_dataset,
    load_npz,
    make_digits_two_view,
    make_synthetic,
)

SYNTHETIC_NAMES = [name for name in BUILTIN if name.startswith("synthetic")]
# generated sets; the committed real sets (REAL) are tested in test_real_datasets.py
TOY = [name for name in BUILTIN if name not in REAL]


@pytest.fixture(scope="module")
def builtins() -> dict[str, Dataset]:
    """Every built-in at seed 0, built once for the module."""
    return {name: get_dataset(name, seed=0) for name in TOY}


def heldout_r2(x: np.ndarray, y: np.ndarray) -> float:
    """R^2 on the second half of a least-squares affine map x -> y fit on the first half."""
    x = np.hstack([x, np.ones((len(x), 1))]).astype(np.float64)
    y = y.astype(np.float64)
    h = len(x) // 2
    w, *_ = np.linalg.lstsq(x[:h], y[:h], rcond=None)
    resid = y[h:] - x[h:] @ w
    return float(1.0 - (resid**2).sum() / ((y[h:] - y[h:].mean(axis=0)) ** 2).sum())


def nn_distances(x: np.ndarray, *, return_index: bool = False):
    """Distance of each row of ``x`` (n, d) to its nearest other row, shape (n,) (and its index)."""
    x = x.astype(np.float64)
    sq = (x * x).sum(axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.T
    np.fill_diagonal(d2, np.inf)
    nn = d2.argmin(axis=1)
    d = np.sqrt(np.maximum(d2[np.arange(len(x)), nn], 0.0))
    return (d, nn) if return_index else d


# --- registry -------------------------------------------------------------------------------


def test_builtin_names():
    assert list(BUILTIN) == [*TOY, *REAL]
    assert REAL == ("bible-en-es", "emoji-image-name", "bible-en-es-full")
    assert TOY == [
        "digits",
        "digits-lr",
        "synthetic",
        "synthetic-imbalanced",
        "synthetic-longtail-dup",
        "synthetic-missing",
        "synthetic-unique",
        "synthetic-synergy",
    ]


@pytest.mark.parametrize("name", TOY)
def test_builtin_shapes_and_dtypes(builtins, name):
    ds = builtins[name]
    assert ds.name == name
    assert ds.a.dtype == np.float32 and ds.b.dtype == np.float32
    assert ds.a.ndim == 2 and ds.b.ndim == 2
    n = ds.a.shape[0]
    assert ds.b.shape[0] == n
    assert 100 <= n <= 2500
    assert ds.a.shape[1] <= 64 and ds.b.shape[1] <= 64
    assert np.isfinite(ds.a).all() and np.isfinite(ds.b).all()
    assert ds.labels is not None and ds.labels.dtype == np.int64 and ds.labels.shape == (n,)
    assert ds.labels.min() >= 0
    if ds.paired is not None:
        assert ds.paired.dtype == np.bool_ and ds.paired.shape == (n,)
    assert ds.modality_a != ds.modality_b
    assert ds.description and "\n" not in ds.description


def test_builtin_specific_shapes(builtins):
    assert builtins["digits"].a.shape == (1797, 32) and builtins["digits"].b.shape == (1797, 32)
    assert builtins["digits-lr"].a.shape == (1797, 32)
    assert builtins["synthetic"].a.shape == (2000, 64)
    assert builtins["synthetic"].b.shape == (2000, 48)
    assert (builtins["digits"].modality_a, builtins["digits"].modality_b) == ("top", "bottom")
    assert (builtins["digits-lr"].modality_a, builtins["digits-lr"].modality_b) == ("left", "right")


def test_learnable_flags(builtins):
    assert {name for name, ds in builtins.items() if not ds.learnable} == {"synthetic-synergy"}


def test_get_dataset_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'.*'digits'.*'synthetic-synergy'"):
        get_dataset("nope")


def test_describe(builtins):
    info = describe(builtins["synthetic-missing"])
    assert info == {
        "name": "synthetic-missing",
        "n": 2000,
        "d_a": 64,
        "d_b": 48,
        "n_paired": 1600,
        "n_classes": 10,
        "learnable": True,
        "description": builtins["synthetic-missing"].description,
    }
    unlabeled = Dataset("x", np.zeros((3, 2)), np.ones((3, 4)))
    assert describe(unlabeled)["n_classes"] is None
    assert describe(unlabeled)["n_paired"] == 3


# --- determinism ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOY)
def test_same_seed_same_arrays(builtins, name):
    again = get_dataset(name, seed=0)
    ref = builtins[name]
    np.testing.assert_array_equal(again.a, ref.a)
    np.testing.assert_array_equal(again.b, ref.b)
    np.testing.assert_array_equal(again.labels, ref.labels)
    if ref.paired is None:
        assert again.paired is None
    else:
        np.testing.assert_array_equal(again.paired, ref.paired)


@pytest.mark.parametrize("name", SYNTHETIC_NAMES)
def test_different_seed_different_arrays(builtins, name):
    other = get_dataset(name, seed=1)
    assert other.a.shape == builtins[name].a.shape
    assert not np.array_equal(other.a, builtins[name].a)
    assert not np.array_equal(other.b, builtins[name].b)


def test_global_rng_untouched():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    make_synthetic(n=200, missing_rate=0.1, duplicate_rate=0.2, class_imbalance=0.5, seed=4)
    after = np.random.get_state()[1]
    np.testing.assert_array_equal(before, after)
    # and the global state does not influence the result
    np.random.seed(999)
    x = make_synthetic(n=200, seed=4).a
    np.random.seed(0)
    np.testing.assert_array_equal(x, make_synthetic(n=200, seed=4).a)


# --- npz round trip and validation ----------------------------------------------------------


@pytest.mark.parametrize("name", ["synthetic-missing", "digits"])
def test_npz_round_trip(builtins, tmp_path, name):
    ds = builtins[name]
    path = tmp_path / f"{name}.npz"
    ds.to_npz(path)
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
    expected = {"a", "b", "labels", "modality_a", "modality_b"} | (
        {"paired"} if ds.paired is not None else set()
    )
    assert keys == expected
    back = load_npz(path)
    assert back.name == name
    np.testing.assert_array_equal(back.a, ds.a)
    np.testing.assert_array_equal(back.b, ds.b)
    np.testing.assert_array_equal(back.labels, ds.labels)
    assert back.a.dtype == np.float32 and back.labels.dtype == np.int64
    if ds.paired is None:
        assert back.paired is None
    else:
        assert back.paired.dtype == np.bool_
        np.testing.assert_array_equal(back.paired, ds.paired)
    assert (back.modality_a, back.modality_b) == (ds.modality_a, ds.modality_b)


def test_load_npz_minimal_file_defaults(tmp_path):
    path = tmp_path / "tiny.npz"
    np.savez(path, a=np.arange(6, dtype=np.float64).reshape(3, 2), b=np.ones((3, 5)))
    ds = load_npz(path)
    assert ds.name == "tiny"
    assert ds.a.dtype == np.float32 and ds.b.shape == (3, 5)
    assert ds.labels is None and ds.paired is None
    assert (ds.modality_a, ds.modality_b) == ("a", "b")


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        ({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}, "a has 3 rows but b has 4"),
        (
            {"a": np.zeros((4, 2)), "b": np.array([[0.0], [1.0], [np.nan], [2.0]])},
            r"b has 1 row\(s\) with NaN or inf \(first bad row index 2\)",
        ),
        ({"a": np.full((2, 2), np.inf), "b": np.zeros((2, 2))}, "a has 2 row.*NaN or inf"),
        ({"a": np.zeros(5), "b": np.zeros((5, 2))}, r"a must be a 2-D array.*shape \(5,\)"),
        ({"a": np.zeros((5, 2)), "b": np.zeros((5, 2, 1))}, r"b must be a 2-D array.*\(5, 2, 1\)"),
        ({"a": np.zeros((2, 2))}, r"missing key\(s\) \['b'\]"),
        (
            {"a": np.zeros((3, 2)), "b": np.zeros((3, 2)), "paired": np.ones(2, bool)},
            r"paired must have shape \(3,\).*\(2,\)",
        ),
        (
            {"a": np.zeros((3, 2)), "b": np.zeros((3, 2)), "paired": np.ones(3)},
            "paired must be a bool array, got dtype float64",
        ),
        (
            {"a": np.zeros((3, 2)), "b": np.zeros((3, 2)), "labels": np.zeros(3) + 0.5},
            "labels must hold integers, got dtype float64",
        ),
        ({"a": np.array([["x", "y"]]), "b": np.zeros((1, 2))}, "a must hold real numbers"),
    ],
)
def test_load_npz_rejects_bad_files(tmp_path, arrays, pattern):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=pattern):
        load_npz(path)


def test_dataset_constructor_validates():
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        Dataset("x", np.zeros((3, 2)), np.zeros((3, 2)), labels=np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="modality_a and modality_b must differ, both are 'img'"):
        Dataset("x", np.zeros((3, 2)), np.zeros((3, 2)), modality_a="img", modality_b="img")


# --- digits -----------------------------------------------------------------------------------


def test_digits_views_are_exact_pixel_halves(builtins):
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32)
    n = len(images)
    tb, lr = builtins["digits"], builtins["digits-lr"]
    np.testing.assert_array_equal(
        np.concatenate([tb.a.reshape(n, 4, 8), tb.b.reshape(n, 4, 8)], axis=1), images
    )
    np.testing.assert_array_equal(
        np.concatenate([lr.a.reshape(n, 8, 4), lr.b.reshape(n, 8, 4)], axis=2), images
    )
    np.testing.assert_array_equal(tb.labels, digits.target)
    assert np.unique(tb.labels).tolist() == list(range(10))


def test_digits_bad_split():
    with pytest.raises(ValueError, match="unknown digits split 'diagonal'"):
        make_digits_two_view("diagonal")


# --- synthetic generator semantics ------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "rate", "expected"), [(500, 0.1, 50), (333, 0.25, 83), (400, 0.0, 0)]
)
def test_missing_rate_count(n, rate, expected):
    ds = make_synthetic(n=n, missing_rate=rate, seed=3)
    assert ds.paired is not None
    assert int((~ds.paired).sum()) == expected


def test_missing_rows_are_unrelated_orphans():
    ds = make_synthetic(n=1500, missing_rate=0.3, seed=5)
    p = ds.paired
    x = np.hstack([ds.a, np.ones((ds.n, 1), np.float32)]).astype(np.float64)
    w, *_ = np.linalg.lstsq(x[p], ds.b[p].astype(np.float64), rcond=None)
    err = ((x @ w - ds.b) ** 2).sum(axis=1)
    # the a->b map fit on true pairs predicts the paired rows far better than the orphans
    assert np.median(err[~p]) > 3.0 * np.median(err[p])


def test_class_imbalance_long_tail():
    flat = make_synthetic(n=2000, class_imbalance=0.0, seed=2)
    tail = make_synthetic(n=2000, class_imbalance=0.8, seed=2)
    counts_flat = np.bincount(flat.labels, minlength=10)
    counts_tail = np.bincount(tail.labels, minlength=10)
    assert counts_flat.max() < 1.5 * counts_flat.min()
    assert counts_tail.max() >= 10 * max(counts_tail.min(), 1)
    assert counts_tail.argmax() == 0  # class 0 is the head of the Zipf-like tail


def test_duplicate_rate_creates_near_duplicates():
    fractions = []
    threshold = None
    for rate in (0.0, 0.2, 0.4):
        d = nn_distances(make_synthetic(n=1000, duplicate_rate=rate, seed=7).a)
        if threshold is None:  # "small" = well below the typical nearest-neighbour distance
            threshold = 0.7 * float(np.median(d))
        fractions.append(float((d < threshold).mean()))
    assert fractions[0] < 0.05
    assert fractions[1] > fractions[0] + 0.2
    assert fractions[2] > fractions[1] + 0.15


def test_duplicates_keep_their_source_class():
    reference = nn_distances(make_synthetic(n=600, noise_a=0.05, seed=1).a)
    ds = make_synthetic(n=600, duplicate_rate=0.4, noise_a=0.05, seed=1)
    d, nn = nn_distances(ds.a, return_index=True)
    close = d < 0.5 * float(np.median(reference))
    assert close.sum() > 240  # each of the 240 duplicates has its source (or a sibling) nearby
    assert (ds.labels[close] == ds.labels[nn[close]]).all()


def test_linear_map_fits_synthetic_but_not_synergy(builtins):
    r2_plain = heldout_r2(builtins["synthetic"].a, builtins["synthetic"].b)
    r2_syn = heldout_r2(builtins["synthetic-synergy"].a, builtins["synthetic-synergy"].b)
    r2_unique = heldout_r2(builtins["synthetic-unique"].a, builtins["synthetic-unique"].b)
    assert r2_plain > 0.5
    assert r2_syn < 0.1
    assert r2_syn < r2_plain - 0.5
    assert r2_unique < r2_plain - 0.2  # less of b is predictable from a when less is shared


def test_synergy_is_gradual():
    r2 = [
        heldout_r2(*(lambda d: (d.a, d.b))(make_synthetic(n=1500, synergy=s, seed=0)))
        for s in (0.0, 0.5, 1.0)
    ]
    assert r2[0] > r2[1] > r2[2]


def test_noise_imbalance_makes_b_the_hard_view():
    ds = make_synthetic(n=2000, noise_a=0.15, noise_b=1.0, seed=0)
    flip = make_synthetic(n=2000, noise_a=1.0, noise_b=0.15, seed=0)
    # predicting the noisy view is harder than predicting the clean one
    assert heldout_r2(ds.a, ds.b) < heldout_r2(flip.a, flip.b)


def test_shared_frac_zero_is_unlearnable():
    ds = make_synthetic(n=1500, shared_frac=0.0, seed=0)
    assert not ds.learnable
    assert heldout_r2(ds.a, ds.b) < 0.05


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"n": 1}, "n must be an integer >= 2, got 1"),
        ({"n_classes": 0}, "n_classes must be an integer >= 1, got 0"),
        ({"shared_frac": 1.5}, re.escape("shared_frac must be in [0, 1], got 1.5")),
        ({"synergy": -0.1}, re.escape("synergy must be in [0, 1], got -0.1")),
        ({"missing_rate": 1.0}, re.escape("missing_rate must be in [0, 1), got 1.0")),
        ({"class_imbalance": 1.0}, re.escape("class_imbalance must be in [0, 1), got 1.0")),
        ({"duplicate_rate": float("nan")}, re.escape("duplicate_rate must be in [0, 1), got nan")),
        ({"noise_b": -1.0}, "noise_b must be a finite number >= 0, got -1.0"),
        ({"unique_dim": -1}, "unique_dim must be an integer >= 0, got -1"),
    ],
)
def test_make_synthetic_rejects_bad_parameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_synthetic(**kwargs)
