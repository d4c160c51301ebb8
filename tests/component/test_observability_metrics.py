"""Component tests: ``service.observability.metrics`` scraped through its real HTTP endpoint.

Each test uses a fresh ``CollectorRegistry``; what ``/metrics`` exposes is parsed with
``prometheus_client.parser.text_string_to_metric_families`` (STYLE.md item 7).
"""

from __future__ import annotations

import asyncio
import copy
import math
import os
import re
import shutil
import subprocess
import time
import urllib.request

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.alignment import AlignmentTrainer
from service.core.budget import BudgetConfig
from service.core.selector import SelectorConfig, StreamingSelector
from service.core.types import Decision, FeatureItem
from service.handlers import SelectionHandler
from service.messages import EngineStatus, IncomingEvent, NullPublisher, Outcome
from service.observability.metrics import (
    PairsieveMetrics,
    metric_names,
    start_metrics_server,
    stop_metrics_server,
)
from tests.support import data_and_model

DIMS = {"image": 12, "text": 8}
MODALITIES = ("image", "text")

EXPECTED_NAMES = {
    "pairsieve_events_received_total", "pairsieve_decisions_total", "pairsieve_dead_letters_total",
    "pairsieve_budget_spent", "pairsieve_budget_remaining", "pairsieve_budget_limit",
    "pairsieve_budget_unlimited", "pairsieve_acceptance_rate", "pairsieve_acceptance_rate_target",
    "pairsieve_decision_latency_seconds_bucket", "pairsieve_scoring_duration_seconds_count",
    "pairsieve_micro_batch_size_bucket", "pairsieve_cache_fill_ratio",
    "pairsieve_cache_evictions_total", "pairsieve_model_version", "pairsieve_retrains_total",
    "pairsieve_retrain_duration_seconds_sum", "pairsieve_model_last_update_timestamp_seconds",
    "pairsieve_modality_share", "pairsieve_modality_imbalance", "pairsieve_threshold",
    "pairsieve_utility_bucket", "pairsieve_score_bucket", "pairsieve_labels_received_total",
    "pairsieve_pairs_acquired", "pairsieve_grpc_requests_total",
    "pairsieve_grpc_request_duration_seconds_bucket", "pairsieve_grpc_submit_batch_calls_bucket",
    "pairsieve_scorer_device_info",
    "pairsieve_scorer_gpu_fallback", "pairsieve_consumer_lag", "pairsieve_up",
    "pairsieve_build_info",
}


# ----------------------------------------------------------------------------- helpers
def http_get_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def scrape_text(registry: CollectorRegistry) -> str:
    """GET /metrics from a real server of its own on a free port (port 0)."""
    server, thread = start_metrics_server(registry, 0, host="127.0.0.1")
    try:
        assert server.server_port > 0
        return http_get_metrics(server.server_port)
    finally:
        stop_metrics_server(server, thread)


class Scrape:
    """A parsed exposition: ``s(name, **labels)`` is the sample's value."""

    def __init__(self, text: str):
        self.text = text
        self.families = list(text_string_to_metric_families(self.text))
        self.samples = {}
        for fam in self.families:
            for s in fam.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def __call__(self, name: str, **labels) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def has(self, name: str, **labels) -> bool:
        return (name, frozenset(labels.items())) in self.samples

    def bucket(self, name: str, le: str, **labels) -> float:
        return self(f"{name}_bucket", le=le, **labels)


def decision(item_id, modality, accept, reason, utility=0.5, unc=0.4, div=0.3, cov=0.0):
    return Decision(item_id=item_id, modality=modality, accept=accept, utility=utility,
                    uncertainty=unc, diversity=div, coverage_bonus=cov, margin=0.1, entropy=0.2,
                    least_confidence=0.3, threshold=0.25, model_version=1, reason=reason)


