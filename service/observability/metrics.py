"""Prometheus metrics as one object over an injected registry.

:class:`PairsieveMetrics` implements the handler's ``MetricsSink`` (``batch_decided``,
``engine_state``, ``labels_received``, ``labels_duplicate``, ``retrained``, ``candidate_judged``,
``model_quality``) plus the hooks of the transports
(``dead_lettered``, ``micro_batch``, ``consumer_lag``, ``grpc_request``, ``scorer_device``,
``set_serving``). It never touches ``prometheus_client``'s global default registry, so two
objects on two registries (two workers in one test process) do not interfere.

Conventions (ARCHITECTURE.md section 4): every name starts with ``pairsieve_``, values are in base
units (seconds, ratios in [0, 1], plain counts), counters end in ``_total``, and labels are
bounded: ``modality``, ``outcome``, ``decision``, ``reason``, ``component``, ``status``,
``method``, ``code``, ``topic``, ``device``, ``version``, ``k``. Item and event ids never become
label values. Every label value goes through a guard that maps anything outside its known set
(or past a small cap of distinct values, for free-form ones such as dead-letter reasons) to
``other`` / ``unknown``, so a malformed input cannot create a new series per message.

Representation choices
----------------------
* **Unlimited budget**: ``pairsieve_budget_limit`` and ``pairsieve_budget_remaining`` are NaN and
  ``pairsieve_budget_unlimited`` is 1. NaN is drawn as a gap in Grafana and compares false in
  PromQL, so ``pairsieve_budget_remaining < 10`` cannot fire on an unlimited budget (a -1 sentinel
  would). ``pairsieve_budget_spent`` is always a number; plot it for the unlimited case.
* **Undefined values** are NaN too: ``pairsieve_threshold`` before warm-up,
  ``pairsieve_modality_share`` / ``pairsieve_modality_imbalance`` before the first accept.
* **Decision reasons**: ``Decision.reason`` is ``<decision>:<reason>``; the two halves become the
  ``decision`` (accept|skip) and ``reason`` labels. A redelivered event answered from the dedup
  memory counts as ``decision="skip", reason="duplicate"`` (nothing is spent for it), so
  ``sum(pairsieve_decisions_total{decision="accept"})`` is this worker's acquisitions.
* **Cache evictions**: the engine reports cumulative counts; the counter is incremented by the
  delta since the previous report and never decreases. A report lower than the previous one is
  taken as a reset of the source (a rebuilt cache) and adds the new value, as Prometheus'
  ``rate()`` treats counter resets.
* **Micro-batch size** is observed by ``batch_decided`` (events in the batch handed to the
  handler) until a transport calls :meth:`PairsieveMetrics.micro_batch` (the raw size of what it
  took from the broker); from then on only the transport's sizes are observed, so a batch is
  never counted twice.
* ``pairsieve_model_version`` is the version in use, taken from ``engine_state``;
  ``pairsieve_model_last_update_timestamp_seconds`` is set (injected clock) on each successful
  retrain.
* **Model quality**: ``pairsieve_model_validation_recall{k}`` is the R@k of the model in use on
  the held-out acquired pairs (mean of both directions), as measured when that version passed the
  quality gate; NaN until a version was measured. ``pairsieve_model_validation_pairs`` is the
  number of pairs it was measured on.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from service.core.reasons import label_values as reason_label_values
from service.messages import LABEL_STATUSES, EngineStatus

__all__ = ["PairsieveMetrics", "metric_names", "start_metrics_server", "stop_metrics_server"]

NAN = math.nan

# --- buckets -------------------------------------------------------------------------------
# 75 and 150 ms resolve a p99 near the 100 ms objective of issue 16 (between 100 and 250 ms a
# quantile used to be interpolated over one wide bucket)
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
                     2.5, 5.0, 10.0, 30.0, 60.0)
SCORING_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SUBMIT_BATCH_CALL_BUCKETS = (1, 2, 3, 4, 6, 8, 16, 32, 64)
RETRAIN_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
UTILITY_BUCKETS = tuple(round(-4.0 + 0.5 * i, 2) for i in range(17))  # -4.0 .. 4.0
COMPONENT_BUCKETS = tuple(round(0.1 * i, 2) for i in range(21))  # 0.0 .. 2.0
GRPC_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                  5.0, 10.0, 30.0)

# --- bounded label sets --------------------------------------------------------------------
DECISION_REASONS = reason_label_values()  # {"accept": codes, "skip": codes}, from core Reason
EVENT_OUTCOMES = ("accepted", "skipped", "duplicate", "dead_letter")
SCORE_COMPONENTS = ("uncertainty", "diversity", "typicality", "coverage_bonus")
GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
              "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
              "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
              "UNAUTHENTICATED")
DEVICES = ("cpu", "cuda", "mps", "xpu")
UNKNOWN = "unknown"
OTHER = "other"


class _LabelGuard:
    """Maps raw values to a bounded set of label values.

    A value is kept when it is in ``allowed`` or, with ``allowed`` None, when it matches
    ``pattern`` and fewer than ``cap`` distinct values were kept so far; anything else becomes
    ``fallback``.
    """

    def __init__(self, fallback: str, allowed: Iterable[str] | None = None,
                 pattern: str = r"^[a-z][a-z0-9_.:-]{0,47}$", cap: int = 16):
        self.fallback = fallback
        self.allowed = None if allowed is None else frozenset(allowed)
        self.pattern = re.compile(pattern)
        self.cap = int(cap)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def known(self, value: Any) -> str:
        """``value`` if it is allowed or was already kept, else the fallback (learns nothing)."""
        v = "" if value is None else str(value)
        if self.allowed is not None:
            return v if v in self.allowed else self.fallback
        return v if v in self._seen else self.fallback

    def __call__(self, value: Any) -> str:
        v = "" if value is None else str(value)
        if self.allowed is not None:
            return v if v in self.allowed else self.fallback
        if v in self._seen:
            return v
        if not self.pattern.match(v):
            return self.fallback
        with self._lock:
            if v in self._seen:
                return v
            if len(self._seen) >= self.cap:
                return self.fallback
            self._seen.add(v)
            return v


def _num(x: Any) -> float:
    """A gauge value: None -> NaN, anything else as float."""
    return NAN if x is None else float(x)


class PairsieveMetrics:
    """The service's metrics over ``registry`` (see the module docstring).

    Parameters
    ----------
    registry : CollectorRegistry
        Where the metrics are registered (never the global default registry).
    modalities : sequence of str or None
        The service's modalities. When given, any other modality is reported as ``unknown``;
        when None, up to 8 distinct well-formed names are learnt from decided items and the
        engine state (never from dead letters).
    version : str or None
        Build version for ``pairsieve_build_info`` (default: ``service.__version__``).
    clock : callable returning seconds since the epoch
        Used for ``pairsieve_model_last_update_timestamp_seconds``.
    """

    def __init__(self, registry: CollectorRegistry, *, modalities: Sequence[str] | None = None,
                 version: str | None = None, clock: Callable[[], float] = time.time):
        if registry is None:
            raise ValueError("PairsieveMetrics needs an explicit CollectorRegistry")
        self.registry = registry
        self.clock = clock
        self._lock = threading.Lock()
        self._evictions_seen: dict[str, float] = {}
        self._adapter_batch_sizes = False
        self._device: str | None = None

        # modalities: learnt (capped) only from trusted paths (decided items, engine state);
        # the dead-letter path, fed by malformed input, only reuses known names
        self._modality = _LabelGuard(UNKNOWN, modalities, r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$", cap=8)
        self._dl_reason = _LabelGuard(OTHER, None, r"^[a-z]+(_[a-z]+){0,7}$", cap=32)
        self._method = _LabelGuard(OTHER, None, r"^[A-Za-z][A-Za-z0-9_]{0,63}$", cap=32)
        self._topic = _LabelGuard(OTHER, None, r"^[A-Za-z0-9._-]{1,249}$", cap=16)

        r = registry
        # --- events and decisions
        self.events_received = Counter(
            "pairsieve_events_received_total",
            "Feature events received, by modality and outcome: accepted or skipped (decided now), "
            "duplicate (redelivery answered from the dedup memory) or dead_letter (invalid, "
            "sent to the dead-letter topic; modality 'unknown' when it could not be read).",
            ["modality", "outcome"], registry=r)
        self.decisions = Counter(
            "pairsieve_decisions_total",
            "Selection decisions by modality, decision (accept|skip) and reason code ("
            + "; ".join(f"{d}: {'|'.join(c)}" for d, c in DECISION_REASONS.items())
            + "). Redeliveries count as skip/duplicate: nothing is spent for them.",
            ["modality", "decision", "reason"], registry=r)
        self.dead_letters = Counter(
            "pairsieve_dead_letters_total",
            "Events sent to the dead-letter topic, by reason code.", ["reason"], registry=r)
        # --- budget
        self.budget_spent = Gauge(
            "pairsieve_budget_spent",
            "Acquisitions counted against the budget (this worker's accepts plus the selections "
            "of other workers it has observed).", registry=r)
        self.budget_remaining = Gauge(
            "pairsieve_budget_remaining",
            "Acquisitions left in the budget; NaN when the budget is unlimited "
            "(see pairsieve_budget_unlimited).", registry=r)
        self.budget_limit = Gauge(
            "pairsieve_budget_limit",
            "Total acquisition budget; NaN when unlimited (see pairsieve_budget_unlimited).",
            registry=r)
        self.budget_unlimited = Gauge(
            "pairsieve_budget_unlimited",
            "1 when the acquisition budget is unlimited (budget total/remaining are then NaN), "
            "else 0.", registry=r)
        self.acceptance_rate = Gauge(
            "pairsieve_acceptance_rate",
            "This worker's accepted / decided items (ratio, 0..1; other workers excluded).",
            registry=r)
        self.acceptance_rate_target = Gauge(
            "pairsieve_acceptance_rate_target",
            "Target acceptance rate the threshold is paced to (ratio, 0..1).", registry=r)
        self.threshold = Gauge(
            "pairsieve_threshold",
            "Current utility threshold an item must exceed to be accepted; NaN during warm-up.",
            registry=r)
        # --- latency and batching
        self.decision_latency = Histogram(
            "pairsieve_decision_latency_seconds",
            "Time from an event's event_time to its decision (seconds; events without an event "
            "time are not observed; clock skew below zero is clamped to 0).",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.scoring_duration = Histogram(
            "pairsieve_scoring_duration_seconds",
            "Torch time to score one micro-batch (propose + partner candidates), in seconds.",
            buckets=SCORING_BUCKETS_S, registry=r)
        self.micro_batch_size = Histogram(
            "pairsieve_micro_batch_size",
            "Events per micro-batch (items).", buckets=BATCH_SIZE_BUCKETS, registry=r)
        # --- caches
        self.cache_fill = Gauge(
            "pairsieve_cache_fill_ratio",
            "Fraction of the modality's diversity cache capacity in use (0..1).",
            ["modality"], registry=r)
        self.cache_evictions = Counter(
            "pairsieve_cache_evictions_total",
            "Entries evicted from the modality's diversity cache.", ["modality"], registry=r)
        # --- model
        self.model_version = Gauge(
            "pairsieve_model_version", "Version of the alignment model in use.", registry=r)
        self.retrains = Counter(
            "pairsieve_retrains_total",
            "Alignment model retrains by outcome (ok|error).", ["outcome"], registry=r)
        self.retrain_duration = Histogram(
            "pairsieve_retrain_duration_seconds",
            "Wall time of one alignment model retrain, in seconds (successful or not).",
            buckets=RETRAIN_BUCKETS_S, registry=r)
        self.model_last_update = Gauge(
            "pairsieve_model_last_update_timestamp_seconds",
            "Unix time of the last successful retrain (0 before the first).", registry=r)
        # --- selection quality
        self.modality_share = Gauge(
            "pairsieve_modality_share",
            "The modality's fraction of this worker's accepts (0..1; NaN before the first "
            "accept).", ["modality"], registry=r)
        self.modality_imbalance = Gauge(
            "pairsieve_modality_imbalance",
            "Largest minus smallest modality share of this worker's accepts (0 = balanced, "
            "1 = one modality only; NaN before the first accept).", registry=r)
        self.utility = Histogram(
            "pairsieve_utility",
            "Utility of each decided item (the score compared with the threshold), by modality.",
            ["modality"], buckets=UTILITY_BUCKETS, registry=r)
        self.score = Histogram(
            "pairsieve_score",
            "Utility components of each decided item, by component (uncertainty|diversity|"
            "typicality|coverage_bonus) and modality.",
            ["component", "modality"], buckets=COMPONENT_BUCKETS, registry=r)
        # --- labels
        self.labels = Counter(
            "pairsieve_labels_received_total",
            "Annotator answers received, by status (MATCH|NO_MATCH|UNSURE).",
            ["status"], registry=r)
        self.pairs_acquired = Gauge(
            "pairsieve_pairs_acquired",
            "Acquired (MATCH) pairs in the shared training set, validation pairs included.",
            registry=r)
        self.duplicate_labels = Counter(
            "pairsieve_labels_duplicate_total",
            "Re-sent annotator answers (a request id taken in before): counted once, ignored.",
            registry=r)
        self.model_candidates = Counter(
            "pairsieve_model_candidates_total",
            "Candidate model versions trained here, by outcome (published: passed the quality "
            "gate and published; rejected: worse than the model in use on the validation pairs; "
            "failed: training or publishing failed; superseded: the trainer role moved).",
            ["outcome"], registry=r)
        self.validation_recall = Gauge(
            "pairsieve_model_validation_recall",
            "R@k of the model in use on the held-out acquired pairs (mean of both directions).",
            ["k"], registry=r)
        self.validation_pairs = Gauge(
            "pairsieve_model_validation_pairs",
            "Held-out acquired pairs the model in use was measured on.", registry=r)
        self.expected_gain = Gauge(
            "pairsieve_expected_recall_gain",
            "Stopping signal: expected validation R@1 gain of the next "
            "pairsieve_expected_recall_gain_pairs acquired pairs, from the lineage's learning "
            "curve (NaN until it has three points).", registry=r)
        self.expected_gain_pairs = Gauge(
            "pairsieve_expected_recall_gain_pairs",
            "The N of pairsieve_expected_recall_gain (PAIRSIEVE_GAIN_HORIZON_PAIRS).", registry=r)
        self.expected_gain.set(NAN)  # unknown, not "no gain": the plateau alert must not fire
        self.cost_spent = Gauge(
            "pairsieve_budget_cost_spent",
            "Budget unit cost: cost units spent (the expected costs of the accepts, every "
            "worker's); 0 with budget unit items.", registry=r)
        self.expected_cost = Gauge(
            "pairsieve_expected_cost",
            "Expected cost of one more answer about an item of the modality (mean of its "
            "answers' AlignmentLabel.cost, prior 1).", ["modality"], registry=r)
        self.trainer = Gauge(
            "pairsieve_trainer",
            "1 when this worker trains the shared model lineage (it holds the labels partition).",
            registry=r)
        # --- transports
        self.grpc_requests = Counter(
            "pairsieve_grpc_requests_total",
            "gRPC requests handled, by method (short RPC name) and status code.",
            ["method", "code"], registry=r)
        self.grpc_duration = Histogram(
            "pairsieve_grpc_request_duration_seconds",
            "Time to handle one gRPC request, by method, in seconds.",
            ["method"], buckets=GRPC_BUCKETS_S, registry=r)
        self.grpc_submit_batch_calls = Histogram(
            "pairsieve_grpc_submit_batch_calls",
            "Submit/SubmitStream calls decided together as one engine batch.",
            buckets=SUBMIT_BATCH_CALL_BUCKETS, registry=r)
        self.consumer_lag_gauge = Gauge(
            "pairsieve_consumer_lag",
            "Messages between the consumer group's committed offset and the end of the topic.",
            ["topic"], registry=r)
        # --- runtime
        self.scorer_device_info = Gauge(
            "pairsieve_scorer_device_info",
            "1 for the torch device the scorer runs on (cpu|cuda|mps|xpu).",
            ["device"], registry=r)
        self.scorer_gpu_fallback = Gauge(
            "pairsieve_scorer_gpu_fallback",
            "1 when a GPU was expected but the scorer runs on the CPU, else 0.", registry=r)
        self.publisher_idempotent_gauge = Gauge(
            "pairsieve_publisher_idempotent",
            "1 when the publisher is idempotent (a retry never writes a record twice), else 0.",
            registry=r)
        self.up = Gauge(
            "pairsieve_up", "1 while the service is serving, 0 otherwise.", registry=r)
        self.build_info = Gauge(
            "pairsieve_build_info", "Always 1; the version label is the service version.",
            ["version"], registry=r)

        if version is None:
            from service import __version__ as version
        self.build_info.labels(version=str(version)).set(1)
        self.budget_remaining.set(NAN)
        self.budget_limit.set(NAN)
        self.threshold.set(NAN)
        self.modality_imbalance.set(NAN)

    # ================================================================ MetricsSink
    def batch_decided(self, outcomes: Sequence[Any], latencies_s: Sequence[float],
                      scoring_s: float) -> None:
        """One batch was decided: ``outcomes`` are ``service.messages.Outcome`` objects.

        Aggregated per batch (one ``inc(n)`` per label set, one bulk observe per histogram child)
        so the per-event cost on the event loop is a few dict updates.
        """
        received: Tally = Tally()
        decided: Tally = Tally()
        values: dict[tuple[str, str], list[float]] = defaultdict(list)  # (component, modality)
        for out in outcomes:
            d = out.decision
            mod = self._modality(d.modality)
            if out.duplicate:
                received[(mod, "duplicate")] += 1
                decided[(mod, "skip", "duplicate")] += 1
                continue
            decision = "accept" if d.accept else "skip"
            received[(mod, "accepted" if d.accept else "skipped")] += 1
            decided[(mod, decision, self._reason(decision, d.reason))] += 1
            values[("utility", mod)].append(d.utility)
            values[("uncertainty", mod)].append(d.uncertainty)
            values[("diversity", mod)].append(d.diversity)
            values[("coverage_bonus", mod)].append(d.coverage_bonus)
            values[("typicality", mod)].append(d.typicality)
        for key, n in received.items():
            self.events_received.labels(*key).inc(n)
        for key, n in decided.items():
            self.decisions.labels(*key).inc(n)
        for (component, mod), vals in values.items():
            child = self.utility.labels(mod) if component == "utility" \
                else self.score.labels(component, mod)
            observe_many(child, vals)
        lat = np.array([x for x in latencies_s if x is not None], dtype=np.float64)
        observe_many(self.decision_latency, np.maximum(lat, 0.0))
        if scoring_s and scoring_s > 0:  # 0: every event was a duplicate, nothing was scored
            self.scoring_duration.observe(float(scoring_s))
        if outcomes and not self._adapter_batch_sizes:
            self.micro_batch_size.observe(len(outcomes))

    def engine_state(self, status: EngineStatus) -> None:
        """The engine's state (``SelectionHandler.status()``, an :class:`EngineStatus`).

        Raises
        ------
        TypeError
            If ``status`` is not an :class:`EngineStatus` (the message names its type).
        """
        if not isinstance(status, EngineStatus):
            raise TypeError(f"engine_state needs an EngineStatus, got {type(status).__name__}")
        with self._lock:
            self.budget_spent.set(_num(status.spent))
            self.budget_remaining.set(_num(status.remaining))
            self.budget_limit.set(_num(status.budget_total))
            self.budget_unlimited.set(1 if status.budget_total is None else 0)
            self.acceptance_rate.set(_num(status.acceptance_rate))
            self.acceptance_rate_target.set(_num(status.target_rate))
            self.threshold.set(_num(status.threshold))
            self.model_version.set(_num(status.model_version))
            self.pairs_acquired.set(_num(status.pairs_acquired))
            self.trainer.set(1 if status.trainer else 0)
            self.cost_spent.set(_num(status.cost_spent))
            for m, c in status.expected_cost.items():
                self.expected_cost.labels(self._modality(m)).set(_num(c))
            for m, fill in status.cache_fill.items():
                self.cache_fill.labels(self._modality(m)).set(_num(fill))
            for m, cum in status.cache_evictions.items():
                self._evictions(m, float(cum))
            if status.accepted_per_modality:
                self._shares(status.accepted_per_modality)

    def labels_received(self, status: str, n: int = 1) -> None:
        """``n`` annotator answers of ``status`` (MATCH|NO_MATCH|UNSURE; else ``other``)."""
        if n < 0:
            raise ValueError(f"labels_received: n must be >= 0, got {n}")
        st = status if status in LABEL_STATUSES else OTHER
        self.labels.labels(st).inc(n)

    def labels_duplicate(self, n: int = 1) -> None:
        """``n`` re-sent answers (same request id) that were counted once already."""
        if n < 0:
            raise ValueError(f"labels_duplicate: n must be >= 0, got {n}")
        self.duplicate_labels.inc(n)

    def candidate_judged(self, outcome: str) -> None:
        """A candidate version's fate: published, rejected, failed or superseded (else other)."""
        known = ("published", "rejected", "failed", "superseded")
        self.model_candidates.labels(outcome if outcome in known else OTHER).inc()

    def model_quality(self, recall: Mapping[int, float], validation_pairs: int,
                      expected_gain: float = math.nan, horizon: int = 0) -> None:
        """The validation recall (k -> R@k) of the version now in use, its pair count, and the
        stopping signal (expected R@1 gain of the next ``horizon`` pairs)."""
        with self._lock:
            for k in (1, 5):
                self.validation_recall.labels(str(k)).set(_num(recall.get(k, math.nan)))
            self.validation_pairs.set(_num(validation_pairs))
            self.expected_gain.set(_num(expected_gain))
            self.expected_gain_pairs.set(_num(horizon))

    def retrained(self, version: int, seconds: float, ok: bool) -> None:
        """A retrain finished (``ok``) or failed; ``version`` is the trained (or kept) version."""
        self.retrains.labels("ok" if ok else "error").inc()
        if seconds is not None and math.isfinite(seconds):
            self.retrain_duration.observe(max(0.0, float(seconds)))
        if ok:
            self.model_last_update.set(float(self.clock()))

    # ================================================================ transport hooks
    def dead_lettered(self, reason: str, modality: str = UNKNOWN) -> None:
        """An event went to the dead-letter topic. ``reason`` should be a short code
        (``decode_error``, ``invalid_vector``...: lower-case words joined by ``_``, at most 32
        distinct): anything else becomes ``other``. A modality the service does not know (given
        to the constructor, or seen on a decided item or in the engine state) becomes
        ``unknown``."""
        mod = self._modality.known(modality)
        self.events_received.labels(mod, "dead_letter").inc()
        self.dead_letters.labels(self._dl_reason(reason)).inc()

    def micro_batch(self, n: int) -> None:
        """Raw size of a micro-batch taken from the broker. From the first call on, this is
        the only source of ``pairsieve_micro_batch_size`` (``batch_decided`` stops observing)."""
        if n < 0:
            raise ValueError(f"micro_batch: n must be >= 0, got {n}")
        self._adapter_batch_sizes = True
        self.micro_batch_size.observe(n)

    def consumer_lag(self, topic: str, lag: float) -> None:
        """Messages the consumer group is behind on ``topic`` (negative clamped to 0)."""
        self.consumer_lag_gauge.labels(self._topic(topic)).set(max(0.0, float(lag)))

    def grpc_request(self, method: str, code: Any, seconds: float) -> None:
        """One gRPC request: ``method`` is the short RPC name (a full ``/pkg.Service/Method``
        path is cut to ``Method``); ``code`` a status name or ``grpc.StatusCode``."""
        short = self._method(str(method).rsplit("/", 1)[-1])
        name = getattr(code, "name", code)
        name = str(name).upper()
        self.grpc_requests.labels(short, name if name in GRPC_CODES else "UNKNOWN").inc()
        if seconds is not None and math.isfinite(seconds):
            self.grpc_duration.labels(short).observe(max(0.0, float(seconds)))

    def grpc_submit_batch(self, calls: int) -> None:
        """``calls`` concurrent gRPC ``Submit`` calls were decided as one engine batch."""
        self.grpc_submit_batch_calls.observe(int(calls))

    def scorer_device(self, device: Any, gpu_expected: bool = False) -> None:
        """The scorer's torch device (``"cpu"``, ``"cuda"``, ``"cuda:0"``, ``torch.device``...).

        ``pairsieve_scorer_gpu_fallback`` is 1 when ``gpu_expected`` and the device is the CPU.
        """
        dev = str(getattr(device, "type", device)).split(":", 1)[0].lower()
        dev = dev if dev in DEVICES else OTHER
        with self._lock:
            if self._device is not None and self._device != dev:
                self.scorer_device_info.remove(self._device)
            self._device = dev
            self.scorer_device_info.labels(dev).set(1)
            self.scorer_gpu_fallback.set(1 if gpu_expected and dev == "cpu" else 0)

    def publisher_idempotent(self, idempotent: bool) -> None:
        """``pairsieve_publisher_idempotent``: what the broker granted the publisher."""
        self.publisher_idempotent_gauge.set(1 if idempotent else 0)

    def set_serving(self, up: bool) -> None:
        """``pairsieve_up``: 1 while serving (set after start-up, cleared first at shutdown)."""
        self.up.set(1 if up else 0)

    # ================================================================ helpers
    @staticmethod
    def _reason(decision: str, reason: str) -> str:
        prefix, _, code = str(reason).partition(":")
        if prefix == decision and code in DECISION_REASONS[decision]:
            return code
        return OTHER


    def _evictions(self, modality: str, cumulative: float) -> None:
        mod = self._modality(modality)
        last = self._evictions_seen.get(mod, 0.0)
        delta = cumulative - last if cumulative >= last else cumulative  # lower: source reset
        self._evictions_seen[mod] = cumulative
        # create the series even at 0 so the panel shows a flat line rather than "no data"
        child = self.cache_evictions.labels(mod)
        if delta > 0:
            child.inc(delta)

    def _shares(self, accepts: Mapping[str, Any]) -> None:
        total = float(sum(accepts.values()))
        shares = {self._modality(m): (float(v) / total if total > 0 else NAN)
                  for m, v in accepts.items()}
        for m, s in shares.items():
            self.modality_share.labels(m).set(s)
        if total > 0:
            vals = list(shares.values())
            self.modality_imbalance.set(max(vals) - min(vals) if len(vals) > 1 else 0.0)
        else:
            self.modality_imbalance.set(NAN)


