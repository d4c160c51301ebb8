#!/usr/bin/env python3
"""pairsieve Grafana dashboards as code (plain Python, standard library only).

    python deploy/grafana/build_dashboards.py          # (re)write deploy/grafana/dashboards/*.json
    python deploy/grafana/build_dashboards.py --check  # exit 1 when the committed JSON is stale

The generated JSON is committed next to this script and provisioned by
``deploy/grafana/provisioning/dashboards/pairsieve.yml``. ``tests/deploy`` checks that the
committed files equal what this script produces, that every metric a query uses is exported by a
running service, and that every query returns data from a real Prometheus scraping one.

Every query filters on the dashboard variables ``$job`` and ``$instance`` and uses
``$__rate_interval`` for rate windows; the datasource is the ``$datasource`` variable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "dashboards"

DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
MODALITY_COMPONENTS = ("uncertainty", "diversity", "typicality", "coverage_bonus")


def sel(*matchers: str) -> str:
    """A label selector with the dashboard's job/instance filters plus ``matchers``."""
    return "{" + ", ".join(('job=~"$job"', 'instance=~"$instance"') + matchers) + "}"


S = sel()


def target(expr: str, legend: str = "", ref: str = "A", **extra) -> dict:
    t = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref}
    t.update(extra)
    return t


class Layout:
    """Assigns ids and grid positions (24 columns) in reading order."""

    def __init__(self):
        self.panels: list[dict] = []
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def _place(self, w: int, h: int) -> dict:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.panels.append({"collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                            "id": self.next_id, "panels": [], "title": title, "type": "row"})
        self.next_id += 1
        self.y += 1

    def add(self, panel: dict, w: int = 8, h: int = 8) -> None:
        panel = {"id": self.next_id, "gridPos": self._place(w, h), "datasource": DS, **panel}
        for i, t in enumerate(panel.get("targets", [])):
            t["refId"] = chr(ord("A") + i)
        self.panels.append(panel)
        self.next_id += 1


def timeseries(title: str, targets: list[dict], unit: str = "short", description: str = "",
               min_=None, max_=None, thresholds: list[tuple[float, str]] | None = None,
               stack: bool = False) -> dict:
    defaults: dict = {"unit": unit, "custom": {"drawStyle": "line", "lineWidth": 1,
                                               "fillOpacity": 10, "showPoints": "never",
                                               "spanNulls": False,
                                               "stacking": {"mode": "normal" if stack else "none",
                                                            "group": "A"}}}
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    if thresholds:
        defaults["thresholds"] = {"mode": "absolute", "steps": [{"color": "green", "value": None}]
                                  + [{"color": c, "value": v} for v, c in thresholds]}
        defaults["custom"]["thresholdsStyle"] = {"mode": "line+area"}
    return {"type": "timeseries", "title": title, "description": description,
            "targets": targets, "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom",
                                   "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, targets: list[dict], unit: str = "short", description: str = "",
         thresholds: list[tuple[float, str]] | None = None) -> dict:
    steps = [{"color": "green", "value": None}] + [{"color": c, "value": v}
                                                   for v, c in (thresholds or [])]
    return {"type": "stat", "title": title, "description": description, "targets": targets,
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute",
                                                                      "steps": steps}},
                            "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area", "textMode": "auto"}}


def heatmap(title: str, expr: str, unit: str = "short", description: str = "") -> dict:
    return {"type": "heatmap", "title": title, "description": description,
            "targets": [target(expr, "{{le}}", format="heatmap")],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"calculate": False, "cellGap": 1, "color": {"mode": "scheme",
                                                                     "scheme": "Oranges",
                                                                     "steps": 64},
                        "yAxis": {"unit": unit}, "tooltip": {"show": True, "yHistogram": True},
                        "rowsFrame": {"layout": "auto"}}}


def quantiles(metric: str, by: str = "", qs=(0.5, 0.99), *matchers: str) -> list[dict]:
    grp = "le" + (", " + by if by else "")
    suffix = " {{" + by + "}}" if by else ""
    return [target(f"histogram_quantile({q}, sum by ({grp}) "
                   f"(rate({metric}_bucket{sel(*matchers)}[{RI}])))",
                   f"p{round(q * 100):g}{suffix}")
            for q in qs]