def fake_batch():
    """Item ids / event ids like 'item-123' that must never reach a label value."""
    return [
        Outcome("evt-item-101",
                decision("item-101", "image", True, "accept:utility", 1.2, 0.9, 0.7)),
        Outcome("evt-item-102", decision("item-102", "image", False, "skip:below_threshold", -0.3)),
        Outcome("evt-item-103",
                decision("item-103", "text", True, "accept:explore", 0.1, 0.15, 1.6, 0.05)),
        Outcome("evt-item-104", decision("item-104", "text", False, "skip:pacing", 0.2)),
        Outcome("evt-item-105", decision("item-105", "text", False, "skip:pacing", 0.3)),
        # redelivery of an accepted event: answered from the dedup memory
        Outcome("evt-item-101", decision("item-101", "image", True, "accept:utility", 1.2), True),
    ]


def real_status(total=20):
    """``SelectionHandler.status()`` shape: a real selector's status plus the handler's keys."""
    rng = np.random.default_rng(0)
    n = 120
    z = rng.normal(size=(n, 6))
    a = (z @ rng.normal(size=(6, 12)) + 0.1 * rng.normal(size=(n, 12))).astype(np.float32)
    b = (z @ rng.normal(size=(6, 8)) + 0.1 * rng.normal(size=(n, 8))).astype(np.float32)
    tr = AlignmentTrainer(DIMS, seed=0)
    tr.fit_unpaired({"image": a, "text": b})
    model = tr.fit(a[:40], b[:40])
    budget = BudgetConfig(total=total, target_rate=0.3, min_history=8, window=64, explore=0.0)
    sel = StreamingSelector(model, SelectorConfig(index_size=64, cache_capacity=8, budget=budget),
                            seed=0, device="cpu")
    for lo in range(40, n, 20):
        items = [FeatureItem(f"item-{j}", "image", a[j]) if j % 2 == 0
                 else FeatureItem(f"item-{j}", "text", b[j]) for j in range(lo, lo + 20)]
        sel.commit(sel.propose(items))
    return EngineStatus.from_selector(
        sel.status(), worker_id="worker-item-7", pairs_acquired=3,
        budget_total=sel.budget.config.total, target_rate=sel.budget.config.target_rate,
        labels={"MATCH": 3, "NO_MATCH": 1, "UNSURE": 0}, dims=dict(DIMS))


def engine_status(**fields):
    """An :class:`EngineStatus` with ``fields`` set and neutral values elsewhere (zero counts,
    no modalities): what a report of only those fields used to look like."""
    base = dict(worker_id="w", spent=0, remaining=0, budget_total=0, seen=0, acceptance_rate=0.0,
                target_rate=0.0, threshold=0.0, model_version=0, pairs_acquired=0,
                accepted_per_modality={}, seen_per_modality={}, cache_fill={},
                cache_evictions={}, labels={}, dims={})
    base.update(fields)
    return EngineStatus(**base)




@pytest.fixture(scope="module")
def status():
    return real_status()


@pytest.fixture(scope="module")
def hub():
    """One real metrics server for the module (stopping one costs its 0.5 s poll interval):
    it serves a hub registry to which each test attaches its own fresh registry."""
    hub = CollectorRegistry()
    server, thread = start_metrics_server(hub, 0, host="127.0.0.1")
    yield hub, server.server_port
    stop_metrics_server(server, thread)


@pytest.fixture
def reg():
    return CollectorRegistry()


@pytest.fixture
def scrape(hub, reg):
    """``scrape()`` -> :class:`Scrape` of ``reg`` through the real HTTP endpoint."""
    registry, port = hub
    registry.register(reg)
    yield lambda: Scrape(http_get_metrics(port))
    registry.unregister(reg)


@pytest.fixture
def m(reg):
    return PairsieveMetrics(reg, modalities=MODALITIES, version="9.9.9", clock=lambda: 1234.5)


