"""Real datasets: the committed files load, their provenance is written, the builders' pure parts
(SWORD export parsing, verse join) behave, and bad files get errors that name the problem."""

from __future__ import annotations

import numpy as np
import pytest

from service.evaluation import real_build
from service.evaluation.datasets import BUILTIN, DATA_DIR, REAL, load_npz, load_real

EXPECTED_ROWS = {"bible-en-es": (7730, 7730), "emoji-image-name": (1911, 1911),
                 "bible-en-es-full": (30445, 30445)}


@pytest.mark.parametrize("name", REAL)
def test_committed_real_dataset_loads_with_provenance(name):
    ds = load_real(name)
    lo, hi = EXPECTED_ROWS[name]
    assert lo <= ds.n <= hi
    assert ds.a.dtype == np.float32 and ds.b.dtype == np.float32
    assert ds.ids is not None and len(set(ds.ids.tolist())) == ds.n
    assert ds.modality_a != ds.modality_b
    # a small slice is a valid dataset of its own
    head = load_npz(DATA_DIR / f"{name}.npz")
    assert np.array_equal(head.a[:50], ds.a[:50])
    md = (DATA_DIR / f"{name}.md").read_text()
    for needed in ("## Sources and licences", "## Filters", "PyPI", "Retrieval check"):
        assert needed in md, f"{name}.md lacks {needed!r}"
    assert name in BUILTIN and BUILTIN[name](0).name == name


def test_real_dataset_pairs_are_learnable_from_a_slice():
    """Row i of a and b are partners: a ridge map fitted on 400 pairs retrieves far above
    chance (1/200) among 200 held-out rows of the Bible slice."""
    ds = load_real("bible-en-es")
    probe = real_build._ridge_probe(ds.a[:1500], ds.b[:1500])
    assert probe["r1@400"] > 0.2
    shuffled = real_build._ridge_probe(ds.a[:1500],
                                       np.random.default_rng(0).permutation(ds.b[:1500]))
    assert shuffled["r1@400"] < 0.05


def test_load_real_missing_file_says_how_to_rebuild(tmp_path):
    with pytest.raises(FileNotFoundError, match="pairsieve datasets build emoji-image-name"):
        load_real("emoji-image-name", data_dir=tmp_path)


def test_load_real_unknown_name():
    with pytest.raises(ValueError, match=r"unknown real dataset 'nope'; known: \['bible-en-es'"):
        load_real("nope")


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        ({"a": np.zeros((3, 2), np.float16), "b": np.zeros((3, 2)), "ids": np.array(["x", "y"])},
         r"ids must have shape \(3,\).*\(2,\)"),
        ({"a": np.zeros((2, 2)), "b": np.zeros((2, 2)), "ids": np.array(["x", "x"])},
         "ids must be unique; 'x' appears 2 times"),
        ({"a": np.zeros((2, 2)), "b": np.zeros((2, 2)), "ids": np.array([1, 2])},
         "ids must be a str array, got dtype int64"),
        ({"a": np.zeros((2, 2), bool), "b": np.zeros((2, 2))},
         "a must hold real numbers, got dtype bool"),
        ({"b": np.zeros((2, 2))}, r"missing key\(s\) \['a'\]"),
    ],
)
def test_bad_real_style_files_are_refused_with_the_reason(tmp_path, arrays, pattern):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=pattern):
        load_npz(path)


def test_float16_file_loads_as_float32(tmp_path):
    path = tmp_path / "half.npz"
    np.savez(path, a=np.ones((3, 2), np.float16), b=np.ones((3, 4), np.float16),
             ids=np.array(["p", "q", "r"]))
    ds = load_npz(path)
    assert ds.a.dtype == np.float32 and ds.b.shape == (3, 4) and list(ds.ids) == ["p", "q", "r"]