def variables() -> dict:
    return {"list": [
        {"name": "datasource", "label": "Datasource", "type": "datasource",
         "query": "prometheus", "current": {"text": "Prometheus", "value": "prometheus"},
         "hide": 0, "refresh": 1, "regex": "", "includeAll": False, "multi": False},
        {"name": "job", "label": "Job", "type": "query", "datasource": DS,
         "query": {"query": "label_values(pairsieve_up, job)", "refId": "job"},
         "definition": "label_values(pairsieve_up, job)", "refresh": 2, "includeAll": True,
         "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
         "hide": 0, "regex": "", "sort": 1},
        {"name": "instance", "label": "Worker", "type": "query", "datasource": DS,
         "query": {"query": 'label_values(pairsieve_up{job=~"$job"}, instance)',
                   "refId": "instance"},
         "definition": 'label_values(pairsieve_up{job=~"$job"}, instance)', "refresh": 2,
         "includeAll": True, "multi": True, "allValue": ".*",
         "current": {"text": "All", "value": "$__all"}, "hide": 0, "regex": "", "sort": 1},
    ]}


def dashboard(uid: str, title: str, description: str, panels: list[dict]) -> dict:
    return {
        "uid": uid, "title": title, "description": description,
        "tags": ["pairsieve"], "timezone": "browser", "editable": True,
        "graphTooltip": 1, "refresh": "10s", "schemaVersion": 39, "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {"refresh_intervals": ["5s", "10s", "30s", "1m", "5m"]},
        "templating": variables(),
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [{"title": "pairsieve dashboards", "type": "dashboards", "tags": ["pairsieve"],
                   "asDropdown": False, "includeVars": True, "keepTime": True}],
        "panels": panels,
    }