# ----------------------------------------------------------------------------- tests
def test_batch_counts_events_decisions_and_histograms(reg, m, scrape):
    m.batch_decided(fake_batch(), latencies_s=[0.0005, 0.02, 0.02, 3.0, 90.0, -1.0],
                    scoring_s=0.004)
    s = scrape()
    ev = "pairsieve_events_received_total"
    assert s(ev, modality="image", outcome="accepted") == 1
    assert s(ev, modality="image", outcome="skipped") == 1
    assert s(ev, modality="image", outcome="duplicate") == 1
    assert s(ev, modality="text", outcome="accepted") == 1
    assert s(ev, modality="text", outcome="skipped") == 2
    assert not s.has(ev, modality="text", outcome="duplicate")

    dec = "pairsieve_decisions_total"
    assert s(dec, modality="image", decision="accept", reason="utility") == 1
    assert s(dec, modality="image", decision="skip", reason="below_threshold") == 1
    assert s(dec, modality="image", decision="skip", reason="duplicate") == 1
    assert s(dec, modality="text", decision="accept", reason="explore") == 1
    assert s(dec, modality="text", decision="skip", reason="pacing") == 2
    accepts = sum(v for (n, lb), v in s.samples.items()
                  if n == dec and ("decision", "accept") in lb)
    assert accepts == 2  # a duplicate is never a second acquisition

    lat = "pairsieve_decision_latency_seconds"
    assert s(f"{lat}_count") == 6
    assert s.bucket(lat, "0.001") == 2  # 0.5 ms and the clamped negative skew
    assert s.bucket(lat, "0.025") == 4
    assert s.bucket(lat, "60.0") == 5
    assert s.bucket(lat, "+Inf") == 6
    assert s("pairsieve_scoring_duration_seconds_count") == 1
    assert s("pairsieve_scoring_duration_seconds_sum") == pytest.approx(0.004)
    assert s("pairsieve_micro_batch_size_count") == 1
    assert s("pairsieve_micro_batch_size_sum") == 6
    assert s.bucket("pairsieve_micro_batch_size", "4.0") == 0
    assert s.bucket("pairsieve_micro_batch_size", "8.0") == 1

    # score distributions: fresh decisions only (the duplicate is not observed again)
    assert s("pairsieve_utility_count", modality="image") == 2
    assert s("pairsieve_utility_count", modality="text") == 3
    assert s.bucket("pairsieve_utility", "-4.0", modality="image") == 0
    assert s.bucket("pairsieve_utility", "0.0", modality="image") == 1
    # buckets below 0: prometheus_client exports no _sum (OpenMetrics), count and buckets suffice
    assert not s.has("pairsieve_utility_sum", modality="image")
    for comp in ("uncertainty", "diversity", "coverage_bonus"):
        assert s("pairsieve_score_count", component=comp, modality="text") == 3
    assert s.bucket("pairsieve_score", "1.5", component="diversity", modality="text") == 2
    assert s.bucket("pairsieve_score", "2.0", component="diversity", modality="text") == 3
    cov = s("pairsieve_score_sum", component="coverage_bonus", modality="text")
    assert cov == pytest.approx(0.05)


def test_batch_of_duplicates_only_observes_no_scoring(reg, m, scrape):
    dup = [Outcome("e1", decision("i1", "text", False, "skip:quota"), True)]
    m.batch_decided(dup, [], scoring_s=0.0)
    s = scrape()
    assert s("pairsieve_scoring_duration_seconds_count") == 0
    assert s("pairsieve_decision_latency_seconds_count") == 0
    assert s("pairsieve_decisions_total", modality="text", decision="skip", reason="duplicate") == 1


def test_unknown_reason_code_is_bounded(reg, m, scrape):
    m.batch_decided([Outcome("e", decision("i", "image", True, "accept:item-9"))], [], 0.001)
    m.batch_decided([Outcome("f", decision("j", "image", False, "accept:utility"))], [], 0.001)
    s = scrape()
    assert s("pairsieve_decisions_total", modality="image", decision="accept", reason="other") == 1
    assert s("pairsieve_decisions_total", modality="image", decision="skip", reason="other") == 1


