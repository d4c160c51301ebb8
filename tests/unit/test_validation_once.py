"""Each event's vector is checked once per boundary (codec, core entry), in one error format."""

from __future__ import annotations

import asyncio
import copy
import re

import numpy as np
import pytest

import service.core.scorer as scorer_mod
import service.core.selector as selector_mod
import service.handlers as handlers_mod
from service.core.selector import SelectorConfig, StreamingSelector
from service.core.types import FeatureItem
from service.core.validation import VectorError, item_vectors
from service.handlers import IncomingEvent, SelectionHandler
from service.wire import codecs
from tests.support import DIMS, data_and_model

#: the shared tail: first bad value (when there is one), then what the input was
TAIL = r"\((first at index (\d+): ([^;]+); )?shape \((\d+),\), dtype (\w+)\)$"


@pytest.mark.parametrize("vec,problem,first", [
    (np.array([0, 1, np.nan, 3] + [0] * 8), "1 value(s) are NaN or inf", ("2", "nan")),
    (np.array([0] * 11 + [-np.inf], np.float32), "1 value(s) are NaN or inf", ("11", "-inf")),
    (np.array([3e38] + [0] * 11, np.float32), "1 value(s) exceed |x| <= 1e+15", ("0", "3e+38")),
    (np.zeros(5), "wrong dimension 5, expected 12", None),
])
def test_core_error_echoes_item_modality_shape_dtype_and_first_bad_value(vec, problem, first):
    good = np.zeros(12, np.float32)
    with pytest.raises(VectorError) as ei:
        item_vectors([good, vec], 12, item_ids=["ok", "bad-7"], modality="image")
    msg = str(ei.value)
    assert msg.startswith("item 'bad-7' (image): ") and problem in msg, msg
    m = re.search(TAIL, msg)
    assert m, msg
    assert (m.group(4), m.group(5)) == (str(len(vec)), str(vec.dtype))
    assert (m.group(2), m.group(3)) == (first or (None, None))
    assert ei.value.index == 1


def test_codec_uses_the_same_format():
    v = np.zeros(8, np.float32)
    v[5] = np.nan
    with pytest.raises(codecs.WireError) as ei:
        codecs.decode_vector(codecs.encode_vector(v), 8, what="event 'e1' vector")
    assert ei.value.reason == "non_finite"
    m = re.search(TAIL, str(ei.value))
    assert m and m.group(2) == "5" and m.group(3) == "nan" and m.group(5) == "float32"


def test_item_vectors_stacks_exactly_as_before():
    rng = np.random.default_rng(0)
    vs = [rng.normal(size=6) for _ in range(4)]  # float64 in: cast once to float32
    out = item_vectors(vs, 6, item_ids=list("abcd"), modality="x")
    np.testing.assert_array_equal(out, np.stack(vs).astype(np.float32))
    assert out.dtype == np.float32 and out.flags.c_contiguous


@pytest.mark.parametrize("case", ["arrays", "mixed dtypes", "lists", "a (1, d) row", "bools"])
def test_item_vectors_gives_one_result_whether_stacked_at_once_or_checked_row_by_row(case):
    """A batch of plain (d,) vectors is stacked in one call; anything else goes row by row. Both
    ways give the same float32 matrix (and a (1, d) row still reads as (d,))."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(3, 6))
    vs = {"arrays": list(base.astype(np.float32)),
          "mixed dtypes": [base[0], base[1].astype(np.float32), np.arange(1, 7)],
          "lists": [list(r) for r in base],
          "a (1, d) row": [base[0], base[1][None, :], base[2]],
          "bools": [np.ones(6, bool), base[1], base[2]]}[case]
    out = item_vectors(vs, 6, item_ids=list("abc"), modality="x")
    want = np.stack([np.asarray(v).reshape(6) for v in vs]).astype(np.float32)
    np.testing.assert_array_equal(out, want)
    assert out.dtype == np.float32 and out.flags.c_contiguous


@pytest.mark.parametrize("bad,reason", [
    (np.zeros((2, 12)), "wrong_dimension"), (np.array(["a"] * 12), "undecodable"),
    (np.zeros(12, complex), "undecodable"), (np.zeros(11), "wrong_dimension")])
def test_a_batch_that_cannot_be_stacked_as_is_names_its_bad_item(bad, reason):
    good = np.ones(12, np.float32)
    with pytest.raises(VectorError) as ei:
        item_vectors([good, good, bad], 12, item_ids=["a", "b", "c-3"], modality="image")
    assert str(ei.value).startswith("item 'c-3' (image): ") and ei.value.index == 2
    assert ei.value.kind == reason


def test_a_submitted_batch_is_checked_once_at_the_core_entry(monkeypatch):
    _, _, model = data_and_model()
    a, b, _ = data_and_model()
    sel = StreamingSelector(copy.deepcopy(model), SelectorConfig(index_size=64, cache_capacity=32),
                            seed=0, device="cpu")
    h = SelectionHandler(sel, trainer=None)
    calls = {"entry": 0, "again": 0}
    real = selector_mod.item_vectors

    def entry(*args, **kw):
        calls["entry"] += 1
        return real(*args, **kw)

    def again(*args, **kw):
        calls["again"] += 1
        raise AssertionError("vector checked again after the core's entry")

    monkeypatch.setattr(selector_mod, "item_vectors", entry)
    monkeypatch.setattr(scorer_mod, "as_matrix", again)
    monkeypatch.setattr(handlers_mod, "as_matrix", again)
    monkeypatch.setattr(selector_mod, "as_matrix", again)
    evs = [IncomingEvent(f"e{j}", f"i{j}", "image" if j % 2 else "text", (a if j % 2 else b)[j])
           for j in range(10)]
    try:
        outs = asyncio.run(h.submit(evs))
    finally:
        h.close()
    assert len(outs) == 10 and calls == {"entry": 2, "again": 0}  # one stacked check per modality
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32
               for _, v in h.learning.items.values())


def test_handler_names_the_event_of_a_bad_vector():
    _, _, model = data_and_model()
    sel = StreamingSelector(copy.deepcopy(model), SelectorConfig(index_size=64), device="cpu")
    h = SelectionHandler(sel, trainer=None)
    bad = np.zeros(DIMS["text"], np.float32)
    bad[4] = np.inf
    evs = [IncomingEvent("ev-ok", "i0", "image", np.ones(DIMS["image"], np.float32)),
           IncomingEvent("ev-bad", "i1", "text", bad)]
    try:
        with pytest.raises(ValueError, match=r"^event 'ev-bad': item 'i1' \(text\): 1 value\(s\) "
                                             r"are NaN or inf \(first at index 4: inf;"):
            asyncio.run(h.submit(evs))
    finally:
        h.close()
    assert sel.budget.seen == 0
    with pytest.raises(ValueError, match="item 'x' "):
        sel.propose([FeatureItem("x", "image", np.zeros(3))])


def test_the_core_refuses_an_all_zero_vector_and_the_handler_an_overlong_id():
    _, _, model = data_and_model()
    sel = StreamingSelector(copy.deepcopy(model), SelectorConfig(index_size=64), device="cpu")
    with pytest.raises(VectorError, match=r"item 'z' \(image\): all 12 values are 0") as ei:
        sel.propose([FeatureItem("ok", "image", np.ones(12)),
                     FeatureItem("z", "image", np.zeros(12))])
    assert ei.value.kind == "zero_vector" and ei.value.index == 1
    h = SelectionHandler(sel, trainer=None)
    try:
        with pytest.raises(ValueError, match="event 'e1': item_id has 300 characters"):
            asyncio.run(h.submit([IncomingEvent("e1", "x" * 300, "image", np.ones(12))]))
    finally:
        h.close()
