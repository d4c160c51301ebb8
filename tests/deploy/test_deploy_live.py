"""The dashboards and alerts against a RUNNING pairsieve and a real Prometheus server.

One module-scoped stack: the service in-process on the session's tansu broker (its own event
loop in a thread), a small load for ~10 s (gRPC-less handler submits, Kafka feature batches, a
malformed record -> dead letter, labels -> retrain, one gRPC call), and a ``prometheus`` server
scraping it every second with deploy/prometheus/alerts.yml loaded. Then:

* every metric name used by a dashboard query or an alert expression is exported by the service;
* every dashboard panel query returns data through Prometheus' HTTP API;
* a PNG of key panels is rendered from ``/api/v1/query_range`` (written to tmp; set
  ``PAIRSIEVE_OVERVIEW_PNG=deploy/grafana/overview-live.png`` to refresh the committed one).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.messages import IncomingEvent, Label
from service.runtime import start_service
from service.settings import Settings
from service.streaming.topics import FEATURES_TOPIC
from service.wire import codecs

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
DIMS = {"image": 12, "text": 8}
METRIC_RE = re.compile(r"\bpairsieve_[a-z0-9_]+")


def _builder():
    spec = importlib.util.spec_from_file_location("pairsieve_build_dashboards_live",
                                                  GRAFANA / "build_dashboards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) of every committed dashboard query."""
    b = _builder()
    out = []
    for name in b.DASHBOARDS:
        dash = json.loads((GRAFANA / "dashboards" / name).read_text())
        out += [(name, title, expr) for title, expr in b.panel_queries(dash)]
    return out


def alert_exprs() -> list[tuple[str, str]]:
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"] if "alert" in r]


def concrete(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in for the test."""
    return (expr.replace("$__rate_interval", "1m").replace("$job", ".*")
            .replace("$instance", ".*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def prom_query(base: str, expr: str, **params) -> dict:
    q = urllib.parse.urlencode({"query": expr, **params})
    path = "query_range" if "step" in params else "query"
    doc = _get_json(f"{base}/api/v1/{path}?{q}")
    assert doc["status"] == "success", (expr, doc)
    return doc["data"]


def _events(n: int, rng, prefix: str) -> list[IncomingEvent]:
    out = []
    for i in range(n):
        m = "image" if i % 2 == 0 else "text"
        out.append(IncomingEvent(f"{prefix}-{i}", f"{prefix}-item{i}", m,
                                 rng.normal(size=DIMS[m]).astype(np.float32),
                                 time.time() - rng.uniform(0.0, 0.03)))
    return out


class _Loop:
    """An asyncio loop in a daemon thread (the service lives there while the test drives it)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def _drive_load(loop: _Loop, svc, settings: Settings, rounds: int = 10) -> None:
    """~``rounds`` seconds of mixed traffic through every path the dashboards look at."""
    import grpc
    from kafka import KafkaProducer

    from service.wire.gen.pairsieve.v1 import pairsieve_pb2 as pb
    from service.wire.gen.pairsieve.v1 import pairsieve_pb2_grpc as pb_grpc

    rng = np.random.default_rng(0)
    producer = KafkaProducer(bootstrap_servers=svc.bootstrap, acks="all")
    channel = grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}")
    stub = pb_grpc.SelectorStub(channel)
    topic = settings.topic(FEATURES_TOPIC)
    submitted: list[IncomingEvent] = []
    try:
        for r in range(rounds):
            t0 = time.time()
            evs = _events(24, rng, f"h{r}")
            loop.run(svc.handler.submit(evs))
            submitted += evs
            # Kafka path: a feature batch (consumer lag, micro-batches) + one malformed record
            kafka_evs = _events(12, rng, f"k{r}")
            producer.send(topic, codecs.encode_feature_batch(kafka_evs), key=b"b",
                          headers=[codecs.FEATURE_HEADER_BATCH])
            producer.send(topic, b"\xff\x00 not a protobuf", key=b"x")
            producer.flush()
            if r == 0:  # a redelivery: answered as duplicates
                loop.run(svc.handler.submit(evs[:4]))
            if r in (2, 5):  # MATCH labels for image items -> training pairs -> retrain
                labels = [Label(item_id=e.item_id, modality="image",
                                partner_item_id=f"partner-{e.item_id}", status="MATCH",
                                partner_vector=rng.normal(size=DIMS["text"]).astype(np.float32))
                          for e in submitted if e.modality == "image"][-10:]
                labels.append(Label(item_id=submitted[1].item_id, modality="text",
                                    partner_item_id="p-none", status="NO_MATCH"))
                loop.run(svc.handler.report_alignment(labels))
            stub.GetStatus(pb.GetStatusRequest(), timeout=5.0)
            time.sleep(max(0.0, 1.0 - (time.time() - t0)))
        loop.run(svc.handler.wait_for_training())
    finally:
        channel.close()
        producer.close(timeout=5)


