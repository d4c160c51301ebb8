"""The core's value types: the selector's batch constructor of decisions."""

import dataclasses

import pytest

from service.core.types import DECISION_FIELDS, Decision, decisions_from_columns


def _row(i: int) -> dict:
    return dict(item_id=f"e{i}", modality="image" if i % 2 else "text", accept=i == 1,
                utility=0.5 + i, uncertainty=0.1 * i, diversity=1.0 - 0.1 * i,
                coverage_bonus=-0.25, margin=0.2, entropy=1.5, least_confidence=0.3,
                threshold=0.75, model_version=3, reason="accept:utility" if i == 1
                else "skip:below_threshold", typicality=0.4, partnerless=0.0, cost=float(i))


def test_decisions_from_columns_equal_the_generated_constructor_and_stay_frozen():
    rows = [_row(i) for i in range(3)]
    got = decisions_from_columns({f: [r[f] for r in rows] for f in DECISION_FIELDS})
    assert got == [Decision(**r) for r in rows]
    assert [type(d) for d in got] == [Decision] * 3
    assert [dataclasses.asdict(d) for d in got] == rows
    with pytest.raises(dataclasses.FrozenInstanceError):
        got[0].accept = True  # type: ignore[misc]
    assert dataclasses.replace(got[1], accept=False).accept is False
    assert decisions_from_columns({f: [] for f in DECISION_FIELDS}) == []


def test_decisions_from_columns_refuses_missing_or_uneven_columns_by_name():
    cols = {f: [_row(0)[f]] for f in DECISION_FIELDS}
    with pytest.raises(ValueError, match="'cost'"):
        decisions_from_columns({k: v for k, v in cols.items() if k != "cost"})
    with pytest.raises(ValueError, match="'extra'"):
        decisions_from_columns({**cols, "extra": [1]})
    with pytest.raises(ValueError, match="utility=2"):
        decisions_from_columns({**cols, "utility": [0.1, 0.2]})