def test_int8_storage_round_trips_within_half_a_step(tmp_path):
    z = np.random.default_rng(1).standard_normal((50, 6)).astype(np.float16)
    z[:, 5] = 0  # an all-zero axis keeps scale 1 and loads as zeros
    arrays = real_build.stored_arrays(z, z[:, :4], "int8")
    assert arrays["a"].dtype == np.int8 and arrays["a_scale"].shape == (6,)
    assert arrays["a_scale"][5] == 1.0
    path = tmp_path / "q.npz"
    np.savez(path, **arrays, ids=np.array([f"r{i}" for i in range(50)]))
    ds = load_npz(path)
    step = arrays["a_scale"]
    assert ds.a.dtype == np.float32 and ds.b.shape == (50, 4)
    assert np.all(np.abs(ds.a - z.astype(np.float32)) <= step / 2 + 1e-6)
    assert not np.any(ds.a[:, 5])
    with pytest.raises(ValueError, match="storage must be 'float16' or 'int8', got 'int4'"):
        real_build.stored_arrays(z, z, "int4")


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        ({"a": np.zeros((2, 3), np.int8), "a_scale": np.ones(2, np.float32)},
         r"a_scale must be 3 positive finite floats, got shape \(2,\)"),
        ({"a": np.zeros((2, 3), np.int8), "a_scale": np.array([1.0, 0.0, 1.0])},
         "a_scale must be 3 positive finite floats"),
        ({"a": np.zeros((2, 3), np.float32), "a_scale": np.ones(3)},
         "a_scale given but a is float32 \\(2, 3\\), not a 2-D integer view"),
    ],
)
def test_bad_scales_are_refused(tmp_path, arrays, pattern):
    path = tmp_path / "bad.npz"
    np.savez(path, b=np.zeros((2, 3)), **arrays)
    with pytest.raises(ValueError, match=pattern):
        load_npz(path)


IMP = """$$$[ Module Heading ]
<milestone type="x-importer"/>
$$$Genesis 0:0
intro
$$$Genesis 1:1
<title type="x-gen">The Creation</title><w lemma="strong:H7225">In the beginning</w>, God
<note type="x-footnote">a footnote</note> created &amp; made .
$$$Genesis 1:2
<w>“Hello</w> world ”
$$$Genesis 1:3

$$$Exodus 2:1
x
"""


def test_parse_imp_strips_markup_notes_titles_and_intros():
    verses = real_build.parse_imp(IMP)
    assert verses == {
        ("Genesis", 1, 1): "In the beginning, God created & made.",
        ("Genesis", 1, 2): "“Hello world”",
        ("Exodus", 2, 1): "x",
    }


def test_join_keeps_only_chapters_with_identical_verse_sets_in_first_order():
    first = {("A", 1, 1): "", ("A", 1, 2): "", ("B", 1, 1): "", ("B", 1, 2): "", ("C", 1, 1): ""}
    second = {("B", 1, 1): "", ("B", 1, 2): "", ("A", 1, 1): "", ("A", 1, 2): "",
              ("C", 1, 1): "", ("C", 1, 2): ""}
    assert real_build.join_verses(first, second, drop_chapters=frozenset()) == [
        ("A", 1, 1), ("A", 1, 2), ("B", 1, 1), ("B", 1, 2)]
    assert real_build.join_verses(first, second, drop_chapters=frozenset({("A", 1)})) == [
        ("B", 1, 1), ("B", 1, 2)]


def test_pca_fit_axes_are_orthonormal_and_ordered():
    x = np.random.default_rng(0).standard_normal((200, 6)) * np.array([5, 4, 3, 2, 1, 0.5])
    mean, axes = real_build.pca_fit(x, 3)
    assert axes.shape == (6, 3)
    assert np.allclose(axes.T @ axes, np.eye(3), atol=1e-10)
    var = ((x - mean) @ axes).var(axis=0)
    assert var[0] >= var[1] >= var[2]


def test_build_unknown_name_lists_builders(tmp_path):
    with pytest.raises(ValueError, match="unknown real dataset 'x'"):
        real_build.build("x", tmp_path, tmp_path)