def test_engine_state_from_real_handler_status(reg, m, status, scrape):
    m.engine_state(status)
    s = scrape()
    assert s("pairsieve_budget_spent") == status.spent
    assert s("pairsieve_budget_remaining") == status.remaining == 20 - status.spent
    assert s("pairsieve_budget_limit") == 20
    assert s("pairsieve_budget_unlimited") == 0
    assert s("pairsieve_acceptance_rate") == pytest.approx(status.acceptance_rate)
    assert s("pairsieve_acceptance_rate_target") == pytest.approx(0.3)
    assert s("pairsieve_threshold") == pytest.approx(status.threshold)
    assert s("pairsieve_model_version") == status.model_version
    assert s("pairsieve_pairs_acquired") == 3
    for mod in MODALITIES:
        fill = s("pairsieve_cache_fill_ratio", modality=mod)
        assert fill == pytest.approx(status.cache_fill[mod])
        assert s("pairsieve_cache_evictions_total", modality=mod) == status.cache_evictions[mod]
    acc = status.accepted_per_modality
    assert sum(acc.values()) > 0, "the fixture stream should have accepted something"
    shares = {mod: acc[mod] / sum(acc.values()) for mod in MODALITIES}
    for mod in MODALITIES:
        assert s("pairsieve_modality_share", modality=mod) == pytest.approx(shares[mod])
    assert s("pairsieve_modality_imbalance") == pytest.approx(abs(shares["image"] - shares["text"]))
    assert sum(status.cache_evictions.values()) > 0, "capacity 8 should have evicted"
    assert "worker-item-7" not in s.text


def test_unlimited_budget_and_warmup_are_nan(reg, m, scrape):
    m.engine_state(engine_status(spent=4, remaining=None, budget_total=None, threshold=math.nan,
                                 accepted_per_modality={"image": 0, "text": 0}))
    s = scrape()
    assert s("pairsieve_budget_spent") == 4
    assert math.isnan(s("pairsieve_budget_remaining"))
    assert math.isnan(s("pairsieve_budget_limit"))
    assert s("pairsieve_budget_unlimited") == 1
    assert math.isnan(s("pairsieve_threshold"))
    assert math.isnan(s("pairsieve_modality_share", modality="image"))
    assert math.isnan(s("pairsieve_modality_imbalance"))


def test_eviction_counter_never_decreases(reg, m, scrape):
    ev = "pairsieve_cache_evictions_total"
    m.engine_state(engine_status(cache_evictions={"image": 5, "text": 0}))
    # the same cumulative value twice
    m.engine_state(engine_status(cache_evictions={"image": 5, "text": 0}))
    s = scrape()
    assert s(ev, modality="image") == 5
    assert s(ev, modality="text") == 0  # the series exists from the first report
    m.engine_state(engine_status(cache_evictions={"image": 7, "text": 2}))
    s2 = scrape()
    assert (s2(ev, modality="image"), s2(ev, modality="text")) == (7, 2)
    # source reset: 3 new evictions
    m.engine_state(engine_status(cache_evictions={"image": 3, "text": 2}))
    s3 = scrape()
    assert s3(ev, modality="image") == 10
    assert s3(ev, modality="image") >= s2(ev, modality="image")


