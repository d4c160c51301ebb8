"""BudgetLedger: grants in log order, an exact total for any number of workers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.budget_ledger import BudgetLedger, Grant

NEW, HELD, FOREIGN, DENIED = Grant.NEW, Grant.HELD, Grant.FOREIGN, Grant.DENIED


def test_new_ids_are_granted_up_to_the_total_and_old_ones_again_for_free():
    led = BudgetLedger(3)
    assert led.apply(["a", "b"], "w1") == [NEW, NEW]
    assert led.left == 1 and not led.exhausted
    assert led.apply(["c", "d", "a"], "w1") == [NEW, DENIED, HELD]  # d: spent; a: held already
    assert led.granted == 3 and led.left == 0 and led.exhausted and led.applied == 2
    assert led.apply(["b", "e"], "w1") == [HELD, DENIED]
    assert led.holds("c") and not led.holds("d")


def test_a_unit_another_holder_reserved_first_is_foreign():
    led = BudgetLedger(5)
    led.apply(["a"], "w1")
    assert led.apply(["a", "b"], "w2") == [FOREIGN, NEW]
    assert led.apply(["b", "a"], "w1") == [FOREIGN, HELD]  # the first holder stays the holder
    assert led.granted == 2


def test_grants_are_truthy_only_when_they_hold_a_unit():
    assert all([NEW, HELD, FOREIGN]) and not DENIED


def test_an_id_repeated_in_one_reservation_takes_one_unit():
    led = BudgetLedger(2)
    assert led.apply(["x", "x", "y"]) == [NEW, HELD, NEW]
    assert led.granted == 2


def test_a_zero_total_grants_nothing():
    led = BudgetLedger(0)
    assert led.exhausted and led.apply(["a"]) == [DENIED]
    assert led.answer_locally(["a"]) == [DENIED]


def test_the_local_answer_exists_only_once_spent():
    led = BudgetLedger(2)
    led.apply(["a"], "w1")
    assert led.answer_locally(["a", "b"], "w1") is None  # a unit is left: only the log can tell
    led.apply(["b"], "w2")
    assert led.answer_locally(["a", "c", "b"], "w1") == [HELD, DENIED, FOREIGN]
    assert led.answer_locally(["a"], "w3") == [FOREIGN]  # a holder the log never named


@pytest.mark.parametrize("total", [-1, 1.5, True, "3", None])
def test_a_bad_total_is_refused_by_value(total):
    with pytest.raises(ValueError, match="ledger total must be an integer >= 0, got"):
        BudgetLedger(total)


ids = st.text(alphabet="abcdefgh", min_size=1, max_size=2)
holders = st.sampled_from(["w1", "w2", "w3"])
reservations = st.lists(st.tuples(st.lists(ids, min_size=1, max_size=6), holders), max_size=40)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, 12), log=reservations)
def test_every_reader_of_one_log_agrees_and_the_total_is_never_passed(total, log):
    """Two workers applying the same log agree on every grant; at most ``total`` distinct ids are
    ever granted; a granted id stays granted, HELD for its first holder and FOREIGN for the
    others; and the local answer, when there is one, is what the log would answer."""
    readers = [BudgetLedger(total), BudgetLedger(total)]
    first: dict[str, str] = {}
    for res, holder in log:
        local = readers[0].answer_locally(res, holder)
        got = [r.apply(res, holder) for r in readers]
        assert got[0] == got[1]
        if local is not None:
            assert local == got[0]
        for eid, g in zip(res, got[0], strict=True):
            if eid in first:  # held before: granted again, free
                assert g is (HELD if first[eid] == holder else FOREIGN)
            elif g:
                assert g is NEW
                first[eid] = holder
        assert len(first) == readers[0].granted <= total
    granted = set(first)
    # while units were left, no new id was refused
    asked = {eid for res, _ in log for eid in res}
    assert len(granted) == min(total, len(asked))