# ============================================================================ overview
def overview() -> dict:
    L = Layout()
    accept = sel('decision="accept"')
    decided = sel('reason!="duplicate"')
    L.row("Throughput")
    L.add(timeseries("Events in, by outcome", [
        target(f"sum by (outcome) (rate(pairsieve_events_received_total{S}[{RI}]))",
               "{{outcome}}")], "ops", "Feature events received per second (Kafka and gRPC): "
              "accepted, skipped, duplicate (redelivery), dead_letter.", stack=True))
    L.add(timeseries("Alignment requests out, by modality", [
        target(f"sum by (modality) (rate(pairsieve_decisions_total{accept}[{RI}]))",
               "{{modality}}")], "ops", "Accepted items per second = alignment requests "
              "produced to pairsieve.alignment-requests.v1.", stack=True))
    L.add(timeseries("Decisions, by reason", [
        target(f"sum by (decision, reason) (rate(pairsieve_decisions_total{S}[{RI}]))",
               "{{decision}}:{{reason}}")], "ops", "Why items were accepted or skipped."))

    L.row("Acceptance and budget")
    L.add(timeseries("Acceptance rate by modality vs target", [
        target(f"sum by (modality) (rate(pairsieve_decisions_total{accept}[{RI}])) / "
               f"sum by (modality) (rate(pairsieve_decisions_total{decided}[{RI}]))",
               "{{modality}} (windowed)"),
        target(f"pairsieve_acceptance_rate{S}", "{{instance}} cumulative"),
        target(f"max(pairsieve_acceptance_rate_target{S})", "target"),
    ], "percentunit", "Accepted / decided items (duplicates excluded) against "
       "pairsieve_acceptance_rate_target.", min_=0))
    L.add(timeseries("Budget spent / remaining", [
        target(f"max by (instance) (pairsieve_budget_spent{S})", "spent {{instance}}"),
        target(f"min by (instance) (pairsieve_budget_remaining{S})", "remaining {{instance}}"),
        target(f"max(pairsieve_budget_limit{S})", "total"),
    ], "short", "Acquisitions counted against the budget (every worker counts all workers' "
       "selections). remaining/total are gaps when the budget is unlimited.", min_=0))
    L.add(timeseries("Budget spend rate", [
        target(f"sum(rate(pairsieve_decisions_total{accept}[{RI}]))", "acquisitions/s"),
        target(f"max(deriv(pairsieve_budget_spent{S}[{RI}]))", "budget spent/s (all workers)"),
    ], "ops", "Acquisitions per second: this job's accepts, and the budget gauge's slope."))
    L.add(stat("Budget remaining", [
        target(f"min(pairsieve_budget_remaining{S})", "remaining")], "short",
        "NaN = unlimited budget.", [(0, "red"), (1, "green")]), w=6, h=5)
    L.add(stat("Budget unlimited", [
        target(f"max(pairsieve_budget_unlimited{S})", "unlimited")], "bool"), w=6, h=5)
    L.add(timeseries("Utility threshold", [
        target(f"pairsieve_threshold{S}", "{{instance}}")], "short",
        "Utility an item must exceed to be accepted (gap during warm-up)."), w=12, h=5)

    L.row("Latency and batching")
    L.add(timeseries("Decision latency p50 / p99", quantiles("pairsieve_decision_latency_seconds"),
                     "s", "Event time to decision. Objective: p99 < 50 ms "
                     "(alert DecisionLatencyP99High).", min_=0, thresholds=[(0.05, "red")]))
    L.add(timeseries("Scoring time per micro-batch p50 / p99",
                     quantiles("pairsieve_scoring_duration_seconds"), "s", min_=0))
    L.add(timeseries("Micro-batch size", quantiles("pairsieve_micro_batch_size") + [
        target(f"sum(rate(pairsieve_micro_batch_size_sum{S}[{RI}])) / "
               f"sum(rate(pairsieve_micro_batch_size_count{S}[{RI}]))", "mean")],
        "short", "Events per micro-batch (bounded by PAIRSIEVE_BATCH_MAX_ITEMS).", min_=0))
    L.add(timeseries("Consumer lag", [
        target(f"sum by (topic) (pairsieve_consumer_lag{S})", "{{topic}}")], "short",
        "Messages between the committed offset and the end of the features topic.", min_=0))
    L.add(timeseries("gRPC requests, by method and code", [
        target(f"sum by (method, code) (rate(pairsieve_grpc_requests_total{S}[{RI}]))",
               "{{method}} {{code}}")], "reqps"))
    L.add(timeseries("gRPC latency p99, by method",
                     quantiles("pairsieve_grpc_request_duration_seconds", "method", (0.99,)),
                     "s", min_=0))
    L.add(timeseries("gRPC calls per engine batch", [
        target(f"sum(rate(pairsieve_grpc_submit_batch_calls_sum{S}[{RI}])) / "
               f"sum(rate(pairsieve_grpc_submit_batch_calls_count{S}[{RI}]))", "mean")],
        "short", "Concurrent Submit calls decided as one engine batch (above 1: merged; up to "
        "PAIRSIEVE_GRPC_COALESCE_MAX_ITEMS events).", min_=0))

    L.row("Caches and model")
    L.add(timeseries("Diversity cache fill, by modality", [
        target(f"pairsieve_cache_fill_ratio{S}", "{{modality}} {{instance}}")],
        "percentunit", min_=0, max_=1))
    L.add(timeseries("Cache evictions, by modality", [
        target(f"sum by (modality) (rate(pairsieve_cache_evictions_total{S}[{RI}]))",
               "{{modality}}")], "ops"))
    L.add(timeseries("Model version and retrains", [
        target(f"max by (instance) (pairsieve_model_version{S})", "version {{instance}}"),
        target(f"sum by (outcome) (increase(pairsieve_retrains_total{S}[{RI}]))",
               "retrains {{outcome}}"),
    ], "short", "Alignment model version in use, and retrains per rate interval."))
    L.add(timeseries("Retrain duration p50 / p99",
                     quantiles("pairsieve_retrain_duration_seconds"), "s", min_=0))
    L.add(timeseries("Model age", [
        target(f"time() - max by (instance) "
               f"(pairsieve_model_last_update_timestamp_seconds{S} > 0)", "{{instance}}")],
        "s", "Time since the last successful retrain (alert NoModelUpdate after 6h while "
             "labels arrive).", min_=0))
    L.add(timeseries("Labels in and pairs acquired", [
        target(f"sum by (status) (rate(pairsieve_labels_received_total{S}[{RI}]))",
               "labels/s {{status}}"),
        target(f"max by (instance) (pairsieve_pairs_acquired{S})", "pairs {{instance}}"),
    ], "short"))

    L.row("Learning loop")
    L.add(timeseries("Validation recall of the model in use", [
        target(f"max by (k) (pairsieve_model_validation_recall{S})", "R@{{k}}"),
    ], "percentunit", "R@1 / R@5 of the model in use on the held-out acquired pairs (mean of "
       "both directions), measured when its version passed the quality gate (alert "
       "ValidationRecallDropped).", min_=0, max_=1))
    L.add(timeseries("Stopping signal: expected R@1 gain of the next pairs", [
        target(f"max(pairsieve_expected_recall_gain{S})", "expected gain"),
        target(f"max(pairsieve_expected_recall_gain_pairs{S})", "next N pairs"),
    ], "short", "From the lineage's learning curve; gap until it has three points (alert "
       "AcquisitionPlateaued below 0.005).", min_=0))
    L.add(timeseries("Candidate versions, by outcome", [
        target(f"sum by (outcome) (increase(pairsieve_model_candidates_total{S}[{RI}]))",
               "{{outcome}}"),
        target(f"sum(increase(pairsieve_labels_duplicate_total{S}[{RI}]))", "duplicate labels"),
    ], "short", "published: passed the quality gate; rejected: worse than the model in use on "
       "the validation pairs; failed / superseded. Duplicate labels: re-sent answers, counted "
       "once."))
    L.add(stat("Trainers", [target(f"sum(pairsieve_trainer{S})", "trainers")], "short",
               "Workers training the shared lineage (1 expected; alert TrainerNotUnique).",
               [(0, "red"), (1, "green"), (2, "red")]), w=6, h=5)
    L.add(stat("Validation pairs", [
        target(f"max(pairsieve_model_validation_pairs{S})", "validation pairs")], "short",
        "Held-out acquired pairs the model in use was measured on."), w=6, h=5)

    L.row("Dead letters")
    L.add(timeseries("Dead letters, by reason", [
        target(f"sum by (reason) (rate(pairsieve_dead_letters_total{S}[{RI}]))", "{{reason}}")],
        "ops", "Events sent to pairsieve.dead-letter.v1.", stack=True), w=12)
    L.add(timeseries("Dead-letter ratio", [
        target(f"sum(rate(pairsieve_dead_letters_total{S}[{RI}])) / "
               f"sum(rate(pairsieve_events_received_total{S}[{RI}]))", "dead letters / events")],
        "percentunit", "Alert DeadLetterRateHigh above 1%.", min_=0,
        thresholds=[(0.01, "red")]), w=12)

    L.row("Modalities")
    L.add(timeseries("Coverage: accepted items, by modality", [
        target(f"sum by (modality) (pairsieve_decisions_total{accept})", "{{modality}}")],
        "short", "Cumulative accepts per modality (this job's workers)."))
    L.add(timeseries("Share of accepts, by modality", [
        target(f"pairsieve_modality_share{S}", "{{modality}} {{instance}}")],
        "percentunit", min_=0, max_=1, stack=False))
    L.add(timeseries("Modality imbalance", [
        target(f"pairsieve_modality_imbalance{S}", "{{instance}}")], "percentunit",
        "Largest minus smallest share (alert ModalityStarved above 0.8 for 30m).",
        min_=0, max_=1, thresholds=[(0.8, "red")]))

    L.row("Runtime")
    L.add(stat("Workers serving", [target(f"sum(pairsieve_up{S})", "serving"),
                                   target(f"count(up{S})", "scraped")]), w=6, h=5)
    L.add(stat("Scorer GPU fallback", [
        target(f"max(pairsieve_scorer_gpu_fallback{S})", "fallback")], "bool",
        thresholds=[(1, "red")]), w=6, h=5)
    L.add(stat("Scorer device", [
        target(f"count by (device) (pairsieve_scorer_device_info{S} == 1)", "{{device}}")],
        "short"), w=6, h=5)
    L.add(stat("Version", [
        target(f"count by (version) (pairsieve_build_info{S})", "{{version}}")], "short"),
        w=6, h=5)
    return dashboard("pairsieve-overview", "pairsieve / Overview",
                     "Throughput, acceptance vs target, budget, latency, batching, caches, "
                     "model, dead letters and modality coverage of the pairsieve workers.",
                     L.panels)