def test_labels_and_retrains(reg, m, scrape):
    m.labels_received("MATCH")
    m.labels_received("MATCH", 2)
    m.labels_received("NO_MATCH")
    m.labels_received("item-123")  # not a status: bounded
    m.retrained(2, 1.5, True)
    m.retrained(2, 0.2, False)
    m.retrained(3, 40.0, True)
    with pytest.raises(ValueError):
        m.labels_received("MATCH", -1)
    s = scrape()
    lab = "pairsieve_labels_received_total"
    assert (s(lab, status="MATCH"), s(lab, status="NO_MATCH"), s(lab, status="other")) == (3, 1, 1)
    assert not s.has(lab, status="UNSURE")
    assert s("pairsieve_retrains_total", outcome="ok") == 2
    assert s("pairsieve_retrains_total", outcome="error") == 1
    assert s("pairsieve_retrain_duration_seconds_count") == 3
    assert s("pairsieve_retrain_duration_seconds_sum") == pytest.approx(41.7)
    assert s.bucket("pairsieve_retrain_duration_seconds", "2.5") == 2
    assert s("pairsieve_model_last_update_timestamp_seconds") == 1234.5


def test_model_timestamp_untouched_by_failed_retrain(reg, scrape):
    m = PairsieveMetrics(reg, clock=lambda: 99.0)
    m.retrained(1, 0.1, False)
    assert scrape()("pairsieve_model_last_update_timestamp_seconds") == 0


def test_transport_hooks(reg, m, scrape):
    m.batch_decided(fake_batch()[:1], [], 0.001)  # decided by the handler: batch size 1
    m.micro_batch(64)  # from now on the adapter's raw sizes only
    m.batch_decided(fake_batch(), [], 0.001)
    m.micro_batch(512)
    m.dead_lettered("invalid_vector", "image")
    m.dead_lettered("invalid_vector", "audio")  # not a modality of this service
    m.dead_lettered("bad vector for item-123", "item-123")  # free text: bounded
    m.grpc_request("/pairsieve.v1.Selection/SubmitEvents", "OK", 0.003)
    m.grpc_request("SubmitEvents", "INVALID_ARGUMENT", 0.001)
    m.grpc_request("GetStatus", "NOT_A_CODE", 0.002)
    m.grpc_submit_batch(1)
    m.grpc_submit_batch(5)
    m.consumer_lag("pairsieve.features.v1", 42)
    m.consumer_lag("pairsieve.alignment-labels.v1", -3)
    m.set_serving(True)
    s = scrape()
    assert s("pairsieve_micro_batch_size_count") == 3
    assert s("pairsieve_micro_batch_size_sum") == 1 + 64 + 512
    ev = "pairsieve_events_received_total"
    assert s(ev, modality="image", outcome="dead_letter") == 1
    assert s(ev, modality="unknown", outcome="dead_letter") == 2
    assert s("pairsieve_dead_letters_total", reason="invalid_vector") == 2
    assert s("pairsieve_dead_letters_total", reason="other") == 1
    g = "pairsieve_grpc_requests_total"
    assert s(g, method="SubmitEvents", code="OK") == 1
    assert s(g, method="SubmitEvents", code="INVALID_ARGUMENT") == 1
    assert s(g, method="GetStatus", code="UNKNOWN") == 1
    assert s("pairsieve_grpc_request_duration_seconds_count", method="SubmitEvents") == 2
    assert s("pairsieve_grpc_submit_batch_calls_count") == 2
    assert s("pairsieve_grpc_submit_batch_calls_sum") == 6
    assert s.bucket("pairsieve_grpc_submit_batch_calls", "4.0") == 1
    assert s("pairsieve_consumer_lag", topic="pairsieve.features.v1") == 42
    assert s("pairsieve_consumer_lag", topic="pairsieve.alignment-labels.v1") == 0
    assert s("pairsieve_up") == 1
    assert s("pairsieve_build_info", version="9.9.9") == 1
    m.set_serving(False)
    assert scrape()("pairsieve_up") == 0


def test_scorer_device_and_gpu_fallback(reg, m, scrape):
    m.scorer_device("cuda:0", gpu_expected=True)
    s = scrape()
    assert s("pairsieve_scorer_device_info", device="cuda") == 1
    assert s("pairsieve_scorer_gpu_fallback") == 0
    m.scorer_device(torch.device("cpu"), gpu_expected=True)
    s = scrape()
    assert s("pairsieve_scorer_device_info", device="cpu") == 1
    assert not s.has("pairsieve_scorer_device_info", device="cuda")
    assert s("pairsieve_scorer_gpu_fallback") == 1
    m.scorer_device("cpu")
    assert scrape()("pairsieve_scorer_gpu_fallback") == 0


