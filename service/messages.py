"""The domain messages and ports, independent of any transport.

Everything the facade (:mod:`service.handlers`), the learning loop (:mod:`service.learning_loop`),
the converters (:mod:`service.wire.codecs`) and the adapters (Kafka, gRPC, metrics) exchange is
defined here, as plain frozen dataclasses and protocols. This module imports nothing from the
service but :mod:`service.core.types` and :mod:`service.core.budget_ledger` (both pure), so any
layer can depend on it.

Messages
--------
:class:`IncomingEvent` (a feature event in), :class:`Outcome` (its verdict),
:class:`AlignmentRequestOut` (an accepted item, to be published), :class:`Label` (an annotator's
answer), :class:`LabelResult` (what a label call did), :class:`TrainingPair` (an acquired pair,
the durable training set), :class:`ModelRelease` (a published model version) and
:class:`EngineStatus` (the engine's state, typed: a renamed field fails loudly at every
consumer).

Ports
-----
:class:`Publisher` (durable publication of alignment requests, training pairs and model
versions), :class:`MetricsSink` (what the
engine reports) and :class:`StreamMetricsSink` (what the Kafka stream processor reports; the gRPC
server's is ``service.rpc.server.GrpcMetrics``);
:class:`NullPublisher` and :class:`NullMetrics` are the do-nothing implementations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from service.core.budget_ledger import Grant
from service.core.types import Decision

__all__ = [
    "LABEL_STATUSES", "IncomingEvent", "Outcome", "AlignmentRequestOut", "Label", "LabelResult",
    "TrainingPair", "ModelRelease", "EngineStatus", "Publisher", "NullPublisher", "MetricsSink",
    "StreamMetricsSink", "NullMetrics", "SharedBudget",
]

#: The answers an annotator can give; only MATCH (with a partner) makes a training pair.
LABEL_STATUSES = ("MATCH", "NO_MATCH", "UNSURE")


# --------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class IncomingEvent:
    """A decoded, not yet validated feature event (see ``FeatureEvent`` in the proto).

    Attributes
    ----------
    event_id : str
        Idempotency key: a redelivery with the same id gets the earlier decision.
    item_id : str
    modality : str
    vector : np.ndarray, shape (dim,)
        Raw feature vector of ``modality``.
    event_time : float or None
        Seconds since the epoch (for the decision latency), when the producer set it.
    source : str
    metadata : dict[str, str]
    """

    event_id: str
    item_id: str
    modality: str
    vector: np.ndarray
    event_time: float | None = None  # seconds since the epoch
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """The verdict on one event, with its transport-level context.

    Attributes
    ----------
    event_id : str
    decision : Decision
    duplicate : bool
        True when the event was decided before (redelivery): nothing was spent again.
    worker_id : str
        The worker that made the decision.
    """

    event_id: str
    decision: Decision
    duplicate: bool = False
    worker_id: str = ""


@dataclass(frozen=True)
class AlignmentRequestOut:
    """An accepted item to be sent for alignment (see ``AlignmentRequest`` in the proto).

    Attributes
    ----------
    request_id, item_id, modality : str
    vector : np.ndarray, shape (dim,)
        The item's raw vector (other workers fold it into their caches).
    candidates : list of (str, float)
        Likely partners (item id, similarity), best first.
    outcome : Outcome
    requested_at : float
        Seconds since the epoch.
    metadata : dict[str, str]
    """

    request_id: str
    item_id: str
    modality: str
    vector: np.ndarray
    candidates: list[tuple[str, float]]
    outcome: Outcome
    requested_at: float
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Label:
    """An annotator's answer (see ``AlignmentLabel``); ``status`` is MATCH, NO_MATCH or UNSURE.

    Attributes
    ----------
    item_id, modality : str
        The item that was sent for alignment.
    partner_item_id : str
        The item of the other modality it was matched with ("" when none).
    status : str
        One of :data:`LABEL_STATUSES`.
    request_id, annotator : str
    cost : float
    partner_vector : np.ndarray, shape (dim_other,), or None
        The partner's raw vector, when the partner was never seen in the stream.
    labeled_at : float or None
        Seconds since the epoch, when the annotator answered (None: unknown).
    """

    item_id: str
    modality: str
    partner_item_id: str
    status: str
    request_id: str = ""
    annotator: str = ""
    cost: float = 1.0
    partner_vector: np.ndarray | None = None
    labeled_at: float | None = None


@dataclass(frozen=True)
class LabelResult:
    """What a label call did.

    Attributes
    ----------
    accepted : int
        MATCH labels that became (or replaced) a training pair.
    ignored : int
        NO_MATCH and UNSURE labels (counted; no pair).
    model_version : int
        The model in use after the call.
    duplicates : int
        Labels whose request id was taken in before (counted once, nothing changed).
    unresolved : tuple of str
        One message per MATCH label whose item or partner vector is unknown (no pair; the Kafka
        path dead-letters them with reason ``label_unresolved``).
    """

    accepted: int
    ignored: int
    model_version: int
    duplicates: int = 0
    unresolved: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainingPair:
    """One acquired training pair: a MATCH label resolved to both raw vectors.

    Side ``a`` is the first configured modality, side ``b`` the second, whichever side the label
    was about, so a pair labelled from either side has one key.

    Attributes
    ----------
    item_id_a, item_id_b : str
    vector_a : np.ndarray, shape (d_a,)
    vector_b : np.ndarray, shape (d_b,)
    request_id, annotator : str
    cost : float
    labeled_at : float or None
        Seconds since the epoch.
    worker_id : str
        The worker that resolved the label.
    labeled_item_id : str
        The item the label was about (``item_id_a`` or ``item_id_b``).
    partnerless : bool
        A NO_MATCH, not a pair: only the labelled side is set (the other id is ``""`` and its
        vector has shape (0,)); the selector lowers the utility of items like it.
    """

    item_id_a: str
    item_id_b: str
    vector_a: np.ndarray
    vector_b: np.ndarray
    request_id: str = ""
    annotator: str = ""
    cost: float = 1.0
    labeled_at: float | None = None
    worker_id: str = ""
    labeled_item_id: str = ""
    partnerless: bool = False

    @property
    def key(self) -> tuple[str, str]:
        """``(item_id_a, item_id_b)``: one pair, one key."""
        return (self.item_id_a, self.item_id_b)


@dataclass(frozen=True)
class ModelRelease:
    """A model version as published to every worker (see ``ModelVersion`` in the proto).

    Attributes
    ----------
    model : Any
        The :class:`~service.alignment.AlignmentModel` (``version``, ``n_pairs`` = training
        pairs it was fitted on).
    pairs_seen : int
        Pairs in the store when it was trained (validation pairs included): a worker that takes
        over training counts new pairs from here.
    validation_pairs : int
    validation_recall : Mapping[int, float]
        k -> R@k on the validation pairs (mean of both directions), at gate time.
    worker_id : str
        The worker that trained it.
    trained_at : float
        Seconds since the epoch.
    history : tuple of (int, float, int)
        The lineage's learning curve up to this version, oldest first: (training pairs, R@1 on
        the validation pairs of the time, validation pairs). The stopping signal is fitted on it.
    """

    model: Any
    pairs_seen: int
    validation_pairs: int
    validation_recall: Mapping[int, float]
    worker_id: str
    trained_at: float
    history: tuple[tuple[int, float, int], ...] = ()

    @property
    def version(self) -> int:
        return int(self.model.version)


def _frozen_map(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class EngineStatus:
    """The engine's state at one moment (``SelectionHandler.status()``).

    Per-modality mappings are read-only copies (``MappingProxyType``); they compare equal to
    plain dicts. :meth:`as_dict` gives plain nested dicts (e.g. for JSON).

    Attributes
    ----------
    worker_id : str
    spent : int
        Selections counted against the budget (this worker's and those folded in from others).
    remaining : int or None
        Budget left; None = unlimited. With a shared budget (the budget ledger), the smaller of
        this worker's count and the units the ledger has left.
    budget_total : int or None
        None = unlimited.
    seen : int
        Events decided by this worker.
    acceptance_rate : float
    target_rate : float
    threshold : float
        Current utility threshold (NaN during warm-up).
    model_version : int
    pairs_acquired : int
        Training pairs (distinct MATCH labels with both vectors known).
    accepted_per_modality, seen_per_modality : Mapping[str, int]
    cache_fill : Mapping[str, float]
        Fill ratio in [0, 1] of each modality's selected-set cache.
    cache_evictions : Mapping[str, int]
        Cumulative evictions per modality.
    labels : Mapping[str, int]
        Labels received per status (:data:`LABEL_STATUSES`).
    dims : Mapping[str, int]
        Raw vector dimension per modality.
    validation_recall : Mapping[int, float]
        k -> R@k of the model in use on the held-out acquired pairs (empty before any).
    validation_pairs : int
        Acquired pairs held out for validation (never trained on).
    trainer : bool
        Whether this worker trains the shared model lineage now.
    expected_gain, expected_gain_se : float
        Expected R@1 gain of the next ``expected_gain_pairs`` pairs and its standard error
        (NaN until the learning curve has three points).
    expected_gain_pairs : int
    budget_unit : str
        ``items`` (``spent``/``remaining`` count requests) or ``cost``.
    cost_spent : float
        Cost units spent (expected costs of the accepts; budget unit ``cost``).
    cost_total : float or None
        The budget in cost units (None: unlimited, or budget unit ``items``).
    expected_cost : Mapping[str, float]
        Per modality: the expected cost of one more answer (mean of its answers' costs, prior 1).
    """

    worker_id: str
    spent: int
    remaining: int | None
    budget_total: int | None
    seen: int
    acceptance_rate: float
    target_rate: float
    threshold: float
    model_version: int
    pairs_acquired: int
    accepted_per_modality: Mapping[str, int]
    seen_per_modality: Mapping[str, int]
    cache_fill: Mapping[str, float]
    cache_evictions: Mapping[str, int]
    labels: Mapping[str, int]
    dims: Mapping[str, int]
    validation_recall: Mapping[int, float] = field(default_factory=dict)
    validation_pairs: int = 0
    trainer: bool = True
    expected_gain: float = float("nan")
    expected_gain_se: float = float("nan")
    expected_gain_pairs: int = 0
    budget_unit: str = "items"
    cost_spent: float = 0.0
    cost_total: float | None = None
    expected_cost: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("accepted_per_modality", "seen_per_modality", "cache_fill",
                     "cache_evictions", "labels", "dims", "validation_recall", "expected_cost"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(f"EngineStatus.{name} must be a mapping, got {value!r}")
            object.__setattr__(self, name, _frozen_map(value))

    @classmethod
    def from_selector(cls, selector_status: Mapping[str, Any], *, worker_id: str,
                      pairs_acquired: int, budget_total: int | None, target_rate: float,
                      labels: Mapping[str, int], dims: Mapping[str, int],
                      validation_recall: Mapping[int, float] | None = None,
                      validation_pairs: int = 0, trainer: bool = True,
                      expected_gain: float = float("nan"), expected_gain_se: float = float("nan"),
                      expected_gain_pairs: int = 0) -> EngineStatus:
        """Combine ``StreamingSelector.status()`` (a plain dict) with the facade's fields.

        Raises
        ------
        KeyError
            If the selector's status lacks a field (the message names it).
        """
        st = selector_status
        try:
            return cls(worker_id=worker_id, spent=st["spent"], remaining=st["remaining"],
                       budget_total=budget_total, seen=st["seen"],
                       acceptance_rate=st["acceptance_rate"], target_rate=target_rate,
                       threshold=st["threshold"], model_version=st["model_version"],
                       pairs_acquired=pairs_acquired,
                       accepted_per_modality=st["accepted_per_modality"],
                       seen_per_modality=st["seen_per_modality"], cache_fill=st["cache_fill"],
                       cache_evictions=st["cache_evictions"], labels=labels, dims=dims,
                       validation_recall=validation_recall or {},
                       validation_pairs=validation_pairs, trainer=trainer,
                       expected_gain=expected_gain, expected_gain_se=expected_gain_se,
                       expected_gain_pairs=expected_gain_pairs,
                       budget_unit=st.get("budget_unit", "items"),
                       cost_spent=st.get("cost_spent", 0.0), cost_total=st.get("cost_total"),
                       expected_cost=st.get("expected_cost", {}))
        except KeyError as exc:
            raise KeyError(f"selector status has no {exc.args[0]!r}; "
                           f"keys: {sorted(selector_status)}") from None

    def as_dict(self) -> dict[str, Any]:
        """Plain-data copy: field name -> value, mappings as plain dicts."""
        return {name: dict(v) if isinstance(v, Mapping) else v
                for name, v in ((f, getattr(self, f)) for f in self.__dataclass_fields__)}


# --------------------------------------------------------------------------- ports
class PartialPublish(RuntimeError):
    """A publish of several records failed after some of them were durably written.

    Attributes
    ----------
    acked : tuple of int
        Indices (into the records given) that the broker acknowledged: they are on the topic
        and every reader will see them, so the caller must account for them as published.
    """

    def __init__(self, acked: Sequence[int], cause: BaseException):
        super().__init__(f"{len(acked)} record(s) written before the publish failed: {cause!r}")
        self.acked = tuple(acked)
        self.cause = cause


class SharedBudget(Protocol):
    """One budget shared by several workers (the budget ledger in the service,
    ``service.streaming.budget_reservations``).

    :meth:`reserve` answers, per event id about to be requested, its
    :class:`~service.core.budget_ledger.Grant` (truthy: it holds a unit; ``FOREIGN``: another
    worker process reserved it first); it raises :class:`PartialPublish` (retryable, nothing
    acknowledged) when it cannot tell. :meth:`units_left` is what the shared total has left as
    far as this worker has read.
    """

    async def reserve(self, event_ids: Sequence[str]) -> list[Grant]: ...

    def units_left(self) -> int: ...


class Publisher(Protocol):
    """Where accepted items, decisions, acquired pairs and model versions go (topics, in the
    service).

    Every method returns only once its records are durably written, and raises if that cannot
    be guaranteed (the caller then changes no state). When some records of a call were written
    before the failure, it raises :class:`PartialPublish` naming them.
    """

    async def publish_requests(self, requests: Sequence[AlignmentRequestOut]) -> None: ...
    async def publish_decisions(self, outcomes: Sequence[Outcome], decided_at: float) -> None: ...
    async def publish_pairs(self, pairs: Sequence[TrainingPair]) -> None: ...
    async def publish_model(self, release: ModelRelease) -> None: ...


class NullPublisher:
    """Publishes nowhere (one process, nothing shared: pool-only, offline or simulated use)."""

    async def publish_requests(self, requests: Sequence[AlignmentRequestOut]) -> None:
        return None

    async def publish_decisions(self, outcomes: Sequence[Outcome], decided_at: float) -> None:
        return None

    async def publish_pairs(self, pairs: Sequence[TrainingPair]) -> None:
        return None

    async def publish_model(self, release: ModelRelease) -> None:
        return None


class MetricsSink(Protocol):
    """What the engine (facade and learning loop) reports; ``service.observability``
    implements it over Prometheus."""

    def batch_decided(self, outcomes: Sequence[Outcome], latencies_s: Sequence[float],
                      scoring_s: float) -> None: ...
    def engine_state(self, status: EngineStatus) -> None: ...
    def labels_received(self, status: str, n: int = 1) -> None: ...
    def labels_duplicate(self, n: int = 1) -> None: ...
    def retrained(self, version: int, seconds: float, ok: bool) -> None: ...
    def candidate_judged(self, outcome: str) -> None: ...
    def model_quality(self, recall: Mapping[int, float], validation_pairs: int,
                      expected_gain: float = float("nan"), horizon: int = 0) -> None: ...


class StreamMetricsSink(Protocol):
    """What the Kafka stream processor reports (``PairsieveMetrics`` implements it too)."""

    def dead_lettered(self, reason: str, modality: str = "unknown") -> None: ...
    def micro_batch(self, n: int) -> None: ...
    def consumer_lag(self, topic: str, lag: float) -> None: ...


class NullMetrics:
    """Reports nowhere (the engine's :class:`MetricsSink`)."""

    def batch_decided(self, outcomes, latencies_s, scoring_s) -> None: ...
    def engine_state(self, status) -> None: ...
    def labels_received(self, status, n=1) -> None: ...
    def labels_duplicate(self, n=1) -> None: ...
    def retrained(self, version, seconds, ok) -> None: ...
    def candidate_judged(self, outcome) -> None: ...
    def model_quality(self, recall, validation_pairs, expected_gain=float("nan"),
                      horizon=0) -> None: ...