# =================================================================== selection quality
def selection_quality() -> dict:
    L = Layout()
    L.row("Utility")
    L.add(heatmap("Utility distribution", f"sum by (le) (increase(pairsieve_utility_bucket{S}"
                                          f"[{RI}]))", "short",
                  "Utility of decided items (the score compared with the threshold)."), w=12)
    L.add(timeseries("Utility quantiles by modality vs threshold",
                     quantiles("pairsieve_utility", "modality", (0.1, 0.5, 0.9))
                     + [target(f"avg(pairsieve_threshold{S})", "threshold")], "short"), w=12)
    for comp in MODALITY_COMPONENTS:
        c = f'component="{comp}"'
        L.row(f"Score component: {comp}")
        L.add(heatmap(f"{comp} distribution",
                      f"sum by (le) (increase(pairsieve_score_bucket{sel(c)}[{RI}]))", "short"),
              w=12)
        L.add(timeseries(f"{comp} quantiles by modality",
                         quantiles("pairsieve_score", "modality", (0.1, 0.5, 0.9), c), "short"),
              w=12)
    L.row("Components compared")
    L.add(timeseries("Mean score by component and modality", [
        target(f"sum by (component, modality) (rate(pairsieve_score_sum{S}[{RI}])) / "
               f"sum by (component, modality) (rate(pairsieve_score_count{S}[{RI}]))",
               "{{component}} {{modality}}")], "short"), w=12)
    # no mean utility: pairsieve_utility has negative buckets, so prometheus_client exports no
    # pairsieve_utility_sum (see the quantiles panel above for its centre)
    L.add(timeseries("Scored items by modality", [
        target(f"sum by (modality) (rate(pairsieve_utility_count{S}[{RI}]))", "{{modality}}")],
        "ops", "Items with a finite utility per second (the utility histogram's count)."),
        w=12)
    L.row("Modality balance")
    L.add(timeseries("Modality imbalance over time", [
        target(f"pairsieve_modality_imbalance{S}", "{{instance}}")], "percentunit",
        "0 = balanced, 1 = one modality only (alert ModalityStarved).", min_=0, max_=1,
        thresholds=[(0.8, "red")]), w=12)
    L.add(timeseries("Share of accepts by modality", [
        target(f"pairsieve_modality_share{S}", "{{modality}} {{instance}}")], "percentunit",
        min_=0, max_=1), w=12)
    return dashboard("pairsieve-selection-quality", "pairsieve / Selection quality",
                     "Distributions of the utility and of each score component "
                     "(uncertainty, diversity, coverage bonus) by modality, and modality "
                     "balance over time.", L.panels)


DASHBOARDS = {"pairsieve-overview.json": overview, "pairsieve-selection-quality.json":
              selection_quality}


def render(dash: dict) -> str:
    return json.dumps(dash, indent=2, sort_keys=True) + "\n"


def build() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: render(fn()) for name, fn in DASHBOARDS.items()}


def panel_queries(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of ``dash`` (rows included, nested or not)."""
    out = []
    stack = list(dash.get("panels", []))
    while stack:
        p = stack.pop(0)
        stack.extend(p.get("panels", []))
        out.extend((p.get("title", ""), t["expr"]) for t in p.get("targets", []) if "expr" in t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is stale")
    ap.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    stale = []
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in build().items():
        path = args.out_dir / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale (run python deploy/grafana/build_dashboards.py): " + ", ".join(stale),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