def test_naming_contract_and_no_item_ids(reg, m, status, scrape):
    m.batch_decided(fake_batch(), [0.1], 0.01)
    m.engine_state(status)
    m.labels_received("UNSURE")
    m.retrained(1, 0.5, True)
    m.candidate_judged("published")
    m.candidate_judged("item-123")  # not an outcome: counted as other
    m.labels_duplicate(2)
    m.model_quality({1: 0.5, 5: 0.75}, 12, 0.02, 100)
    m.dead_lettered("decode_error", "item-123")
    m.grpc_request("item-123", "OK", 0.01)
    m.scorer_device("cpu")
    m.consumer_lag("pairsieve.features.v1", 1)
    s = scrape()
    assert s("pairsieve_model_candidates_total", outcome="published") == 1
    assert s("pairsieve_model_candidates_total", outcome="other") == 1
    assert s("pairsieve_labels_duplicate_total") == 2
    assert s("pairsieve_model_validation_recall", k="5") == 0.75
    assert s("pairsieve_model_validation_pairs") == 12
    assert (s("pairsieve_expected_recall_gain"), s("pairsieve_expected_recall_gain_pairs")) == \
        (0.02, 100)
    assert s.families
    for fam in s.families:
        assert fam.name.startswith("pairsieve_"), fam.name
        if fam.type == "counter":
            assert fam.samples and all(x.name.endswith("_total") for x in fam.samples), fam.name
        if fam.type == "histogram":
            assert not fam.name.endswith("_total")
        assert fam.documentation and fam.documentation != fam.name, f"{fam.name}: no help text"
        for x in fam.samples:
            for value in x.labels.values():
                assert "item-" not in value and not value.startswith("evt"), (x.name, x.labels)
    assert "item-" not in s.text and "evt-" not in s.text
    names = metric_names(reg)
    assert EXPECTED_NAMES <= names, EXPECTED_NAMES - names
    assert all(n.startswith("pairsieve_") for n in names)
    sample_names = {x.name for fam in s.families for x in fam.samples}
    assert sample_names <= names


def test_metric_names_list_labelled_metrics_before_first_series(reg, m):
    names = metric_names(reg)
    assert EXPECTED_NAMES <= names
    assert "pairsieve_decisions" not in names  # a family name is not a queryable series


def test_two_registries_do_not_interfere():
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    before_default = {f.name for f in REGISTRY.collect()}
    m1 = PairsieveMetrics(r1, modalities=MODALITIES, version="1")
    m2 = PairsieveMetrics(r2, modalities=MODALITIES, version="2")
    m1.batch_decided(fake_batch(), [0.1, 0.2], 0.01)
    m1.engine_state(engine_status(spent=7, cache_evictions={"image": 4}))
    m2.engine_state(engine_status(spent=1, cache_evictions={"image": 1}))
    m2.labels_received("MATCH")
    s1, s2 = Scrape(scrape_text(r1)), Scrape(scrape_text(r2))
    assert s1("pairsieve_events_received_total", modality="text", outcome="skipped") == 2
    assert not s2.has("pairsieve_events_received_total", modality="text", outcome="skipped")
    assert s2("pairsieve_decision_latency_seconds_count") == 0
    assert (s1("pairsieve_budget_spent"), s2("pairsieve_budget_spent")) == (7, 1)
    assert s1("pairsieve_cache_evictions_total", modality="image") == 4
    assert s2("pairsieve_cache_evictions_total", modality="image") == 1
    assert s2("pairsieve_labels_received_total", status="MATCH") == 1
    assert not s1.has("pairsieve_labels_received_total", status="MATCH")
    assert s1.has("pairsieve_build_info", version="1")
    assert not s1.has("pairsieve_build_info", version="2")
    assert {f.name for f in REGISTRY.collect()} == before_default  # global registry untouched
    assert not any(f.name.startswith("pairsieve_") for f in REGISTRY.collect())


