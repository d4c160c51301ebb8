"""The transport-neutral messages: EngineStatus is typed and frozen; the codecs do not need the
facade."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from service.messages import LABEL_STATUSES, EngineStatus

FIELDS = ("worker_id", "spent", "remaining", "budget_total", "seen", "acceptance_rate",
          "target_rate", "threshold", "model_version", "pairs_acquired", "accepted_per_modality",
          "seen_per_modality", "cache_fill", "cache_evictions", "labels", "dims",
          "validation_recall", "validation_pairs", "trainer", "expected_gain", "expected_gain_se",
          "expected_gain_pairs", "budget_unit", "cost_spent", "cost_total", "expected_cost")


def _selector_status(**over):
    st = {"spent": 3, "remaining": 7, "seen": 20, "acceptance_rate": 0.15, "threshold": 0.4,
          "accepted_per_modality": {"image": 2, "text": 1},
          "seen_per_modality": {"image": 10, "text": 10}, "model_version": 4,
          "cache_fill": {"image": 0.25, "text": 0.125}, "cache_evictions": {"image": 0, "text": 1}}
    st.update(over)
    return st


def _status(**over):
    return EngineStatus.from_selector(_selector_status(**over), worker_id="w-1", pairs_acquired=2,
                                      budget_total=10, target_rate=0.1,
                                      labels={"MATCH": 2, "NO_MATCH": 0, "UNSURE": 1},
                                      dims={"image": 12, "text": 8})


def test_fields_are_the_documented_ones():
    assert tuple(f.name for f in dataclasses.fields(EngineStatus)) == FIELDS


def test_from_selector_fills_every_field():
    st = _status()
    assert (st.worker_id, st.spent, st.remaining, st.budget_total, st.seen) == ("w-1", 3, 7, 10, 20)
    assert (st.acceptance_rate, st.target_rate, st.threshold) == (0.15, 0.1, 0.4)
    assert (st.model_version, st.pairs_acquired) == (4, 2)
    assert st.accepted_per_modality == {"image": 2, "text": 1}
    assert st.seen_per_modality == {"image": 10, "text": 10}
    assert st.cache_fill == {"image": 0.25, "text": 0.125}
    assert st.cache_evictions == {"image": 0, "text": 1}
    assert st.labels == {"MATCH": 2, "NO_MATCH": 0, "UNSURE": 1}
    assert st.dims == {"image": 12, "text": 8}
    # the learning loop's fields default to "nothing measured yet", this worker trains
    assert (st.validation_recall, st.validation_pairs, st.trainer) == ({}, 0, True)
    assert math.isnan(st.expected_gain) and st.expected_gain_pairs == 0


def test_is_frozen_including_its_mappings():
    st = _status()
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.spent = 99
    with pytest.raises(TypeError):
        st.cache_fill["image"] = 1.0
    with pytest.raises(TypeError):
        st.labels["MATCH"] += 1


def test_copies_its_inputs():
    accepts = {"image": 2, "text": 1}
    st = EngineStatus(**{**_status().as_dict(), "accepted_per_modality": accepts})
    accepts["image"] = 50
    assert st.accepted_per_modality["image"] == 2


def test_renamed_selector_key_fails_loudly_naming_it():
    sel = _selector_status()
    del sel["spent"]
    with pytest.raises(KeyError, match="'spent'"):
        EngineStatus.from_selector(sel, worker_id="w", pairs_acquired=0, budget_total=None,
                                   target_rate=0.1, labels={}, dims={})


def test_mapping_fields_reject_non_mappings_echoing_the_value():
    with pytest.raises(TypeError, match=r"cache_fill must be a mapping, got \[0\.5\]"):
        EngineStatus(**{**_status().as_dict(), "cache_fill": [0.5]})


def test_as_dict_is_plain_json_data_and_replace_works():
    st = _status(remaining=None, threshold=math.nan)
    d = st.as_dict()
    assert tuple(d) == FIELDS and d["remaining"] is None
    assert all(type(d[k]) is dict for k in ("cache_fill", "labels", "dims"))
    json.dumps({k: v for k, v in d.items() if k != "threshold"})
    again = dataclasses.replace(st, spent=4)
    assert again.spent == 4 and st.spent == 3 and again.labels == st.labels


def test_label_statuses():
    assert LABEL_STATUSES == ("MATCH", "NO_MATCH", "UNSURE")


def test_codecs_do_not_import_the_facade():
    code = ("import sys, service.wire.codecs, service.messages; "
            "print('service.handlers' in sys.modules, 'service.learning_loop' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out
