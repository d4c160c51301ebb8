"""ThrottledWarnings: one full line per kind and interval, the rest counted and reported."""

from __future__ import annotations

import logging

import pytest

from service.observability.log_throttle import ThrottledWarnings


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def setup(caplog):
    caplog.set_level(logging.WARNING, logger="throttle-test")
    clock = Clock()
    return ThrottledWarnings(logging.getLogger("throttle-test"), 10.0, clock=clock), clock, caplog


def test_the_first_of_each_kind_is_logged_in_full_and_the_rest_counted(setup):
    w, clock, caplog = setup
    assert w.warn("oversized", "record 1 is 70000 bytes") is True
    assert w.warn("undecodable", "record 2 is garbage") is True  # another kind: its own window
    for i in range(500):
        clock.t += 0.01
        assert w.warn("oversized", f"record {i + 3}") is False
    assert [r.getMessage() for r in caplog.records] == ["record 1 is 70000 bytes",
                                                        "record 2 is garbage"]
    clock.t = 110.5
    assert w.warn("oversized", "record 999") is True
    last = caplog.records[-1].getMessage()
    assert last.startswith("record 999 (and 500 more of this kind in the last 10 s")
    assert w.warn("oversized", "record 1000") is False  # a new window started at 110.5


def test_flush_reports_what_is_still_held_back_once(setup):
    w, clock, caplog = setup
    w.warn("zero_vector", "a")
    w.warn("zero_vector", "b")
    w.warn("zero_vector", "c")
    w.flush()
    assert caplog.records[-1].getMessage() == ("2 more warnings of kind zero_vector not logged "
                                               "one by one; the last: c")
    n = len(caplog.records)
    w.flush()
    assert len(caplog.records) == n


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_a_non_positive_interval_is_refused_by_value(bad):
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        ThrottledWarnings(logging.getLogger("x"), bad)