def test_registry_is_required_and_servers_use_distinct_ports(reg):
    with pytest.raises(ValueError):
        PairsieveMetrics(None)
    PairsieveMetrics(reg)
    a, ta = start_metrics_server(reg, 0, host="127.0.0.1")
    b, tb = start_metrics_server(reg, 0, host="127.0.0.1")
    try:
        assert a.server_port != b.server_port and ta.is_alive() and tb.is_alive()
    finally:
        stop_metrics_server(a, ta)
        stop_metrics_server(b, tb)
    assert not ta.is_alive() and not tb.is_alive()


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(st.floats(-5, 5), st.sampled_from([0.0, 0.1, 1.0, 2.5])),
                       max_size=40),
       extra=st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf")]), max_size=3))
def test_observe_many_exposes_what_observe_one_by_one_does(values, extra):
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from service.observability.metrics import observe_many

    buckets = (0.0, 0.1, 0.5, 1.0, 2.5)  # values exactly on a bound go into that bucket
    regs = [CollectorRegistry(), CollectorRegistry()]
    h_bulk, h_one = (Histogram("x", "x", ["m"], buckets=buckets, registry=r) for r in regs)
    observe_many(h_bulk.labels("a"), values + extra)
    for v in values:
        h_one.labels("a").observe(v)

    def samples(reg):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in reg.collect() for s in fam.samples if not s.name.endswith("_created")}

    got, want = samples(regs[0]), samples(regs[1])
    assert got.keys() == want.keys() or not values
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k
    assert generate_latest(regs[0]).count(b"x_bucket") == len(buckets) + 1


