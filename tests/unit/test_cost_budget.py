"""Budgets in cost units: the ledger, and a selector that stops at its cost."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from service.core.budget import BudgetConfig
from service.core.cost_budget import CostLedger
from service.core.selector import SelectorConfig, StreamingSelector
from service.core.types import FeatureItem
from tests.support import data_and_model


def test_expected_cost_is_the_mean_of_the_answers_shrunk_to_the_prior():
    led = CostLedger(10.0, ("image", "text"), prior_cost=1.0, prior_weight=1.0)
    assert led.expected("image") == 1.0
    led.observe("image", 5.0)
    led.observe("image", 3.0)
    assert led.expected("image") == pytest.approx(3.0)  # (1 + 5 + 3) / 3
    assert led.expected("text") == 1.0
    assert led.affordable("image") and not led.affordable("image", pending=7.5)
    led.spend(9.5)
    assert led.remaining == pytest.approx(0.5) and led.affordable("text", 0.0) is False
    # a modality twice the mean cost needs twice the utility; negatives get worse, not better
    np.testing.assert_allclose(led.per_cost("image", np.array([0.6, -0.2])), [0.4, -0.3])
    np.testing.assert_allclose(led.per_cost("text", np.array([0.6])), [1.2])
    assert CostLedger(None, ("a", "b")).affordable("a", 1e9)  # unlimited


@pytest.mark.parametrize(("kw", "msg"), [
    ({"total": -1.0}, "cost budget total must be >= 0"),
    ({"total": float("nan")}, "cost budget total must be >= 0"),
    ({"total": 1.0, "prior_cost": 0.0}, "prior cost must be > 0"),
    ({"total": 1.0, "prior_weight": -1.0}, "prior weight must be >= 0"),
])
def test_ledger_refuses_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        CostLedger(modalities=("a", "b"), **kw)
    led = CostLedger(1.0, ("a", "b"))
    with pytest.raises(ValueError, match="cost must be a finite number >= 0, got -2"):
        led.observe("a", -2)


def _selector(rate=1.0, **kw):
    _, _, model = data_and_model()
    cfg = SelectorConfig(index_size=64, cache_capacity=64,
                         budget=BudgetConfig(total=None, target_rate=rate, warmup_accepts=0,
                                             explore=0.0, min_history=8, window=64), **kw)
    return StreamingSelector(copy.deepcopy(model), cfg, seed=0, device="cpu")


def _items(lo, hi):
    a, b, _ = data_and_model()
    return [FeatureItem(f"i{k}", "image", a[k]) if k % 2 == 0
            else FeatureItem(f"t{k}", "text", b[k]) for k in range(lo, hi)]


def test_a_cost_budget_stops_at_its_cost_with_the_expected_costs_of_the_modalities():
    sel = _selector(budget_unit="cost", cost_total=12.0)
    sel.observe_cost("image", 5.0)  # image answers are expensive: expected (1 + 5) / 2 = 3
    spent = 0.0
    for lo in range(0, 200, 20):
        p = sel.propose(_items(lo, lo + 20))
        sel.commit(p)
        for d in p.decisions:
            if d.accept:
                assert d.cost == (3.0 if d.modality == "image" else 1.0)
                spent += d.cost
            else:
                assert d.cost == 0.0
    st = sel.status()
    assert st["cost_spent"] == pytest.approx(spent) and spent <= 12.0
    assert spent > 12.0 - 3.0  # it stops only when nothing more fits
    last = sel.propose(_items(200, 220)).decisions
    assert all(not d.accept for d in last)
    assert {d.reason for d in last} == {"skip:budget_exhausted"}
    assert st["budget_unit"] == "cost" and st["expected_cost"] == {"image": 3.0, "text": 1.0}


def test_measured_costs_steer_acceptance_towards_the_cheaper_modality():
    def share_of_images(costly_images: bool) -> float:
        sel = _selector(0.3, budget_unit="cost", cost_total=None)
        if costly_images:
            for _ in range(20):
                sel.observe_cost("image", 10.0)
        acc = []
        for lo in range(0, 300, 20):
            p = sel.propose(_items(lo, lo + 20))
            sel.commit(p)
            acc += [d.modality for d in p.decisions if d.accept]
        return acc.count("image") / max(1, len(acc))

    # at rate 0.3 the threshold picks by utility per unit of cost: images at 10x the text's
    # expected cost (mean ~9.6 vs 1) need ~1.8x the utility of the mean, texts ~0.2x
    costly, equal = share_of_images(True), share_of_images(False)
    assert costly < 0.25 < equal, (costly, equal)


def test_budget_unit_is_checked():
    with pytest.raises(ValueError, match="budget_unit must be 'items' or 'cost', got 'euros'"):
        SelectorConfig(budget_unit="euros")
    with pytest.raises(ValueError, match="set budget_unit='cost'"):
        SelectorConfig(cost_total=5.0)


def test_a_cost_budget_has_its_random_tail_from_its_share_of_the_cost():
    """``random_after`` applies to a cost budget too: the selector's ledger says when that share
    of ``cost_total`` is spent (this batch's accepts included), and from there on every
    decision is the random tail's. Without the share, none is."""
    def run(random_after):
        _, _, model = data_and_model()
        cfg = SelectorConfig(index_size=64, cache_capacity=64, budget_unit="cost",
                             cost_total=40.0,
                             budget=BudgetConfig(total=None, target_rate=0.3, warmup_accepts=0,
                                                 explore=0.0, min_history=8, window=64,
                                                 random_after=random_after))
        sel = StreamingSelector(copy.deepcopy(model), cfg, seed=0, device="cpu")
        sel.observe_cost("image", 3.0)  # expected image cost (1 + 3) / 2 = 2, text 1
        out = []  # (cost spent before the decision, reason)
        for lo in range(0, 400, 20):
            p = sel.propose(_items(lo, lo + 20))
            spent = sel.costs.spent
            for d in p.decisions:
                out.append((spent, d.reason.code))
                spent += d.cost
            sel.commit(p)
        return out, sel.costs.spent

    tailed, spent = run(0.5)
    assert spent <= 40.0
    before = {code for s, code in tailed if s < 20.0}
    after = {code for s, code in tailed if s >= 20.0}
    assert "random_tail" not in before and "utility" in before
    assert "random_tail" in after and after <= {"random_tail", "pacing", "budget_exhausted"}
    plain, _ = run(None)
    assert "random_tail" not in {code for _, code in plain}
    first = next(i for i, (_, code) in enumerate(tailed) if code == "random_tail")
    assert first > 20 and plain[:first] == tailed[:first]  # the same until the tail begins
