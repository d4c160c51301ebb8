"""Converters between the protobuf wire messages and the domain dataclasses.

This is the only module that knows both worlds: the domain messages (``service.messages``), the
facade (``service.handlers``) and ``service.core`` never see a protobuf message, and the Kafka
(``service.streaming``) and gRPC (``service.rpc``) adapters never pick a message apart themselves.

Every decoding problem raises :class:`WireError` (a ``ValueError``) whose ``reason`` is one of
the dead-letter reason codes (:data:`REASONS`) and whose message names the bad value (dimension,
modality, field, sizes), so it can go to the dead-letter topic or into an ``INVALID_ARGUMENT``
status unchanged.

Vectors travel packed: little-endian float32, ``dim`` values (``4 * dim`` bytes).

Feature records on Kafka
------------------------
A record value of ``pairsieve.features.v1`` is a ``FeatureEvent`` or a ``FeatureBatch``.
Producers SHOULD set the header ``pairsieve-message`` to ``FeatureEvent`` or ``FeatureBatch``
(:data:`FEATURE_HEADER_EVENT`, :data:`FEATURE_HEADER_BATCH`). Without the header the value is
parsed as a ``FeatureEvent`` first; when that parse fails or yields an event without a vector
(a ``FeatureBatch`` read as a ``FeatureEvent`` only sets field 1, ``event_id``, so it never has
one), it is parsed as a ``FeatureBatch``; when that fails or is empty too, the ``FeatureEvent``
reading is validated and its error (e.g. ``missing_field: vector``) is reported. A batch is
all-or-nothing: one bad event rejects the whole record, naming the event's index.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from service.core import reasons
from service.core.types import Decision
from service.core.validation import MAX_ABS_FEATURE, MAX_ID_CHARS, vector_value_problem
from service.messages import (
    LABEL_STATUSES,
    AlignmentRequestOut,
    EngineStatus,
    IncomingEvent,
    Label,
    LabelResult,
    ModelRelease,
    Outcome,
    TrainingPair,
)
from service.wire.gen.pairsieve.v1 import pairsieve_pb2 as pb

__all__ = [
    "REASONS", "WireError", "pb", "FEATURE_HEADER", "FEATURE_HEADER_EVENT", "FEATURE_HEADER_BATCH",
    "encode_vector", "decode_vector", "event_from_proto", "event_to_proto", "events_from_protos",
    "decode_feature_record", "encode_feature_event", "encode_feature_batch",
    "decision_to_proto", "request_to_proto", "request_from_proto",
    "label_from_proto", "label_to_proto", "label_result_to_proto",
    "submit_request_from_proto", "submit_response_to_proto", "pool_request_from_proto",
    "status_to_proto", "dead_letter_bytes", "timestamp", "seconds", "pair_to_proto",
    "pair_from_proto", "pair_key_bytes", "model_release_to_proto", "model_release_from_proto",
    "MODEL_KEY", "decision_record_to_proto", "decision_records_to_proto",
    "decision_records_from_proto", "decisions_of", "DECISIONS_PER_RECORD",
]

REASONS = ("undecodable", "wrong_dimension", "non_finite", "unknown_modality", "missing_field",
           "oversized", "empty_batch", "rejected", "label_unresolved", "out_of_range",
           "zero_vector")
# rejected: refused by the engine itself; label_unresolved: a MATCH label whose item or partner
# vector is unknown (LearningLoop.resolve says which); out_of_range: a number outside its domain
# (a negative cost)

MODEL_KEY = b"model"
"""Record key of every ``ModelVersion`` on the models topic: compaction keeps the newest."""

FEATURE_HEADER = "pairsieve-message"
FEATURE_HEADER_EVENT: tuple[str, bytes] = (FEATURE_HEADER, b"FeatureEvent")
FEATURE_HEADER_BATCH: tuple[str, bytes] = (FEATURE_HEADER, b"FeatureBatch")

_LE_F32 = np.dtype("<f4")
_STATUS_TO_PB = {"MATCH": pb.MATCH, "NO_MATCH": pb.NO_MATCH, "UNSURE": pb.UNSURE}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}


class WireError(ValueError):
    """A wire message that cannot become a domain object.

    Attributes
    ----------
    reason : str
        One of :data:`REASONS` (the dead-letter reason code).
    """

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown wire error reason {reason!r}; expected one of {REASONS}")
        super().__init__(message)
        self.reason = reason

    def prefixed(self, prefix: str) -> WireError:
        """The same error with ``prefix`` in front of the message (e.g. the batch index)."""
        return WireError(self.reason, f"{prefix}{self}")


# --------------------------------------------------------------------------- small helpers
def timestamp(t: float | None):
    """Seconds since the epoch -> ``google.protobuf.Timestamp`` (``None`` -> ``None``)."""
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(round(float(t) * 1e9)))
    return ts


def seconds(msg, field: str) -> float | None:
    """The ``Timestamp`` field ``field`` of ``msg`` as float seconds, or ``None`` when unset."""
    if not msg.HasField(field):
        return None
    ts = getattr(msg, field)
    return ts.seconds + ts.nanos * 1e-9


def _require(msg, fields: Iterable[str], what: str) -> None:
    for f in fields:
        if not getattr(msg, f):
            raise WireError("missing_field", f"{what}: missing field {f!r}")


def _check_modality(modality: str, dims: Mapping[str, int], what: str) -> int:
    if modality not in dims:
        raise WireError("unknown_modality",
                        f"{what}: unknown modality {modality!r}; expected one of {sorted(dims)}")
    return int(dims[modality])


# --------------------------------------------------------------------------- vectors
def encode_vector(v) -> bytes:
    """Pack a vector as little-endian float32.

    Shape: ``v`` (d,) (any real dtype; cast to float32) -> ``4 * d`` bytes.
    """
    arr = np.asarray(v)
    if arr.ndim != 1:
        raise ValueError(f"encode_vector: expected shape (d,), got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=_LE_F32).tobytes()


def decode_vector(data: bytes, dim: int, *, what: str = "vector") -> np.ndarray:
    """Unpack ``dim`` little-endian float32 values; raise :class:`WireError` on a bad size or
    a NaN/inf.

    Shape: ``4 * dim`` bytes -> (dim,) native float32, C-contiguous, writable.
    """
    n = len(data)
    if n % 4:
        raise WireError("undecodable",
                        f"{what}: {n} bytes is not a whole number of float32 values "
                        f"(expected 4 * dim = {4 * dim} bytes for dim {dim})")
    if n != 4 * dim:
        raise WireError("wrong_dimension",
                        f"{what}: {n} bytes = {n // 4} float32 values, but dim is {dim} "
                        f"(expected {4 * dim} bytes)")
    vec = np.frombuffer(data, dtype=_LE_F32).astype(np.float32)  # copy: native order, writable
    err = vector_value_problem(vec, what)  # the core's format: first bad value, shape, dtype
    if err is not None:
        raise WireError("non_finite", str(err))
    return vec


# --------------------------------------------------------------------------- feature events
def _check_event(msg: pb.FeatureEvent, dims: Mapping[str, int]) -> tuple[int, str]:
    """Every check of a ``FeatureEvent`` but the values of its vector.

    Returns its dimension and how errors name it."""
    what = f"event {msg.event_id[:MAX_ID_CHARS]!r}" if msg.event_id else "event"
    _require(msg, ("event_id", "item_id", "modality"), what)
    for field_name in ("event_id", "item_id"):
        value = getattr(msg, field_name)
        if len(value) > MAX_ID_CHARS:
            raise WireError("out_of_range", f"{what}: {field_name} has {len(value)} characters "
                                            f"(at most {MAX_ID_CHARS})")
    expected = _check_modality(msg.modality, dims, what)
    if not msg.vector:
        raise WireError("missing_field", f"{what}: missing field 'vector'")
    if msg.dim != expected:
        raise WireError("wrong_dimension",
                        f"{what}: dim {msg.dim} but modality {msg.modality!r} has dimension "
                        f"{expected}")
    if len(msg.vector) != 4 * expected:
        decode_vector(msg.vector, expected, what=f"{what} vector")  # raises the size error
    return expected, what


_new_object = object.__new__


def _incoming(msg: pb.FeatureEvent, vec: np.ndarray) -> IncomingEvent:
    """The :class:`IncomingEvent` of a checked message: the same object as the dataclass's own
    constructor makes, at about half its cost (a frozen dataclass's generated ``__init__`` sets
    each field through ``object.__setattr__``; a batch builds hundreds)."""
    ev = _new_object(IncomingEvent)
    ev.__dict__.update(event_id=msg.event_id, item_id=msg.item_id, modality=msg.modality,
                       vector=vec, event_time=seconds(msg, "event_time"), source=msg.source,
                       metadata=dict(msg.metadata) if msg.metadata else {})
    return ev


def _passes_checks(msg: pb.FeatureEvent, dims: Mapping[str, int]) -> bool:
    """True when :func:`_check_event` would pass ``msg`` (the common case, without building
    the error's wording); False sends it to :func:`_check_event` for the error."""
    event_id, item_id, modality = msg.event_id, msg.item_id, msg.modality
    dim = dims.get(modality) if modality else None
    return (dim is not None and 0 < len(event_id) <= MAX_ID_CHARS
            and 0 < len(item_id) <= MAX_ID_CHARS and msg.dim == dim
            and len(msg.vector) == 4 * dim)


def event_from_proto(msg: pb.FeatureEvent, dims: Mapping[str, int]) -> IncomingEvent:
    """Validate a ``FeatureEvent`` against ``dims`` ({modality: dimension}) and decode it.

    An all-zero vector is refused (``zero_vector``): it has no direction, so its cosine to
    anything is undefined (an encoder that failed often emits one)."""
    if _passes_checks(msg, dims):  # the common case first, in one reduction over the values
        vec = np.frombuffer(msg.vector, dtype=_LE_F32).astype(np.float32)
        if vec.size and 0.0 < float(np.abs(vec).max()) <= MAX_ABS_FEATURE:  # NaN fails too
            return _incoming(msg, vec)
    expected, what = _check_event(msg, dims)  # the full checks: the error names the problem
    vec = decode_vector(msg.vector, expected, what=f"{what} vector")
    if not vec.any():
        raise WireError("zero_vector", f"{what} vector: all {expected} values are 0 (no "
                                       "direction: its cosine to anything is undefined)")
    return _incoming(msg, vec)


def events_from_protos(msgs: Sequence[pb.FeatureEvent], dims: Mapping[str, int]
                       ) -> list[IncomingEvent]:
    """Decode a batch, all-or-nothing: the first bad event raises, naming its index.

    The vectors of the whole batch are unpacked and checked for NaN/inf/huge values in one
    numpy pass (each event's vector is a view into that one array); the error raised is the one
    decoding the events one by one would raise first.
    """
    if not msgs:
        raise WireError("empty_batch", "empty batch: at least one event is needed")
    n = len(msgs)
    first_bad, bad_exc = n, None
    for i, m in enumerate(msgs):
        if _passes_checks(m, dims):
            continue
        try:
            _check_event(m, dims)
        except WireError as exc:
            first_bad, bad_exc = i, exc
            break
    good = msgs[:first_bad]
    if good:
        flat = np.frombuffer(b"".join(m.vector for m in good), dtype=_LE_F32).astype(np.float32)
        bad = ~np.isfinite(flat)
        bad |= np.abs(flat) > MAX_ABS_FEATURE  # NaN compares False: already flagged
        sizes = [len(m.vector) // 4 for m in good]
        ends = np.cumsum(sizes)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        nonzero = np.add.reduceat(flat != 0, starts) > 0 if flat.size else np.zeros(0, bool)
        k_value = (int(np.searchsorted(ends, int(np.flatnonzero(bad)[0]), side="right"))
                   if bad.any() else len(good))
        k_zero = int(np.flatnonzero(~nonzero)[0]) if not nonzero.all() else len(good)
        k = min(k_value, k_zero)
        if k < len(good):
            try:
                event_from_proto(good[k], dims)  # raises this event's value error
            except WireError as exc:
                raise exc.prefixed(f"batch event {k} of {n}: ") from None
        vectors, lo = [], 0
        for hi in ends.tolist():  # views into flat (np.split does the same, slower)
            vectors.append(flat[lo:hi])
            lo = hi
    if bad_exc is not None:
        raise bad_exc.prefixed(f"batch event {first_bad} of {n}: ") from None
    return [_incoming(m, v) for m, v in zip(good, vectors, strict=True)]


def event_to_proto(ev: IncomingEvent) -> pb.FeatureEvent:
    vec = np.asarray(ev.vector).reshape(-1)
    return pb.FeatureEvent(event_id=ev.event_id, item_id=ev.item_id, modality=ev.modality,
                           vector=encode_vector(vec), dim=len(vec), source=ev.source,
                           event_time=timestamp(ev.event_time), metadata=dict(ev.metadata))


def encode_feature_event(ev: IncomingEvent) -> bytes:
    """A ``FeatureEvent`` record value (send it with :data:`FEATURE_HEADER_EVENT`)."""
    return event_to_proto(ev).SerializeToString()


def encode_feature_batch(events: Iterable[IncomingEvent]) -> bytes:
    """A ``FeatureBatch`` record value (send it with :data:`FEATURE_HEADER_BATCH`)."""
    return pb.FeatureBatch(events=[event_to_proto(e) for e in events]).SerializeToString()


def _header_kind(headers) -> str | None:
    for key, value in headers or ():
        if str(key).lower() != FEATURE_HEADER:
            continue
        kind = (value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray)
                else str(value))
        kind = kind.strip()
        if kind not in ("FeatureEvent", "FeatureBatch"):
            raise WireError("undecodable",
                            f"header {FEATURE_HEADER}={kind!r}: expected 'FeatureEvent' or "
                            f"'FeatureBatch'")
        return kind
    return None


def _parse(cls, value: bytes):
    try:
        return cls.FromString(value)
    except (DecodeError, ValueError) as exc:
        raise WireError("undecodable",
                        f"cannot parse {len(value)} bytes as {cls.__name__}: {exc}") from None


def decode_feature_record(value: bytes | None, headers: Sequence[tuple[str, bytes]] | None,
                          dims: Mapping[str, int], max_bytes: int) -> list[IncomingEvent]:
    """Decode one ``pairsieve.features.v1`` record value into its events (see module docstring).

    Raises :class:`WireError`: ``oversized`` (``len(value) > max_bytes``, checked before
    parsing), ``undecodable``, ``empty_batch``, or any event-level reason.
    """
    value = bytes(value or b"")
    if len(value) > max_bytes:
        raise WireError("oversized", f"record value is {len(value)} bytes, limit {max_bytes}")
    kind = _header_kind(headers)
    if kind == "FeatureEvent":
        return [event_from_proto(_parse(pb.FeatureEvent, value), dims)]
    if kind == "FeatureBatch":
        return events_from_protos(_parse(pb.FeatureBatch, value).events, dims)
    if not value:
        raise WireError("undecodable", "empty record value (0 bytes)")
    try:
        ev = pb.FeatureEvent.FromString(value)
    except (DecodeError, ValueError):
        ev = None
    if ev is not None and ev.vector:
        return [event_from_proto(ev, dims)]
    try:
        batch = pb.FeatureBatch.FromString(value)
    except (DecodeError, ValueError):
        batch = None
    if batch is not None and len(batch.events):
        return events_from_protos(batch.events, dims)
    if ev is not None:
        return [event_from_proto(ev, dims)]  # raises: it has no vector
    raise WireError("undecodable",
                    f"cannot parse {len(value)} bytes as FeatureEvent or FeatureBatch "
                    f"(no {FEATURE_HEADER} header)")


# --------------------------------------------------------------------------- decisions, requests
def decision_to_proto(o: Outcome) -> pb.Decision:
    return _add_decision(pb.Decision, o)


def _add_decision(make, o: Outcome):
    """``make(**fields of o)``: ``pb.Decision`` itself, or a repeated field's ``add``, which
    builds the message in place (a list of messages passed to the parent is copied: a third
    slower for a batch of decisions)."""
    d = o.decision
    return make(
        event_id=o.event_id, item_id=d.item_id, modality=d.modality, accept=bool(d.accept),
        utility=float(d.utility),
        components=pb.ScoreComponents(
            uncertainty=float(d.uncertainty), diversity=float(d.diversity),
            coverage_bonus=float(d.coverage_bonus), margin=float(d.margin),
            entropy=float(d.entropy), least_confidence=float(d.least_confidence),
            typicality=float(d.typicality), partnerless=float(d.partnerless)),
        threshold=float(d.threshold), model_version=int(d.model_version), reason=str(d.reason),
        duplicate=bool(o.duplicate), worker_id=o.worker_id, cost=float(d.cost))


def decision_from_proto(msg: pb.Decision) -> Outcome:
    c = msg.components
    dec = Decision(item_id=msg.item_id, modality=msg.modality, accept=msg.accept,
                   utility=msg.utility, uncertainty=c.uncertainty, diversity=c.diversity,
                   coverage_bonus=c.coverage_bonus, margin=c.margin, entropy=c.entropy,
                   least_confidence=c.least_confidence, threshold=msg.threshold,
                   model_version=msg.model_version, reason=reasons.parse(msg.reason),
                   typicality=c.typicality, partnerless=c.partnerless, cost=msg.cost)
    return Outcome(msg.event_id, dec, msg.duplicate, msg.worker_id)


def decision_record_to_proto(o: Outcome, decided_at: float) -> pb.DecisionRecord:
    """A decision-log record of one decision in the older form (``decision``, key: the event
    id), as workers wrote before 2026-12-07; readers still take it."""
    return pb.DecisionRecord(decision=decision_to_proto(o), decided_at=timestamp(decided_at))


DECISIONS_PER_RECORD = 1024
"""Most decisions in one decision-log record (~140 kB: under a broker's default 1 MB message
limit whatever ``PAIRSIEVE_BATCH_MAX_ITEMS`` is)."""


def decision_records_to_proto(outcomes: Sequence[Outcome], decided_at: float
                              ) -> list[pb.DecisionRecord]:
    """The decision-log records of one engine batch: its decisions in order, in records of at
    most :data:`DECISIONS_PER_RECORD` (one, for the default batch size), all at ``decided_at``.

    One record per batch instead of one per decision: 256 records of ~140 bytes each, encoded,
    sent and read back one by one, took about a third of a worker's event loop at full load
    (its CPU per event fell by a fifth to a quarter with one record; reports/perf.md).
    """
    records = []
    for lo in range(0, len(outcomes), DECISIONS_PER_RECORD):
        rec = pb.DecisionRecord(decided_at=timestamp(decided_at))
        add = rec.decisions.add
        for o in outcomes[lo:lo + DECISIONS_PER_RECORD]:
            _add_decision(add, o)
        records.append(rec)
    return records


def decision_records_from_proto(msg: pb.DecisionRecord,
                                held: Callable[[str], bool] | None = None
                                ) -> tuple[list[Outcome], float | None]:
    """``(outcomes in record order, decided_at)`` of a decision-log record of either form.

    ``held(event_id)`` True leaves that decision out without building it (a worker reading its
    own records back: only the ids are read). Raises ``WireError`` (``missing_field``) for a
    record without decisions or with a decision that has no event id (nothing of it is used).
    """
    decisions = decisions_of(msg)
    if not decisions:
        raise WireError("missing_field", "decision record: missing field 'decisions'")
    ids = [d.event_id for d in decisions]
    if not all(ids):
        raise WireError("missing_field", "decision record: a decision without 'event_id'")
    if held is not None:
        decisions = [d for d, e in zip(decisions, ids, strict=True) if not held(e)]
    return ([decision_from_proto(d) for d in decisions],
            seconds(msg, "decided_at"))


def decisions_of(msg: pb.DecisionRecord) -> list[pb.Decision]:
    """The ``Decision`` messages of a decision-log record of either form, in order."""
    return ([msg.decision] if msg.HasField("decision") else []) + list(msg.decisions)


def request_to_proto(r: AlignmentRequestOut) -> pb.AlignmentRequest:
    vec = np.asarray(r.vector).reshape(-1)
    return pb.AlignmentRequest(
        request_id=r.request_id, item_id=r.item_id, modality=r.modality,
        vector=encode_vector(vec), dim=len(vec),
        candidates=[pb.PartnerCandidate(item_id=i, similarity=float(s)) for i, s in r.candidates],
        decision=decision_to_proto(r.outcome), worker_id=r.outcome.worker_id,
        requested_at=timestamp(r.requested_at), metadata=dict(r.metadata))


def request_from_proto(msg: pb.AlignmentRequest) -> tuple[Outcome, np.ndarray]:
    """Rebuild the accepted :class:`Outcome` and the item's vector (for the selection follower).

    The request's own ``request_id`` / ``item_id`` / ``modality`` / ``worker_id`` fill in the
    decision's when those are empty. Shape: vector (dim,) float32.
    """
    what = f"alignment request {msg.request_id!r}" if msg.request_id else "alignment request"
    _require(msg, ("request_id", "item_id", "modality", "vector"), what)
    if not msg.HasField("decision"):
        raise WireError("missing_field", f"{what}: missing field 'decision'")
    out = decision_from_proto(msg.decision)
    d = out.decision
    if (d.item_id and d.item_id != msg.item_id) or (d.modality and d.modality != msg.modality):
        raise WireError("undecodable",
                        f"{what}: decision is for {d.item_id!r}/{d.modality!r} but the request "
                        f"is for {msg.item_id!r}/{msg.modality!r}")
    out = Outcome(out.event_id or msg.request_id,
                  replace(d, item_id=msg.item_id, modality=msg.modality),
                  out.duplicate, out.worker_id or msg.worker_id)
    return out, decode_vector(msg.vector, msg.dim, what=f"{what} vector")


# --------------------------------------------------------------------------- budget ledger
def reservation_bytes(reservation_id: str, holder: str, worker_id: str,
                      event_ids: Sequence[str], reserved_at: float | None = None) -> bytes:
    """One :class:`pb.BudgetReservation` record value (the budget ledger topic)."""
    return pb.BudgetReservation(reservation_id=reservation_id, holder=holder,
                                worker_id=worker_id, event_ids=list(event_ids),
                                reserved_at=timestamp(reserved_at)).SerializeToString()


def reservation_from_bytes(value: bytes) -> tuple[str, str, list[str]]:
    """``(reservation_id, holder, event_ids)`` of a budget-ledger record; raises ``WireError``
    (``undecodable`` or ``missing_field``) for bytes that are not a reservation."""
    try:
        msg = pb.BudgetReservation.FromString(value)
    except DecodeError as exc:
        raise WireError("undecodable", f"budget reservation: {exc}") from None
    _require(msg, ("reservation_id", "holder"), "budget reservation")
    return msg.reservation_id, msg.holder, list(msg.event_ids)


# --------------------------------------------------------------------------- labels
def label_from_proto(msg: pb.AlignmentLabel, dims: Mapping[str, int]) -> Label:
    """Validate and decode an annotator's answer.

    ``status`` UNSPECIFIED -> ``missing_field``; ``partner_vector`` (optional) must have
    ``partner_dim`` == the dimension of the other modality. ``cost`` 0 (unset) reads as 1.0.
    """
    what = f"label for {msg.item_id!r}" if msg.item_id else "label"
    _require(msg, ("item_id", "modality"), what)
    _check_modality(msg.modality, dims, what)
    if msg.status == pb.ALIGNMENT_STATUS_UNSPECIFIED:
        raise WireError("missing_field",
                        f"{what}: missing field 'status' (expected one of {list(LABEL_STATUSES)})")
    if msg.status not in _STATUS_FROM_PB:
        raise WireError("undecodable", f"{what}: unknown status value {msg.status}")
    partner = None
    if msg.partner_vector:
        others = [m for m in dims if m != msg.modality]
        if len(others) != 1:
            raise WireError("unknown_modality",
                            f"{what}: cannot tell the partner modality of {msg.modality!r} "
                            f"among {sorted(dims)}")
        expected = int(dims[others[0]])
        if msg.partner_dim != expected:
            raise WireError("wrong_dimension",
                            f"{what}: partner_dim {msg.partner_dim} but the partner modality "
                            f"{others[0]!r} has dimension {expected}")
        partner = decode_vector(msg.partner_vector, expected, what=f"{what} partner_vector")
    if not math.isfinite(msg.cost):
        raise WireError("non_finite", f"{what}: cost must be finite, got {msg.cost!r}")
    if msg.cost < 0:
        raise WireError("out_of_range", f"{what}: cost must be >= 0, got {msg.cost!r}")
    return Label(item_id=msg.item_id, modality=msg.modality, partner_item_id=msg.partner_item_id,
                 status=_STATUS_FROM_PB[msg.status], request_id=msg.request_id,
                 annotator=msg.annotator, cost=msg.cost or 1.0, partner_vector=partner,
                 labeled_at=seconds(msg, "labeled_at"))


def label_to_proto(label: Label, labeled_at: float | None = None) -> pb.AlignmentLabel:
    """``labeled_at`` defaults to ``label.labeled_at``."""
    if labeled_at is None:
        labeled_at = label.labeled_at
    if label.status not in _STATUS_TO_PB:
        raise ValueError(f"label for {label.item_id!r}: unknown status {label.status!r}; "
                         f"expected one of {list(LABEL_STATUSES)}")
    msg = pb.AlignmentLabel(request_id=label.request_id, item_id=label.item_id,
                            modality=label.modality, partner_item_id=label.partner_item_id,
                            status=_STATUS_TO_PB[label.status], annotator=label.annotator,
                            cost=float(label.cost), labeled_at=timestamp(labeled_at))
    if label.partner_vector is not None and len(label.partner_vector):
        vec = np.asarray(label.partner_vector).reshape(-1)
        msg.partner_vector = encode_vector(vec)
        msg.partner_dim = len(vec)
    return msg


def label_result_to_proto(r: LabelResult) -> pb.ReportAlignmentResponse:
    return pb.ReportAlignmentResponse(accepted=r.accepted, ignored=r.ignored,
                                      model_version=r.model_version, duplicates=r.duplicates,
                                      unresolved=list(r.unresolved))


# --------------------------------------------------------------------------- training pairs
def pair_key_bytes(key: tuple[str, str]) -> bytes:
    """The record key of a pair on the training-pairs topic (unambiguous for any two ids)."""
    a, b = key
    return f"{len(a)}:{a}|{b}".encode()


def pair_to_proto(p: TrainingPair, modalities: Sequence[str]) -> pb.TrainingPair:
    """``modalities``: the configured (modality a, modality b). A partnerless record (a
    NO_MATCH) carries its labelled side only."""
    va, vb = np.asarray(p.vector_a).reshape(-1), np.asarray(p.vector_b).reshape(-1)
    return pb.TrainingPair(
        item_id_a=p.item_id_a, item_id_b=p.item_id_b, modality_a=modalities[0],
        modality_b=modalities[1], vector_a=encode_vector(va), dim_a=len(va),
        vector_b=encode_vector(vb), dim_b=len(vb), request_id=p.request_id,
        annotator=p.annotator, cost=float(p.cost), labeled_at=timestamp(p.labeled_at),
        worker_id=p.worker_id, labeled_item_id=p.labeled_item_id,
        partnerless=bool(p.partnerless))


def pair_from_proto(msg: pb.TrainingPair, dims: Mapping[str, int]) -> TrainingPair:
    """Validate and decode a training pair (or a partnerless record: exactly one side set);
    its modalities must be this service's, in order."""
    what = (f"partnerless record ({msg.item_id_a or msg.item_id_b!r})" if msg.partnerless
            else f"training pair ({msg.item_id_a!r}, {msg.item_id_b!r})")
    _require(msg, ("modality_a", "modality_b"), what)
    names = list(dims)
    if [msg.modality_a, msg.modality_b] != names:
        raise WireError("unknown_modality", f"{what}: modalities ({msg.modality_a!r}, "
                                            f"{msg.modality_b!r}), this service has {names}")
    sides = [side for side in ("a", "b") if getattr(msg, f"item_id_{side}")]
    if msg.partnerless and len(sides) != 1:
        raise WireError("missing_field", f"{what}: exactly one of item_id_a, item_id_b must be "
                                         f"set, got {len(sides)}")
    if not msg.partnerless:
        _require(msg, ("item_id_a", "item_id_b"), what)
    vecs = {}
    for side, m in (("a", msg.modality_a), ("b", msg.modality_b)):
        dim = getattr(msg, f"dim_{side}")
        if side not in sides:
            vecs[side] = np.zeros(0, np.float32)
            continue
        if dim != dims[m]:
            raise WireError("wrong_dimension", f"{what}: dim_{side} {dim} but {m!r} has "
                                               f"dimension {dims[m]}")
        vecs[side] = decode_vector(getattr(msg, f"vector_{side}"), dims[m],
                                   what=f"{what} vector_{side}")
    if not math.isfinite(msg.cost):
        raise WireError("non_finite", f"{what}: cost must be finite, got {msg.cost!r}")
    return TrainingPair(
        item_id_a=msg.item_id_a, item_id_b=msg.item_id_b, vector_a=vecs["a"],
        vector_b=vecs["b"], request_id=msg.request_id, annotator=msg.annotator, cost=msg.cost,
        labeled_at=seconds(msg, "labeled_at"), worker_id=msg.worker_id,
        labeled_item_id=msg.labeled_item_id, partnerless=bool(msg.partnerless))


# --------------------------------------------------------------------------- model versions
def model_release_to_proto(r: ModelRelease) -> pb.ModelVersion:
    return pb.ModelVersion(
        version=r.version, training_pairs=int(r.model.n_pairs), pairs_seen=int(r.pairs_seen),
        validation_pairs=int(r.validation_pairs),
        validation_recall=[pb.RecallAtK(k=int(k), recall=float(v))
                           for k, v in sorted(r.validation_recall.items())],
        worker_id=r.worker_id, trained_at=timestamp(r.trained_at),
        checkpoint=r.model.to_bytes(),
        history=[pb.CurvePoint(training_pairs=int(n), recall_at_1=float(r1),
                               validation_pairs=int(nv)) for n, r1, nv in r.history])


def model_release_from_proto(msg: pb.ModelVersion) -> ModelRelease:
    """Decode a published version (its checkpoint loads with ``weights_only``).

    Raises ``WireError`` (``missing_field``, ``undecodable``) naming the problem; whether its
    modalities fit this service is the learning loop's check.
    """
    from service.alignment import AlignmentModel

    what = f"model version {msg.version}"
    _require(msg, ("checkpoint",), what)
    try:
        model = AlignmentModel.from_bytes(msg.checkpoint)
    except ValueError as exc:
        raise WireError("undecodable", f"{what}: {exc}") from None
    if model.version != msg.version:
        raise WireError("undecodable", f"{what}: its checkpoint says version {model.version}")
    return ModelRelease(model=model, pairs_seen=int(msg.pairs_seen),
                        validation_pairs=int(msg.validation_pairs),
                        validation_recall={int(r.k): float(r.recall)
                                           for r in msg.validation_recall},
                        worker_id=msg.worker_id, trained_at=seconds(msg, "trained_at") or 0.0,
                        history=tuple((int(h.training_pairs), float(h.recall_at_1),
                                       int(h.validation_pairs)) for h in msg.history))


# --------------------------------------------------------------------------- gRPC requests
def submit_request_from_proto(msg: pb.SubmitRequest, dims: Mapping[str, int]
                              ) -> list[IncomingEvent]:
    """The events of a ``SubmitRequest`` (all-or-nothing, like a ``FeatureBatch``)."""
    return events_from_protos(msg.events, dims)


def submit_response_to_proto(outcomes: Iterable[Outcome]) -> pb.SubmitResponse:
    resp = pb.SubmitResponse()
    add = resp.decisions.add
    for o in outcomes:
        _add_decision(add, o)
    return resp


def pool_request_from_proto(msg: pb.SelectPoolRequest, dims: Mapping[str, int]
                            ) -> tuple[list[str], list[str], list[np.ndarray]]:
    """``(ids, modalities, vectors)`` of a ``SelectPoolRequest``'s candidates (all validated)."""
    if not msg.candidates:
        raise WireError("empty_batch", "select pool: no candidates")
    ids, mods, vecs = [], [], []
    for i, c in enumerate(msg.candidates):
        what = f"pool candidate {i} ({c.item_id!r})" if c.item_id else f"pool candidate {i}"
        _require(c, ("item_id", "modality", "vector"), what)
        expected = _check_modality(c.modality, dims, what)
        if c.dim != expected:
            raise WireError("wrong_dimension", f"{what}: dim {c.dim} but modality "
                                               f"{c.modality!r} has dimension {expected}")
        vecs.append(decode_vector(c.vector, expected, what=f"{what} vector"))
        ids.append(c.item_id)
        mods.append(c.modality)
    return ids, mods, vecs


# --------------------------------------------------------------------------- status, dead letters
def _count(v) -> int:
    return -1 if v is None else int(v)


def status_to_proto(status: EngineStatus, serving: bool = True) -> pb.ServiceStatus:
    """``SelectionHandler.status()`` -> ``ServiceStatus`` (``None`` budget -> -1 = unlimited)."""
    if not isinstance(status, EngineStatus):
        raise TypeError(f"status_to_proto needs an EngineStatus, got {type(status).__name__}")
    dims = status.dims
    seen = status.seen_per_modality
    acc = status.accepted_per_modality
    fill = status.cache_fill
    ev = status.cache_evictions
    names = list(dims) + [m for m in {**seen, **acc, **fill} if m not in dims]
    return pb.ServiceStatus(
        worker_id=status.worker_id,
        budget_total=_count(status.budget_total),
        budget_spent=int(status.spent),
        budget_remaining=_count(status.remaining),
        acceptance_rate=float(status.acceptance_rate),
        target_rate=float(status.target_rate),
        threshold=float(status.threshold),
        model_version=int(status.model_version),
        pairs_acquired=int(status.pairs_acquired),
        modalities=[pb.ModalityStatus(modality=m, dim=int(dims.get(m, 0)),
                                      seen=int(seen.get(m, 0)), accepted=int(acc.get(m, 0)),
                                      cache_fill=float(fill.get(m, 0.0)),
                                      cache_evictions=int(ev.get(m, 0)))
                    for m in names],
        serving=bool(serving),
        validation_recall=[pb.RecallAtK(k=int(k), recall=float(v))
                           for k, v in sorted(status.validation_recall.items())],
        validation_pairs=int(status.validation_pairs), trainer=bool(status.trainer),
        expected_gain=float(status.expected_gain), expected_gain_se=float(status.expected_gain_se),
        expected_gain_pairs=int(status.expected_gain_pairs), budget_unit=status.budget_unit,
        cost_spent=float(status.cost_spent),
        cost_total=-1.0 if status.cost_total is None else float(status.cost_total),
        expected_cost={m: float(v) for m, v in status.expected_cost.items()})


def dead_letter_bytes(reason: str, detail: str, original: bytes, topic: str | None,
                      partition: int | None, offset: int | None, now: float,
                      max_bytes: int | None = None) -> bytes:
    """A serialized ``DeadLetter`` (unknown partition/offset -> -1).

    It always carries the original's SHA-256 and size. The original itself is left out
    (``original_omitted``) when the dead letter would exceed ``max_bytes`` less the record
    overhead (4 KiB, or an eighth of a smaller limit): a record refused for its size must not
    make its dead letter unpublishable, and the source coordinates still find the original on
    its topic.
    """
    original = bytes(original or b"")
    limit = None if max_bytes is None else \
        max(0, max_bytes - min(DEAD_LETTER_HEADROOM, max_bytes // 8))
    # an original over the limit by itself (every record refused as oversized) is never copied
    # into the message: that copy and its size count cost more than the digest
    fits = limit is None or len(original) <= limit
    msg = pb.DeadLetter(reason=reason, detail=detail, original=original if fits else b"",
                        original_omitted=not fits,
                        source_topic=topic or "",
                        source_partition=-1 if partition is None else int(partition),
                        source_offset=-1 if offset is None else int(offset),
                        failed_at=timestamp(now),
                        original_sha256=hashlib.sha256(original).hexdigest(),
                        original_size=len(original))
    if limit is not None and msg.ByteSize() > limit:
        msg.original = b""
        msg.original_omitted = True
        if msg.ByteSize() > limit:
            msg.detail = msg.detail[:1024]  # a detail cannot be that long, but never fail here
    return msg.SerializeToString()


DEAD_LETTER_HEADROOM = 4096
"""Bytes kept free below the producer's request limit for the record and batch framing."""
