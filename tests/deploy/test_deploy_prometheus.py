"""Static checks of deploy/prometheus: promtool accepts the config and the rules, the rule unit
tests pass, and every alert has a firing and a non-firing unit-test case."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

PROM_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
CONFIG = PROM_DIR / "prometheus.yml"
README = PROM_DIR.parent / "README.md"


def _run(*cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=PROM_DIR)


def _alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_check_config(promtool):
    res = _run(promtool, "check", "config", str(CONFIG))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_rules(promtool):
    res = _run(promtool, "check", "rules", str(ALERTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in res.stdout + res.stderr


def test_promtool_test_rules(promtool):
    res = _run(promtool, "test", "rules", str(ALERTS_TEST))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr


def test_every_alert_has_firing_and_silent_cases():
    names = [r["alert"] for r in _alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    cases = [c for t in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
             for c in t.get("alert_rule_test", [])]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert not set(names) - firing, f"alerts without a firing case: {sorted(set(names) - firing)}"
    assert not set(names) - silent, f"alerts without a silent case: {sorted(set(names) - silent)}"
    assert not (firing | silent) - set(names), "test cases for alerts that do not exist"


def test_every_alert_is_labelled_annotated_and_has_a_runbook():
    readme = README.read_text()
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", readme, flags=re.M)}
    for rule in _alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        ann = rule["annotations"]
        assert ann.get("summary") and ann.get("description"), name
        url = ann["runbook_url"]
        assert url == f"deploy/README.md#{name.lower()}", (name, url)
        assert name.lower() in anchors, f"deploy/README.md has no section for {name}"


def test_budget_rules_cannot_fire_on_an_unlimited_budget():
    """Unlimited budget = NaN gauges + pairsieve_budget_unlimited 1: the budget rules must
    require a limited budget explicitly (the unit tests also run an unlimited-only case)."""
    for rule in _alert_rules():
        if "pairsieve_budget_remaining" in rule["expr"] and rule["alert"].startswith("Budget"):
            assert "pairsieve_budget_unlimited == 0" in rule["expr"], rule["alert"]
