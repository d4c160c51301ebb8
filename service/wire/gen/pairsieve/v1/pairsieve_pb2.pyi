import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AlignmentStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALIGNMENT_STATUS_UNSPECIFIED: _ClassVar[AlignmentStatus]
    MATCH: _ClassVar[AlignmentStatus]
    NO_MATCH: _ClassVar[AlignmentStatus]
    UNSURE: _ClassVar[AlignmentStatus]
ALIGNMENT_STATUS_UNSPECIFIED: AlignmentStatus
MATCH: AlignmentStatus
NO_MATCH: AlignmentStatus
UNSURE: AlignmentStatus

class FeatureEvent(_message.Message):
    __slots__ = ("event_id", "item_id", "modality", "vector", "dim", "source", "event_time", "encoder_version", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    ENCODER_VERSION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    item_id: str
    modality: str
    vector: bytes
    dim: int
    source: str
    event_time: _timestamp_pb2.Timestamp
    encoder_version: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, event_id: _Optional[str] = ..., item_id: _Optional[str] = ..., modality: _Optional[str] = ..., vector: _Optional[bytes] = ..., dim: _Optional[int] = ..., source: _Optional[str] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., encoder_version: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class FeatureBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[FeatureEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[FeatureEvent, _Mapping]]] = ...) -> None: ...