# ==================================================================== exposition
def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "0.0.0.0"):
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    Returns ``(server, thread)`` as ``prometheus_client.start_http_server`` does; with
    ``port=0`` the OS picks a free port, read back as ``server.server_port``. Stop it with
    :func:`stop_metrics_server`.
    """
    if registry is None:
        raise ValueError("start_metrics_server needs an explicit CollectorRegistry")
    server, thread = start_http_server(int(port), addr=host, registry=registry)
    return server, thread


def stop_metrics_server(server, thread: threading.Thread | None = None,
                        timeout_s: float = 5.0) -> None:
    """Stop a server started by :func:`start_metrics_server` and release its socket."""
    server.shutdown()
    server.server_close()
    if thread is not None:
        thread.join(timeout_s)


_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
}


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name ``registry`` exports (or will, once a labelled metric gets its first
    series): ``pairsieve_decisions_total``, ``pairsieve_decision_latency_seconds_bucket``... —
    the names a PromQL query can refer to."""
    names: set[str] = set()
    for fam in registry.collect():
        names.update(fam.name + s for s in _SUFFIXES.get(fam.type, ("",)))
        names.update(s.name for s in fam.samples)
    return names


def observe_many(hist, values) -> None:
    """``hist.observe(v)`` for every finite ``v`` of ``values``, in one pass.

    Bucket counts come from one ``searchsorted`` over the histogram's upper bounds (``v <= bound``
    as in ``Histogram.observe``), then one ``inc`` per touched bucket and one on the sum: the
    exposed samples equal those of observing the values one by one (up to float summation order
    in ``_sum``). Falls back to per-value ``observe`` if the prometheus_client internals it uses
    (``_upper_bounds``, ``_buckets``, ``_sum``) are not there.

    Shape: values (n,) -> nothing; NaN/inf are skipped, as the service never observes them.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if not len(v):
        return
    bounds, buckets = getattr(hist, "_upper_bounds", None), getattr(hist, "_buckets", None)
    if (bounds is None or buckets is None or not hasattr(hist, "_sum")
            or len(bounds) != len(buckets)):
        for x in v.tolist():
            hist.observe(x)
        return
    counts = np.bincount(np.searchsorted(np.asarray(bounds, dtype=np.float64), v, side="left"),
                         minlength=len(bounds))
    hist._sum.inc(float(v.sum()))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))