# ----------------------------------------------------------------------------- cardinality
def _series(registry: CollectorRegistry) -> tuple[str, list[str]]:
    """The text exposition and its sample lines (every line not starting with '#')."""
    text = generate_latest(registry).decode()
    return text, [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


def _series_keys(lines: list[str]) -> set[str]:
    """Each sample line without its value: the series (name and labels) it belongs to."""
    return {ln.rsplit(" ", 1)[0] for ln in lines}


def _letters(i: int) -> str:
    """A distinct lower-case word per ``i`` ("a", "b", ... "ba", ...): input-derived values that
    pass the free-form label guards' patterns (digits would not)."""
    out = ""
    while True:
        out = "abcdefghijklmnopqrstuvwxyz"[i % 26] + out
        i //= 26
        if not i:
            return out


def _engine_traffic(metrics: PairsieveMetrics) -> None:
    """A few hundred events through a real handler reporting to ``metrics``: 3 batches of 100,
    one of them redelivered (duplicates), accepts and skips of both modalities."""
    a, b, model = data_and_model()
    cfg = SelectorConfig(index_size=64, cache_capacity=16,
                         budget=BudgetConfig(total=40, target_rate=0.3, min_history=8, window=64,
                                             warmup_accepts=4))
    sel = StreamingSelector(copy.deepcopy(model), cfg, seed=0, device="cpu")
    handler = SelectionHandler(sel, AlignmentTrainer(DIMS, seed=0), NullPublisher(),
                               metrics, worker_id="worker-item-7", retrain_every=10_000)

    def batch(lo: int) -> list[IncomingEvent]:
        return [IncomingEvent(f"warm-evt-{j}", f"warm-item-{j}", "image" if j % 2 else "text",
                              (a[j] if j % 2 else b[j]).copy(), event_time=time.time() - 0.01)
                for j in range(lo, lo + 100)]

    async def main() -> None:
        for lo in (0, 100, 200):
            await handler.submit(batch(lo))
        await handler.submit(batch(100))  # redelivery: every event answered as a duplicate

    try:
        asyncio.run(main())
    finally:
        handler.close()


def _hooks(metrics: PairsieveMetrics, ids: range) -> None:
    """The transport hooks with values taken from input, one distinct value per id."""
    for i in ids:
        word = _letters(i)
        metrics.dead_lettered(f"bad_{word}", f"modality{word}")  # reason and modality from input
        metrics.dead_lettered("decode_error", f"item-{i}")
        metrics.grpc_request(f"/pairsieve.v1.Pairsieve/{word.capitalize()}", "OK", 0.001)
        metrics.grpc_request("/pairsieve.v1.Pairsieve/Submit", f"CODE_{i}", 0.001)
        metrics.consumer_lag(f"pairsieve.features.{word}", i)
        metrics.labels_received(f"STATUS_{i}")
        metrics.candidate_judged(f"item-{i}")
        metrics.scorer_device(f"cuda:{i}" if i % 2 else "cpu")


def _outcomes(ids: range) -> list[Outcome]:
    """Engine-shaped verdicts, one distinct event and item id each: both modalities, known and
    unknown reason codes, accepts, skips and duplicates."""
    reasons = ["accept:utility", "skip:below_threshold", "skip:pacing", f"accept:{ids.start}",
               "skip:item-1"]
    return [Outcome(f"evt-{i}", decision(f"item-{i}", "image" if i % 2 else "text", i % 3 == 0,
                                         reasons[i % len(reasons)], utility=(i % 97) / 20 - 2),
                    duplicate=i % 11 == 0, worker_id=f"worker-{i}")
            for i in ids]


def test_series_count_unchanged_after_100k_unique_ids():
    """Label values never come from ids: after a few hundred events through a real engine and a
    few hundred input-derived values through every transport hook (enough to fill the free-form
    label guards' caps), 100,000 more distinct event/item ids (and as many input-derived reasons,
    modality names, methods, codes, topics, statuses, devices) add no series at all.

    When ``promtool`` is on PATH the final exposition must pass ``promtool check metrics``; when
    it is not, only the series count and prometheus_client's own parser check it (the deploy
    tests run promtool on a live scrape and fail without it)."""
    reg = CollectorRegistry()
    m = PairsieveMetrics(reg)  # as the service builds it: modalities learnt from decided items
    _engine_traffic(m)
    _hooks(m, range(400))
    m.batch_decided(_outcomes(range(400)), [0.01] * 400, 0.002)
    _, warm = _series(reg)
    warm_keys = _series_keys(warm)
    assert len(warm_keys) == len(warm)  # one line per series

    n = 100_000
    t0 = time.perf_counter()
    for lo in range(400, 400 + n, 10_000):  # bulk: one call per 10k verdicts
        ids = range(lo, min(lo + 10_000, 400 + n))
        m.batch_decided(_outcomes(ids), [0.01] * len(ids), 0.002)
    _hooks(m, range(400, 400 + n))
    took = time.perf_counter() - t0
    text, after = _series(reg)

    assert len(after) == len(warm), sorted(_series_keys(after) ^ warm_keys)[:20]
    assert _series_keys(after) == warm_keys
    assert not re.search(r"(evt|item|worker)-\d", text), "an id became a label value"
    assert "cuda:" not in text and "STATUS_" not in text and "CODE_" not in text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # parses cleanly
    events = families["pairsieve_events_received"]
    total = sum(s.value for s in events.samples if s.name.endswith("_total"))
    assert total >= 400 + n  # the traffic was counted, in bounded series
    assert took < 30, f"{took:.1f}s for 100k ids"

    promtool = shutil.which("promtool")
    if promtool is None and os.access("/usr/bin/promtool", os.X_OK):
        promtool = "/usr/bin/promtool"  # Debian's prometheus package (make deploy-tools)
    if promtool is not None:
        res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr
