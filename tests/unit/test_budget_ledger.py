"""BudgetLedger: grants in log order, an exact total for any number of workers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.budget_ledger import BudgetLedger


def test_new_ids_are_granted_up_to_the_total_and_old_ones_again_for_free():
    led = BudgetLedger(3)
    assert led.apply(["a", "b"]) == [True, True]
    assert led.apply(["c", "d", "a"]) == [True, False, True]  # d: spent; a: held already
    assert led.granted == 3 and led.exhausted and led.applied == 2
    assert led.apply(["b", "e"]) == [True, False]
    assert led.holds("c") and not led.holds("d")


def test_an_id_repeated_in_one_reservation_takes_one_unit():
    led = BudgetLedger(2)
    assert led.apply(["x", "x", "y"]) == [True, True, True]
    assert led.granted == 2


def test_a_zero_total_grants_nothing():
    led = BudgetLedger(0)
    assert led.exhausted and led.apply(["a"]) == [False]
    assert led.answer_locally(["a"]) == [False]


def test_the_local_answer_exists_only_once_spent():
    led = BudgetLedger(2)
    led.apply(["a"])
    assert led.answer_locally(["a", "b"]) is None  # a unit is left: only the log can tell
    led.apply(["b"])
    assert led.answer_locally(["a", "c", "b"]) == [True, False, True]


@pytest.mark.parametrize("total", [-1, 1.5, True, "3", None])
def test_a_bad_total_is_refused_by_value(total):
    with pytest.raises(ValueError, match="ledger total must be an integer >= 0, got"):
        BudgetLedger(total)


ids = st.text(alphabet="abcdefgh", min_size=1, max_size=2)
reservations = st.lists(st.lists(ids, min_size=1, max_size=6), max_size=40)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, 12), log=reservations)
def test_every_reader_of_one_log_agrees_and_the_total_is_never_passed(total, log):
    """Two workers applying the same log agree on every grant; at most ``total`` distinct ids are
    ever granted; a granted id stays granted; and the local answer, when there is one, is what
    the log would answer."""
    readers = [BudgetLedger(total), BudgetLedger(total)]
    granted: set[str] = set()
    for res in log:
        local = readers[0].answer_locally(res)
        got = [r.apply(res) for r in readers]
        assert got[0] == got[1]
        if local is not None:
            assert local == got[0]
        for eid, ok in zip(res, got[0], strict=True):
            if eid in granted:
                assert ok  # held before: granted again, free
            if ok:
                granted.add(eid)
        assert len(granted) == readers[0].granted <= total
    # while units were left, no new id was refused
    asked = {eid for res in log for eid in res}
    assert len(granted) == min(total, len(asked))