class ScoreComponents(_message.Message):
    __slots__ = ("uncertainty", "diversity", "coverage_bonus", "margin", "entropy", "least_confidence", "typicality", "partnerless")
    UNCERTAINTY_FIELD_NUMBER: _ClassVar[int]
    DIVERSITY_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_BONUS_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    LEAST_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    TYPICALITY_FIELD_NUMBER: _ClassVar[int]
    PARTNERLESS_FIELD_NUMBER: _ClassVar[int]
    uncertainty: float
    diversity: float
    coverage_bonus: float
    margin: float
    entropy: float
    least_confidence: float
    typicality: float
    partnerless: float
    def __init__(self, uncertainty: _Optional[float] = ..., diversity: _Optional[float] = ..., coverage_bonus: _Optional[float] = ..., margin: _Optional[float] = ..., entropy: _Optional[float] = ..., least_confidence: _Optional[float] = ..., typicality: _Optional[float] = ..., partnerless: _Optional[float] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("event_id", "item_id", "modality", "accept", "utility", "components", "threshold", "model_version", "reason", "duplicate", "worker_id", "cost")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    UTILITY_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    item_id: str
    modality: str
    accept: bool
    utility: float
    components: ScoreComponents
    threshold: float
    model_version: int
    reason: str
    duplicate: bool
    worker_id: str
    cost: float
    def __init__(self, event_id: _Optional[str] = ..., item_id: _Optional[str] = ..., modality: _Optional[str] = ..., accept: _Optional[bool] = ..., utility: _Optional[float] = ..., components: _Optional[_Union[ScoreComponents, _Mapping]] = ..., threshold: _Optional[float] = ..., model_version: _Optional[int] = ..., reason: _Optional[str] = ..., duplicate: _Optional[bool] = ..., worker_id: _Optional[str] = ..., cost: _Optional[float] = ...) -> None: ...

class DecisionRecord(_message.Message):
    __slots__ = ("decision", "decided_at", "decisions")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    decided_at: _timestamp_pb2.Timestamp
    decisions: _containers.RepeatedCompositeFieldContainer[Decision]
    def __init__(self, decision: _Optional[_Union[Decision, _Mapping]] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decisions: _Optional[_Iterable[_Union[Decision, _Mapping]]] = ...) -> None: ...

class PartnerCandidate(_message.Message):
    __slots__ = ("item_id", "similarity")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    similarity: float
    def __init__(self, item_id: _Optional[str] = ..., similarity: _Optional[float] = ...) -> None: ...

class AlignmentRequest(_message.Message):
    __slots__ = ("request_id", "item_id", "modality", "vector", "dim", "candidates", "decision", "worker_id", "requested_at", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_AT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    item_id: str
    modality: str
    vector: bytes
    dim: int
    candidates: _containers.RepeatedCompositeFieldContainer[PartnerCandidate]
    decision: Decision
    worker_id: str
    requested_at: _timestamp_pb2.Timestamp
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., item_id: _Optional[str] = ..., modality: _Optional[str] = ..., vector: _Optional[bytes] = ..., dim: _Optional[int] = ..., candidates: _Optional[_Iterable[_Union[PartnerCandidate, _Mapping]]] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ..., worker_id: _Optional[str] = ..., requested_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AlignmentLabel(_message.Message):
    __slots__ = ("request_id", "item_id", "modality", "partner_item_id", "status", "annotator", "cost", "partner_vector", "partner_dim", "labeled_at")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    PARTNER_ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    PARTNER_VECTOR_FIELD_NUMBER: _ClassVar[int]
    PARTNER_DIM_FIELD_NUMBER: _ClassVar[int]
    LABELED_AT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    item_id: str
    modality: str
    partner_item_id: str
    status: AlignmentStatus
    annotator: str
    cost: float
    partner_vector: bytes
    partner_dim: int
    labeled_at: _timestamp_pb2.Timestamp
    def __init__(self, request_id: _Optional[str] = ..., item_id: _Optional[str] = ..., modality: _Optional[str] = ..., partner_item_id: _Optional[str] = ..., status: _Optional[_Union[AlignmentStatus, str]] = ..., annotator: _Optional[str] = ..., cost: _Optional[float] = ..., partner_vector: _Optional[bytes] = ..., partner_dim: _Optional[int] = ..., labeled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class TrainingPair(_message.Message):
    __slots__ = ("item_id_a", "item_id_b", "modality_a", "modality_b", "vector_a", "dim_a", "vector_b", "dim_b", "request_id", "annotator", "cost", "labeled_at", "worker_id", "labeled_item_id", "partnerless")
    ITEM_ID_A_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_B_FIELD_NUMBER: _ClassVar[int]
    MODALITY_A_FIELD_NUMBER: _ClassVar[int]
    MODALITY_B_FIELD_NUMBER: _ClassVar[int]
    VECTOR_A_FIELD_NUMBER: _ClassVar[int]
    DIM_A_FIELD_NUMBER: _ClassVar[int]
    VECTOR_B_FIELD_NUMBER: _ClassVar[int]
    DIM_B_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    LABELED_AT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LABELED_ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    PARTNERLESS_FIELD_NUMBER: _ClassVar[int]
    item_id_a: str
    item_id_b: str
    modality_a: str
    modality_b: str
    vector_a: bytes
    dim_a: int
    vector_b: bytes
    dim_b: int
    request_id: str
    annotator: str
    cost: float
    labeled_at: _timestamp_pb2.Timestamp
    worker_id: str
    labeled_item_id: str
    partnerless: bool
    def __init__(self, item_id_a: _Optional[str] = ..., item_id_b: _Optional[str] = ..., modality_a: _Optional[str] = ..., modality_b: _Optional[str] = ..., vector_a: _Optional[bytes] = ..., dim_a: _Optional[int] = ..., vector_b: _Optional[bytes] = ..., dim_b: _Optional[int] = ..., request_id: _Optional[str] = ..., annotator: _Optional[str] = ..., cost: _Optional[float] = ..., labeled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., worker_id: _Optional[str] = ..., labeled_item_id: _Optional[str] = ..., partnerless: _Optional[bool] = ...) -> None: ...

class RecallAtK(_message.Message):
    __slots__ = ("k", "recall")
    K_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    k: int
    recall: float
    def __init__(self, k: _Optional[int] = ..., recall: _Optional[float] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "training_pairs", "pairs_seen", "validation_pairs", "validation_recall", "worker_id", "trained_at", "checkpoint", "history")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINING_PAIRS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_SEEN_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_PAIRS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_RECALL_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TRAINED_AT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    version: int
    training_pairs: int
    pairs_seen: int
    validation_pairs: int
    validation_recall: _containers.RepeatedCompositeFieldContainer[RecallAtK]
    worker_id: str
    trained_at: _timestamp_pb2.Timestamp
    checkpoint: bytes
    history: _containers.RepeatedCompositeFieldContainer[CurvePoint]
    def __init__(self, version: _Optional[int] = ..., training_pairs: _Optional[int] = ..., pairs_seen: _Optional[int] = ..., validation_pairs: _Optional[int] = ..., validation_recall: _Optional[_Iterable[_Union[RecallAtK, _Mapping]]] = ..., worker_id: _Optional[str] = ..., trained_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., checkpoint: _Optional[bytes] = ..., history: _Optional[_Iterable[_Union[CurvePoint, _Mapping]]] = ...) -> None: ...

class CurvePoint(_message.Message):
    __slots__ = ("training_pairs", "recall_at_1", "validation_pairs")
    TRAINING_PAIRS_FIELD_NUMBER: _ClassVar[int]
    RECALL_AT_1_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_PAIRS_FIELD_NUMBER: _ClassVar[int]
    training_pairs: int
    recall_at_1: float
    validation_pairs: int
    def __init__(self, training_pairs: _Optional[int] = ..., recall_at_1: _Optional[float] = ..., validation_pairs: _Optional[int] = ...) -> None: ...

class BudgetReservation(_message.Message):
    __slots__ = ("reservation_id", "worker_id", "event_ids", "reserved_at", "holder")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_IDS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_AT_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    worker_id: str
    event_ids: _containers.RepeatedScalarFieldContainer[str]
    reserved_at: _timestamp_pb2.Timestamp
    holder: str
    def __init__(self, reservation_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., event_ids: _Optional[_Iterable[str]] = ..., reserved_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., holder: _Optional[str] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("reason", "detail", "original", "source_topic", "source_partition", "source_offset", "failed_at", "original_omitted", "original_sha256", "original_size")
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOPIC_FIELD_NUMBER: _ClassVar[int]
    SOURCE_PARTITION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    FAILED_AT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_OMITTED_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_SHA256_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    reason: str
    detail: str
    original: bytes
    source_topic: str
    source_partition: int
    source_offset: int
    failed_at: _timestamp_pb2.Timestamp
    original_omitted: bool
    original_sha256: str
    original_size: int
    def __init__(self, reason: _Optional[str] = ..., detail: _Optional[str] = ..., original: _Optional[bytes] = ..., source_topic: _Optional[str] = ..., source_partition: _Optional[int] = ..., source_offset: _Optional[int] = ..., failed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., original_omitted: _Optional[bool] = ..., original_sha256: _Optional[str] = ..., original_size: _Optional[int] = ...) -> None: ...

class ModalityStatus(_message.Message):
    __slots__ = ("modality", "dim", "seen", "accepted", "cache_fill", "cache_evictions")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    CACHE_FILL_FIELD_NUMBER: _ClassVar[int]
    CACHE_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    modality: str
    dim: int
    seen: int
    accepted: int
    cache_fill: float
    cache_evictions: int
    def __init__(self, modality: _Optional[str] = ..., dim: _Optional[int] = ..., seen: _Optional[int] = ..., accepted: _Optional[int] = ..., cache_fill: _Optional[float] = ..., cache_evictions: _Optional[int] = ...) -> None: ...

class ServiceStatus(_message.Message):
    __slots__ = ("worker_id", "budget_total", "budget_spent", "budget_remaining", "acceptance_rate", "target_rate", "threshold", "model_version", "pairs_acquired", "modalities", "serving", "validation_recall", "validation_pairs", "trainer", "expected_gain", "expected_gain_se", "expected_gain_pairs", "budget_unit", "cost_spent", "cost_total", "expected_cost")
    class ExpectedCostEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SPENT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_REMAINING_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    TARGET_RATE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAIRS_ACQUIRED_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_RECALL_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_PAIRS_FIELD_NUMBER: _ClassVar[int]
    TRAINER_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_GAIN_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_GAIN_SE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_GAIN_PAIRS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_UNIT_FIELD_NUMBER: _ClassVar[int]
    COST_SPENT_FIELD_NUMBER: _ClassVar[int]
    COST_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_COST_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    budget_total: int
    budget_spent: int
    budget_remaining: int
    acceptance_rate: float
    target_rate: float
    threshold: float
    model_version: int
    pairs_acquired: int
    modalities: _containers.RepeatedCompositeFieldContainer[ModalityStatus]
    serving: bool
    validation_recall: _containers.RepeatedCompositeFieldContainer[RecallAtK]
    validation_pairs: int
    trainer: bool
    expected_gain: float
    expected_gain_se: float
    expected_gain_pairs: int
    budget_unit: str
    cost_spent: float
    cost_total: float
    expected_cost: _containers.ScalarMap[str, float]
    def __init__(self, worker_id: _Optional[str] = ..., budget_total: _Optional[int] = ..., budget_spent: _Optional[int] = ..., budget_remaining: _Optional[int] = ..., acceptance_rate: _Optional[float] = ..., target_rate: _Optional[float] = ..., threshold: _Optional[float] = ..., model_version: _Optional[int] = ..., pairs_acquired: _Optional[int] = ..., modalities: _Optional[_Iterable[_Union[ModalityStatus, _Mapping]]] = ..., serving: _Optional[bool] = ..., validation_recall: _Optional[_Iterable[_Union[RecallAtK, _Mapping]]] = ..., validation_pairs: _Optional[int] = ..., trainer: _Optional[bool] = ..., expected_gain: _Optional[float] = ..., expected_gain_se: _Optional[float] = ..., expected_gain_pairs: _Optional[int] = ..., budget_unit: _Optional[str] = ..., cost_spent: _Optional[float] = ..., cost_total: _Optional[float] = ..., expected_cost: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[FeatureEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[FeatureEvent, _Mapping]]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("decisions",)
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[Decision]
    def __init__(self, decisions: _Optional[_Iterable[_Union[Decision, _Mapping]]] = ...) -> None: ...

class PoolCandidate(_message.Message):
    __slots__ = ("item_id", "modality", "vector", "dim")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    modality: str
    vector: bytes
    dim: int
    def __init__(self, item_id: _Optional[str] = ..., modality: _Optional[str] = ..., vector: _Optional[bytes] = ..., dim: _Optional[int] = ...) -> None: ...

class SelectPoolRequest(_message.Message):
    __slots__ = ("candidates", "budget", "strategy", "seed")
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    candidates: _containers.RepeatedCompositeFieldContainer[PoolCandidate]
    budget: int
    strategy: str
    seed: int
    def __init__(self, candidates: _Optional[_Iterable[_Union[PoolCandidate, _Mapping]]] = ..., budget: _Optional[int] = ..., strategy: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class SelectPoolResponse(_message.Message):
    __slots__ = ("selected_item_ids", "model_version")
    SELECTED_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    selected_item_ids: _containers.RepeatedScalarFieldContainer[str]
    model_version: int
    def __init__(self, selected_item_ids: _Optional[_Iterable[str]] = ..., model_version: _Optional[int] = ...) -> None: ...

class ReportAlignmentRequest(_message.Message):
    __slots__ = ("labels",)
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[AlignmentLabel]
    def __init__(self, labels: _Optional[_Iterable[_Union[AlignmentLabel, _Mapping]]] = ...) -> None: ...

class ReportAlignmentResponse(_message.Message):
    __slots__ = ("accepted", "ignored", "model_version", "duplicates", "unresolved")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    UNRESOLVED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    ignored: int
    model_version: int
    duplicates: int
    unresolved: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, accepted: _Optional[int] = ..., ignored: _Optional[int] = ..., model_version: _Optional[int] = ..., duplicates: _Optional[int] = ..., unresolved: _Optional[_Iterable[str]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
