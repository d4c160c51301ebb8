"""One decision rule, one list of reason codes.

The budget's rule has one implementation (``BudgetDraft.decide_run``; ``decide`` is a run of one
item) and its reason codes one definition (:class:`service.core.reasons.Reason`), from which the
metric label values, the wire codec and the docs derive.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from service.core.budget import BudgetConfig, BudgetController
from service.core.reasons import Reason, label_values, parse
from service.core.types import Decision
from service.handlers import Outcome
from service.observability.metrics import DECISION_REASONS, PairsieveMetrics
from service.wire import codecs

ROOT = Path(__file__).resolve().parents[2]


def _decision(reason, accept):
    return Decision(item_id="i", modality="image", accept=accept, utility=0.1, uncertainty=0.2,
                    diversity=0.3, coverage_bonus=0.0, margin=0.1, entropy=0.2,
                    least_confidence=0.3, threshold=0.0, model_version=1, reason=reason)


def test_metric_label_set_equals_the_reason_enum():
    labels = {f"{d}:{code}" for d, codes in DECISION_REASONS.items() for code in codes}
    assert labels == {r.value for r in Reason}
    assert DECISION_REASONS == label_values()
    assert set(DECISION_REASONS) == {"accept", "skip"}


def test_every_reason_is_counted_under_its_own_labels():
    reg = CollectorRegistry()
    m = PairsieveMetrics(reg, modalities=["image", "text"])
    m.batch_decided([Outcome(f"e{i}", _decision(r, r.accept)) for i, r in enumerate(Reason)],
                    [], 0.001)
    got = {(s.labels["decision"], s.labels["reason"])
           for fam in reg.collect() if fam.name == "pairsieve_decisions"
           for s in fam.samples if s.name.endswith("_total") and s.value}
    assert got == {(r.decision, r.code) for r in Reason}


def test_reason_travels_on_the_wire_and_comes_back_as_the_enum():
    for r in Reason:
        msg = codecs.decision_to_proto(Outcome("e", _decision(r, r.accept)))
        assert msg.reason == r.value
        back = codecs.decision_from_proto(msg).decision.reason
        assert back is r
    assert parse("accept:from-a-newer-peer") == "accept:from-a-newer-peer"


def test_docs_list_exactly_the_reason_codes():
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines()
               if line.startswith("| `pairsieve_decisions_total`"))
    for d, codes in label_values().items():
        listed = re.search(rf"{d}: ([a-z_, ]+)", row).group(1)
        assert [c.strip() for c in listed.split(",")] == list(codes), row
    proto = (ROOT / "protos/pairsieve/v1/pairsieve.proto").read_text()
    line = next(ln for ln in proto.splitlines() if "string reason = 9;" in ln)
    for d, codes in label_values().items():
        assert f"{d}:" + "|".join(codes) in line, line


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10_000), total=st.one_of(st.none(), st.integers(0, 20)),
       rate=st.floats(0.01, 1.0), explore=st.floats(0.0, 1.0), warm=st.integers(0, 6),
       slack=st.floats(0.0, 10.0), min_history=st.integers(1, 8),
       batches=st.lists(st.lists(st.floats(-5, 5), min_size=1, max_size=25),
                        min_size=1, max_size=8),
       tail=st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_scalar_and_vectorised_entry_points_cannot_disagree(seed, total, rate, explore, warm,
                                                            slack, min_history, batches, tail):
    cfg = BudgetConfig(total=total, target_rate=rate, explore=explore, warmup_accepts=warm,
                       min_history=min_history, window=16, slack=slack, random_after=tail)
    scalar, vector = BudgetController(cfg, seed=seed), BudgetController(cfg, seed=seed)
    for util in batches:
        util = np.asarray(util)
        ds = scalar.begin(len(util))
        one = [ds.decide(float(u)) for u in util]
        dv = vector.begin(len(util))
        run, i = [], 0
        while i < len(util):
            k, acc, thr, why = dv.decide_run(util[i:])
            run += [(bool(j == k - 1 and acc), t, r)
                    for j, (t, r) in enumerate(zip(thr.tolist(), why, strict=True))]
            i += k
        assert repr([(d.accept, d.threshold, d.reason) for d in one]) == repr(run)
        assert all(isinstance(d.reason, Reason) for d in one)
        assert (ds.spent, ds.seen, ds.accepted, ds.utilities) == \
            (dv.spent, dv.seen, dv.accepted, dv.utilities)
        scalar.commit(ds)
        vector.commit(dv)
    assert (scalar.spent, scalar.seen, scalar.threshold()) == \
        (vector.spent, vector.seen, vector.threshold()) or np.isnan(scalar.threshold())