@pytest.fixture(scope="module")
def live_stack(tansu_broker, prometheus_bin, tmp_path_factory):
    """(service, prometheus base URL, metrics text) after ~10 s of load; always torn down."""
    import torch

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("deploy-live")
    settings = Settings.from_env(
        {}, kafka_bootstrap=tansu_broker.bootstrap, topic_suffix=f".{uuid.uuid4().hex[:8]}",
        modalities="image:12,text:8", grpc_port=0, metrics_port=0, grpc_host="127.0.0.1",
        metrics_host="127.0.0.1", embedding_dim=8, warmup_accepts=5, target_rate=0.3,
        explore_fraction=0.05, budget_total=1000, index_size=64, cache_capacity=16,
        retrain_every_pairs=6, batch_max_items=16, max_wait_seconds=0.05,
        group_id=f"g-{uuid.uuid4().hex[:6]}", worker_id="w-deploy", shutdown_grace_seconds=5.0)
    loop = _Loop()
    svc = prom = None
    try:
        svc = loop.run(start_service(settings), timeout=120)
        port = _free_port()
        config = tmp / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROM_DIR / "alerts.yml")],
            "scrape_configs": [{"job_name": "pairsieve", "scrape_interval": "1s",
                                "scrape_timeout": "1s",
                                "static_configs": [{"targets": [
                                    f"127.0.0.1:{svc.metrics_port}"]}]}]}))
        log = open(tmp / "prometheus.log", "w")
        prom = subprocess.Popen(
            [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            assert prom.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                if prom_query(base, 'up{job="pairsieve"} == 1')["result"]:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "prometheus never scraped the service"
            time.sleep(0.3)
        _drive_load(loop, svc, settings)
        time.sleep(3.0)  # a few more scrapes after the last batch
        with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics",
                                    timeout=10) as r:
            metrics_text = r.read().decode()
        yield svc, base, metrics_text, tmp
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(15)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait(5)
        if svc is not None:
            loop.run(svc.shutdown(), timeout=60)
        loop.close()


def exported_names(metrics_text: str) -> set[str]:
    """Sample names of the scrape (``..._total``, ``..._bucket``, ``..._count``...), plus the
    family names of gauges and untyped metrics (which are their sample names)."""
    names = set()
    for fam in text_string_to_metric_families(metrics_text):
        names.update(s.name for s in fam.samples)
    return names


def test_every_queried_metric_is_exported(live_stack):
    _svc, _base, text, _tmp = live_stack
    exported = exported_names(text)
    used: dict[str, list[str]] = {}
    for name, title, expr in dashboard_queries():
        for m in METRIC_RE.findall(expr):
            used.setdefault(m, []).append(f"{name}: {title}")
    for alert, expr in alert_exprs():
        for m in METRIC_RE.findall(expr):
            used.setdefault(m, []).append(f"alert {alert}")
    assert len(used) >= 25
    missing = {}
    for m, where in used.items():
        # exact sample names: a histogram's _bucket/_count/_sum are separate samples (a
        # histogram with negative buckets, pairsieve_utility, exports no _sum at all)
        if m in exported:
            continue
        missing[m] = where
    assert not missing, f"metrics used but not exported by the running service: {missing}"


def test_every_panel_query_returns_data(live_stack):
    _svc, base, _text, _tmp = live_stack
    empty = []
    queries = dashboard_queries()
    assert len(queries) >= 40
    for name, title, expr in queries:
        data = prom_query(base, concrete(expr))
        if not data["result"]:
            empty.append(f"{name} / {title}: {concrete(expr)}")
    assert not empty, "panel queries without data:\n" + "\n".join(empty)


def test_promtool_check_metrics_is_clean_on_the_live_scrape(live_stack, promtool):
    """Issue 15, item 6: ``pairsieve_budget_total`` was a gauge with a counter's suffix."""
    _svc, _base, text, _tmp = live_stack
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_alert_rules_load_and_evaluate_in_prometheus(live_stack):
    _svc, base, _text, _tmp = live_stack
    groups = _get_json(f"{base}/api/v1/rules")["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {a for a, _ in alert_exprs()}
    bad = {n: r.get("lastError") for n, r in rules.items() if r.get("health") == "err"}
    assert not bad, bad
    # a healthy worker under light load: nothing should be firing
    firing = [a["labels"]["alertname"] for a in _get_json(f"{base}/api/v1/alerts")["data"]
              ["alerts"] if a["state"] == "firing"]
    assert not firing, firing


PNG_PANELS = [
    ("Events in / s", 'sum by (outcome) (rate(pairsieve_events_received_total[15s]))',
     "{outcome}"),
    ("Acceptance rate vs target",
     'sum by (modality) (rate(pairsieve_decisions_total{decision="accept"}[15s])) / '
     'sum by (modality) (rate(pairsieve_decisions_total{reason!="duplicate"}[15s]))',
     "{modality}"),
    ("Decision latency (s)",
     "histogram_quantile(0.99, sum by (le) (rate(pairsieve_decision_latency_seconds_bucket[15s])))",
     "p99"),
    ("Budget spent", "pairsieve_budget_spent", "spent"),
    ("Dead letters / s", "sum by (reason) (rate(pairsieve_dead_letters_total[15s]))", "{reason}"),
    ("Modality imbalance", "pairsieve_modality_imbalance", "imbalance"),
]


def render_overview_png(base: str, path: Path, seconds: float = 40.0) -> None:
    """Key overview panels as a PNG, from the same queries through /api/v1/query_range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = time.time()
    start = end - seconds
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), constrained_layout=True)
    target = prom_query(base, "max(pairsieve_acceptance_rate_target)")["result"]
    for ax, (title, expr, legend) in zip(axes.flat, PNG_PANELS, strict=True):
        data = prom_query(base, expr, start=start, end=end, step=1)
        for series in data["result"]:
            t = np.array([float(v[0]) for v in series["values"]]) - end
            y = np.array([float(v[1]) for v in series["values"]])
            ax.plot(t, y, label=legend.format_map(_Default(series["metric"])))
        if title.startswith("Acceptance") and target:
            ax.axhline(float(target[0]["value"][1]), color="k", ls="--", lw=1, label="target")
        if title.startswith("Decision latency"):
            ax.axhline(0.05, color="r", ls=":", lw=1, label="objective 50 ms")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds before now", fontsize=8)
        ax.tick_params(labelsize=8)
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle("pairsieve overview (live scrape by Prometheus, test load)", fontsize=11)
    fig.savefig(path, dpi=90)
    plt.close(fig)


class _Default(dict):
    def __missing__(self, key):
        return "-"


def test_overview_png_from_live_queries(live_stack):
    _svc, base, _text, tmp = live_stack
    out = tmp / "overview-live.png"
    render_overview_png(base, out)
    assert out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refresh = os.environ.get("PAIRSIEVE_OVERVIEW_PNG")
    if refresh:  # e.g. PAIRSIEVE_OVERVIEW_PNG=deploy/grafana/overview-live.png
        dest = Path(refresh)
        dest = dest if dest.is_absolute() else REPO / dest
        dest.write_bytes(out.read_bytes())
