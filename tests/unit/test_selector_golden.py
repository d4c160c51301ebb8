"""The selector's decisions, bit for bit, on fixed streams: a guard for speed work.

Optimisations of the engine (issue 16) must not change a single decision. Each case streams 600
items of the shared test data in micro-batches of 64 (with evictions: capacity 48) through one
configuration and records every decision: the accept flags, reasons and costs must equal those
stored in ``tests/data/selector_golden.json`` exactly (one digest), and utility, threshold and
diversity to 1e-6 relative (written with 10 significant digits: BLAS kernels may round the last
bits differently on another CPU). The file was written by the code before the optimisations.

An intended change of the decisions (a new default, a fixed rule) regenerates the file::

    .venv/bin/python -m tests.unit.test_selector_golden --write

and says so in its commit.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from service.core.acquisition import AcquisitionConfig
from service.core.budget import BudgetConfig
from service.core.selector import SelectorConfig, StreamingSelector
from service.core.types import FeatureItem
from tests.support import data_and_model

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "selector_golden.json"

CASES = {
    "default": {},
    "zscore": {"acquisition": AcquisitionConfig(normalization="zscore")},
    "uncertainty": {"acquisition": AcquisitionConfig(uncertainty_weight=0.5)},
    "quotas": {"acquisition": AcquisitionConfig(quotas=True, quota_tolerance=0.2)},
    "no-cross-insert+no-decay": {"cross_insert": False, "cache_half_life": None},
    "cost-budget": {"budget_unit": "cost", "cost_total": 40.0},
    "partnerless": {"partnerless_weight": 0.5, "partnerless_radius": 0.2},
}


def _stream_record(kw: dict) -> dict:
    a, b, model = data_and_model()
    cfg = SelectorConfig(index_size=64, cache_capacity=48,
                         budget=BudgetConfig(total=None, target_rate=0.25, warmup_accepts=4,
                                             explore=0.05, min_history=8, window=64), **kw)
    sel = StreamingSelector(copy.deepcopy(model), cfg, seed=3, device="cpu")
    if kw.get("budget_unit") == "cost":
        sel.observe_cost("image", 3.0)
    if "partnerless_weight" in kw:
        sel.mark_partnerless("image", a[5])
        sel.mark_partnerless("text", b[7])
    rng = np.random.default_rng(11)
    order = rng.permutation(2 * len(a))[:600]
    items = [FeatureItem(f"i{k}", "image", a[k // 2]) if k % 2 == 0
             else FeatureItem(f"t{k}", "text", b[k // 2]) for k in order]
    h = hashlib.sha256()
    floats: dict[str, list[float]] = {"utility": [], "threshold": [], "diversity": []}
    accepted = 0
    for lo in range(0, len(items), 64):
        p = sel.propose(items[lo:lo + 64])
        sel.commit(p)
        for d in p.decisions:
            accepted += d.accept
            h.update(f"{d.item_id}|{d.accept}|{d.reason}|{d.cost!r}\n".encode())
            for name, v in floats.items():
                v.append(float(f"{getattr(d, name):.10g}"))
    return {"accepted": accepted, "digest": h.hexdigest(), **floats}


@pytest.mark.parametrize("case", sorted(CASES))
def test_decisions_are_identical_to_the_stored_ones(case):
    stored = json.loads(GOLDEN.read_text())[case]
    got = _stream_record(CASES[case])
    assert got["accepted"] == stored["accepted"] and 0 < got["accepted"] < 600
    assert got["digest"] == stored["digest"], f"{case}: accept flags, reasons or costs changed"
    for name in ("utility", "threshold", "diversity"):
        np.testing.assert_allclose(got[name], stored[name], rtol=1e-6, atol=1e-9,
                                   err_msg=f"{case}: {name}")


if __name__ == "__main__":
    if "--write" not in sys.argv:
        raise SystemExit("usage: python -m tests.unit.test_selector_golden --write")
    out = {name: _stream_record(kw) for name, kw in sorted(CASES.items())}
    for name, rec in out.items():
        print(name, rec["accepted"], rec["digest"][:16])
    GOLDEN.write_text(json.dumps(out, separators=(",", ":")) + "\n")
