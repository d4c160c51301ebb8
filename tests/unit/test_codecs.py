"""Wire codecs: round trips of every message, every WireError reason, record framing."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.core.types import Decision
from service.messages import (
    AlignmentRequestOut,
    EngineStatus,
    IncomingEvent,
    Label,
    LabelResult,
    ModelRelease,
    Outcome,
    TrainingPair,
)
from service.wire import codecs
from service.wire.codecs import WireError
from service.wire.gen.pairsieve.v1 import pairsieve_pb2 as pb

DIMS = {"image": 12, "text": 8}
MAX = 1 << 20


def _ev(i=0, modality="image", **kw):
    rng = np.random.default_rng(i)
    base = dict(event_id=f"e{i}", item_id=f"it{i}", modality=modality,
                vector=rng.normal(size=DIMS[modality]).astype(np.float32),
                event_time=1_700_000_000.25 + i, source="test", metadata={"k": str(i)})
    base.update(kw)
    return IncomingEvent(**base)


def _pb_ev(**kw):
    base = dict(event_id="e1", item_id="i1", modality="text",
                vector=codecs.encode_vector(np.ones(8, np.float32)), dim=8)
    base.update(kw)
    return pb.FeatureEvent(**base)


def _same_event(a: IncomingEvent, b: IncomingEvent):
    assert (a.event_id, a.item_id, a.modality, a.source, a.metadata) == \
        (b.event_id, b.item_id, b.modality, b.source, b.metadata)
    assert a.event_time == pytest.approx(b.event_time, abs=1e-6) if a.event_time else \
        b.event_time is None
    np.testing.assert_array_equal(a.vector, b.vector)
    assert b.vector.dtype == np.float32 and b.vector.flags.c_contiguous


def _decision(accept=True, threshold=0.4):
    return Decision(item_id="it1", modality="image", accept=accept, utility=0.9, uncertainty=0.8,
                    diversity=0.7, coverage_bonus=-0.1, margin=0.2, entropy=0.6,
                    least_confidence=0.5, threshold=threshold, model_version=3,
                    reason="accept:utility")


# --------------------------------------------------------------------------- vectors
@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 64),
                  elements=st.floats(-(2.0**49), 2.0**49, allow_nan=False, allow_infinity=False,
                                     width=32)))
def test_vector_round_trip_of_arbitrary_finite_float32(v):
    data = codecs.encode_vector(v)
    assert len(data) == 4 * len(v)
    out = codecs.decode_vector(data, len(v), what="v")
    np.testing.assert_array_equal(out, v)
    assert out.dtype == np.float32 and out.flags.writeable


def test_huge_finite_values_are_rejected_before_they_overflow():
    # 3e38 is finite float32, but projects to inf and would poison the engine's caches.
    v = np.zeros(8, np.float32)
    v[3] = 3e38
    with pytest.raises(codecs.WireError, match=r"exceed \|x\| <= 1e\+15.*index 3") as ei:
        codecs.decode_vector(codecs.encode_vector(v), 8, what="v")
    assert ei.value.reason == "non_finite"


def test_vector_is_little_endian():
    assert codecs.encode_vector(np.array([1.0], np.float32)) == b"\x00\x00\x80\x3f"
    big = np.array([1.0, 2.0], dtype=">f4")
    np.testing.assert_array_equal(codecs.decode_vector(codecs.encode_vector(big), 2), [1.0, 2.0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_vector(bad):
    v = np.zeros(5, np.float32)
    v[3] = bad
    with pytest.raises(WireError, match="first at index 3") as ei:
        codecs.decode_vector(codecs.encode_vector(v), 5, what="v")
    assert ei.value.reason == "non_finite"


def test_vector_size_errors_name_the_sizes():
    with pytest.raises(WireError, match="10 bytes is not a whole number") as ei:
        codecs.decode_vector(b"\x00" * 10, 3)
    assert ei.value.reason == "undecodable"
    with pytest.raises(WireError, match="20 bytes = 5 float32 values, but dim is 12") as ei:
        codecs.decode_vector(b"\x00" * 20, 12)
    assert ei.value.reason == "wrong_dimension"


# --------------------------------------------------------------------------- events
def test_event_round_trip():
    ev = _ev(1)
    msg = pb.FeatureEvent.FromString(codecs.encode_feature_event(ev))
    assert msg.dim == 12 and len(msg.vector) == 48
    _same_event(ev, codecs.event_from_proto(msg, DIMS))


def test_event_time_unset_is_none():
    out = codecs.event_from_proto(_pb_ev(), DIMS)
    assert out.event_time is None and out.metadata == {} and out.source == ""


@pytest.mark.parametrize("headers", [[codecs.FEATURE_HEADER_EVENT], None, []])
def test_decode_single_event_record_with_and_without_header(headers):
    ev = _ev(2, "text")
    (out,) = codecs.decode_feature_record(codecs.encode_feature_event(ev), headers, DIMS, MAX)
    _same_event(ev, out)


@pytest.mark.parametrize("headers", [[codecs.FEATURE_HEADER_BATCH], None,
                                     [("Pairsieve-Message", "FeatureBatch")]])
def test_decode_batch_record_with_and_without_header(headers):
    evs = [_ev(i, "image" if i % 2 else "text") for i in range(5)]
    out = codecs.decode_feature_record(codecs.encode_feature_batch(evs), headers, DIMS, MAX)
    assert len(out) == 5
    for a, b in zip(evs, out, strict=True):
        _same_event(a, b)


def test_single_event_batch_without_header_is_still_a_batch():
    ev = _ev(3)
    (out,) = codecs.decode_feature_record(codecs.encode_feature_batch([ev]), None, DIMS, MAX)
    _same_event(ev, out)


def test_batch_that_also_parses_as_an_event_is_read_as_a_batch():
    # all-ASCII nested bytes: the batch parses as a FeatureEvent whose event_id is the first
    # event's bytes (valid UTF-8) and which has no vector; it must still be read as a batch
    ascii_float = np.frombuffer(b"AAAA", "<f4")[0]  # 12.08: its bytes are ASCII (zeros would be
    evs = [_ev(i, "text", vector=np.full(8, ascii_float, np.float32), event_time=None,
               metadata={}) for i in range(2)]  # too, but an all-zero vector is refused)
    value = codecs.encode_feature_batch(evs)
    assert pb.FeatureEvent.FromString(value).event_id  # the ambiguity is real
    out = codecs.decode_feature_record(value, None, DIMS, MAX)
    assert [e.event_id for e in out] == ["e0", "e1"]


def test_unrelated_headers_are_ignored():
    ev = _ev(4)
    out = codecs.decode_feature_record(codecs.encode_feature_event(ev),
                                       [("trace-id", b"x")], DIMS, MAX)
    _same_event(ev, out[0])


def _reason(fn, reason, match):
    with pytest.raises(WireError, match=match) as ei:
        fn()
    assert ei.value.reason == reason
    assert isinstance(ei.value, ValueError)
    return ei.value


@pytest.mark.parametrize("kw,reason,match", [
    (dict(event_id=""), "missing_field", "missing field 'event_id'"),
    (dict(item_id=""), "missing_field", "event 'e1': missing field 'item_id'"),
    (dict(modality=""), "missing_field", "missing field 'modality'"),
    (dict(vector=b"", dim=8), "missing_field", "missing field 'vector'"),
    (dict(modality="audio"), "unknown_modality",
     r"unknown modality 'audio'; expected one of \['image', 'text'\]"),
    (dict(dim=5), "wrong_dimension", "dim 5 but modality 'text' has dimension 8"),
    (dict(dim=0), "wrong_dimension", "dim 0 but modality 'text' has dimension 8"),
    (dict(vector=b"\x00" * 20), "wrong_dimension", "20 bytes = 5 float32 values, but dim is 8"),
    (dict(vector=b"\x00" * 30), "undecodable", "30 bytes is not a whole number"),
    (dict(vector=codecs.encode_vector(np.array([0, 0, np.nan, 0, 0, 0, 0, 0], np.float32))),
     "non_finite", "NaN or inf .first at index 2"),
])
def test_event_errors(kw, reason, match):
    _reason(lambda: codecs.event_from_proto(_pb_ev(**kw), DIMS), reason, match)


def test_record_errors():
    good = codecs.encode_feature_event(_ev(0))
    _reason(lambda: codecs.decode_feature_record(good, None, DIMS, len(good) - 1), "oversized",
            f"record value is {len(good)} bytes, limit {len(good) - 1}")
    _reason(lambda: codecs.decode_feature_record(b"\xff\xff\xff", None, DIMS, MAX),
            "undecodable", "cannot parse 3 bytes as FeatureEvent or FeatureBatch")
    _reason(lambda: codecs.decode_feature_record(b"\xff\xff\xff", [codecs.FEATURE_HEADER_BATCH],
                                                 DIMS, MAX),
            "undecodable", "cannot parse 3 bytes as FeatureBatch")
    _reason(lambda: codecs.decode_feature_record(b"", None, DIMS, MAX), "undecodable",
            "empty record value")
    _reason(lambda: codecs.decode_feature_record(b"", [codecs.FEATURE_HEADER_BATCH], DIMS, MAX),
            "empty_batch", "empty batch")
    _reason(lambda: codecs.decode_feature_record(good, [("pairsieve-message", b"Nope")], DIMS, MAX),
            "undecodable", "pairsieve-message='Nope'")
    # no vector, no header: neither reading works; the FeatureEvent's own error is reported
    no_vec = pb.FeatureEvent(event_id="e9", item_id="i", modality="text").SerializeToString()
    _reason(lambda: codecs.decode_feature_record(no_vec, None, DIMS, MAX), "missing_field",
            "event 'e9': missing field 'vector'")


def test_batch_is_all_or_nothing_and_names_the_index():
    evs = [_ev(0), _ev(1, "text"), _ev(2, "image", vector=np.zeros(7, np.float32))]
    value = codecs.encode_feature_batch(evs)
    for headers in ([codecs.FEATURE_HEADER_BATCH], None):
        _reason(lambda headers=headers: codecs.decode_feature_record(value, headers, DIMS, MAX),
                "wrong_dimension", "batch event 2 of 3: event 'e2': dim 7 but modality 'image'")
    bad_nan = [_ev(0), _ev(1, vector=np.full(12, np.inf, np.float32))]
    _reason(lambda: codecs.decode_feature_record(codecs.encode_feature_batch(bad_nan),
                                                 [codecs.FEATURE_HEADER_BATCH], DIMS, MAX),
            "non_finite", "batch event 1 of 2")


def test_submit_request_and_empty_batch():
    evs = [_ev(0), _ev(1, "text")]
    req = pb.SubmitRequest(events=[codecs.event_to_proto(e) for e in evs])
    out = codecs.submit_request_from_proto(req, DIMS)
    for a, b in zip(evs, out, strict=True):
        _same_event(a, b)
    _reason(lambda: codecs.submit_request_from_proto(pb.SubmitRequest(), DIMS), "empty_batch",
            "empty batch")


# --------------------------------------------------------------------------- decisions, requests
def test_decision_to_proto_carries_every_component():
    msg = codecs.decision_to_proto(Outcome("e1", _decision(), True, "w7"))
    assert (msg.event_id, msg.item_id, msg.modality, msg.accept, msg.duplicate, msg.worker_id) \
        == ("e1", "it1", "image", True, True, "w7")
    c = msg.components
    assert (c.uncertainty, c.diversity, c.coverage_bonus, c.margin, c.entropy,
            c.least_confidence) == (0.8, 0.7, -0.1, 0.2, 0.6, 0.5)
    assert (msg.utility, msg.threshold, msg.model_version, msg.reason) == \
        (0.9, 0.4, 3, "accept:utility")
    assert math.isnan(codecs.decision_to_proto(Outcome("e", _decision(threshold=math.nan)))
                      .threshold)


def test_request_round_trip_with_candidates():
    vec = np.arange(12, dtype=np.float32)
    out = Outcome("e1", _decision(), False, "w1")
    r = AlignmentRequestOut(request_id="e1", item_id="it1", modality="image", vector=vec,
                            candidates=[("t1", 0.9), ("t2", -0.25)], outcome=out,
                            requested_at=1_700_000_123.5, metadata={"a": "b"})
    msg = pb.AlignmentRequest.FromString(codecs.request_to_proto(r).SerializeToString())
    assert [(c.item_id, c.similarity) for c in msg.candidates] == [("t1", 0.9), ("t2", -0.25)]
    assert msg.worker_id == "w1" and dict(msg.metadata) == {"a": "b"} and msg.dim == 12
    assert codecs.seconds(msg, "requested_at") == pytest.approx(1_700_000_123.5)
    back, v = codecs.request_from_proto(msg)
    assert back == out
    np.testing.assert_array_equal(v, vec)


def test_request_from_proto_errors():
    msg = codecs.request_to_proto(AlignmentRequestOut(
        "e1", "it1", "image", np.zeros(12, np.float32), [], Outcome("e1", _decision()), 0.0))
    m = pb.AlignmentRequest()
    m.CopyFrom(msg)
    m.ClearField("decision")
    _reason(lambda: codecs.request_from_proto(m), "missing_field", "missing field 'decision'")
    m.CopyFrom(msg)
    m.vector = codecs.encode_vector(np.full(12, np.nan, np.float32))
    _reason(lambda: codecs.request_from_proto(m), "non_finite", "request 'e1' vector")
    m.CopyFrom(msg)
    m.item_id = "other"
    _reason(lambda: codecs.request_from_proto(m), "undecodable", "decision is for 'it1'")


# --------------------------------------------------------------------------- labels
@pytest.mark.parametrize("partner", [None, np.linspace(-1, 1, 8).astype(np.float32)])
@pytest.mark.parametrize("status", ["MATCH", "NO_MATCH", "UNSURE"])
def test_label_round_trip(status, partner):
    lb = Label(item_id="it1", modality="image", partner_item_id="t5", status=status,
               request_id="e1", annotator="ann", cost=2.5, partner_vector=partner)
    msg = pb.AlignmentLabel.FromString(codecs.label_to_proto(lb, labeled_at=5.0)
                                       .SerializeToString())
    assert msg.partner_dim == (0 if partner is None else 8)
    back = codecs.label_from_proto(msg, DIMS)
    assert (back.item_id, back.modality, back.partner_item_id, back.status, back.request_id,
            back.annotator, back.cost) == ("it1", "image", "t5", status, "e1", "ann", 2.5)
    if partner is None:
        assert back.partner_vector is None
    else:
        np.testing.assert_array_equal(back.partner_vector, partner)


def test_label_errors():
    ok = dict(item_id="i1", modality="text", partner_item_id="p", status=pb.MATCH)
    _reason(lambda: codecs.label_from_proto(pb.AlignmentLabel(**{**ok, "status": 0}), DIMS),
            "missing_field", "label for 'i1': missing field 'status'")
    _reason(lambda: codecs.label_from_proto(pb.AlignmentLabel(**{**ok, "item_id": ""}), DIMS),
            "missing_field", "missing field 'item_id'")
    _reason(lambda: codecs.label_from_proto(pb.AlignmentLabel(**{**ok, "modality": "x"}), DIMS),
            "unknown_modality", "unknown modality 'x'")
    vec12 = codecs.encode_vector(np.zeros(12, np.float32))
    vec8 = codecs.encode_vector(np.zeros(8, np.float32))
    _reason(lambda: codecs.label_from_proto(
        pb.AlignmentLabel(**ok, partner_vector=vec8, partner_dim=12), DIMS),
        "wrong_dimension", "partner_vector: 32 bytes = 8 float32 values, but dim is 12")
    _reason(lambda: codecs.label_from_proto(
        pb.AlignmentLabel(**ok, partner_vector=vec12, partner_dim=10), DIMS),
        "wrong_dimension", "partner_dim 10 but the partner modality 'image' has dimension 12")
    nan12 = codecs.encode_vector(np.full(12, np.nan, np.float32))
    _reason(lambda: codecs.label_from_proto(
        pb.AlignmentLabel(**ok, partner_vector=nan12, partner_dim=12), DIMS),
        "non_finite", "partner_vector")
    _reason(lambda: codecs.label_from_proto(pb.AlignmentLabel(**ok, cost=-2.0), DIMS),
            "out_of_range", "cost must be >= 0, got -2.0")
    # unset cost reads as the default 1.0
    assert codecs.label_from_proto(pb.AlignmentLabel(**ok), DIMS).cost == 1.0


def test_decision_record_round_trip_and_errors():
    d = Decision("it1", "image", False, 0.25, 0.1, 0.2, 0.0, 0.3, 0.4, 0.5, 0.6, 3,
                 "skip:below_threshold", typicality=0.7, partnerless=0.1, cost=2.5)
    msg = codecs.decision_record_to_proto(Outcome("e1", d, False, "w0"), 1_700_000_000.5)
    back, at = codecs.decision_records_from_proto(pb.DecisionRecord.FromString(
        msg.SerializeToString()))
    assert back == [Outcome("e1", d, False, "w0")] and at == 1_700_000_000.5
    _reason(lambda: codecs.decision_records_from_proto(pb.DecisionRecord()), "missing_field",
            "missing field 'decisions'")
    msg.decision.reason = "skip:from_a_newer_peer"  # unknown reasons pass through unchanged
    assert codecs.decision_records_from_proto(msg)[0][0].decision.reason == \
        "skip:from_a_newer_peer"


def test_a_batch_of_decisions_is_one_record_in_order_and_reads_back_whole():
    outs = [Outcome(f"e{i}", Decision(f"it{i}", "image" if i % 2 else "text", i % 7 == 0,
                                      0.01 * i, 0.1, 0.2, 0.0, 0.3, 0.4, 0.5, 0.6, 3,
                                      "accept:utility" if i % 7 == 0 else "skip:pacing"),
                    i % 5 == 0, "w0")
            for i in range(2 * codecs.DECISIONS_PER_RECORD + 3)]
    recs = codecs.decision_records_to_proto(outs, 12.5)
    assert [len(r.decisions) for r in recs] == [codecs.DECISIONS_PER_RECORD] * 2 + [3]
    assert len(codecs.decision_records_to_proto(outs[:256], 1.0)) == 1  # the default batch
    back = [codecs.decision_records_from_proto(pb.DecisionRecord.FromString(
        r.SerializeToString())) for r in recs]
    assert [o for got, _ in back for o in got] == outs and {at for _, at in back} == {12.5}
    # a reader that knows only the one-decision form refuses a batch record (never misreads it)
    assert not pb.DecisionRecord.FromString(recs[2].SerializeToString()).HasField("decision")
    # held decisions are left out without being built; the rest keep their order
    got, _ = codecs.decision_records_from_proto(recs[2], held=lambda e: e.endswith("1"))
    assert [o.event_id for o in got] == [o.event_id for o in outs[-3:]
                                         if not o.event_id.endswith("1")]
    bad = pb.DecisionRecord()
    bad.decisions.add(item_id="no-event-id")
    _reason(lambda: codecs.decision_records_from_proto(bad), "missing_field", "event_id")


def test_zero_vectors_and_overlong_ids_are_refused_naming_the_event():
    zero = _pb_ev(vector=codecs.encode_vector(np.zeros(8, np.float32)))
    _reason(lambda: codecs.event_from_proto(zero, DIMS), "zero_vector",
            r"event 'e1' vector: all 8 values are 0")
    ok = [_pb_ev(event_id=f"e{i}") for i in range(3)]
    batch = ok[:1] + [_pb_ev(event_id="z", vector=codecs.encode_vector(np.zeros(8, "<f4")))] + \
        [_pb_ev(event_id="n", vector=codecs.encode_vector(np.full(8, np.nan, "<f4")))]
    _reason(lambda: codecs.events_from_protos(batch, DIMS), "zero_vector",
            r"batch event 1 of 3: event 'z'")  # the first bad event in order, as one by one
    assert len(codecs.events_from_protos(ok, DIMS)) == 3
    _reason(lambda: codecs.event_from_proto(_pb_ev(item_id="i" * 257), DIMS), "out_of_range",
            "item_id has 257 characters \\(at most 256\\)")
    assert codecs.event_from_proto(_pb_ev(item_id="i" * 256), DIMS).item_id == "i" * 256


def test_label_result_to_proto():
    msg = codecs.label_result_to_proto(LabelResult(3, 2, 4, duplicates=1, unresolved=("why",)))
    assert (msg.accepted, msg.ignored, msg.model_version, msg.duplicates) == (3, 2, 4, 1)
    assert list(msg.unresolved) == ["why"]


def test_label_time_round_trips():
    lb = Label("i1", "image", "t1", "MATCH", labeled_at=1_700_000_000.5)
    back = codecs.label_from_proto(codecs.label_to_proto(lb), DIMS)
    assert back.labeled_at == 1_700_000_000.5
    assert codecs.label_from_proto(codecs.label_to_proto(Label("i1", "image", "t1", "MATCH")),
                                   DIMS).labeled_at is None


# ------------------------------------------------------------------ training pairs, models
def _training_pair(**kw):
    rng = np.random.default_rng(0)
    base = dict(item_id_a="i1", item_id_b="t1", vector_a=rng.normal(size=12).astype(np.float32),
                vector_b=rng.normal(size=8).astype(np.float32), request_id="r1", annotator="ann",
                cost=2.5, labeled_at=1_700_000_000.25, worker_id="w0", labeled_item_id="t1")
    base.update(kw)
    return TrainingPair(**base)


def test_training_pair_round_trip_and_key():
    p = _training_pair()
    msg = pb.TrainingPair.FromString(codecs.pair_to_proto(p, ["image", "text"])
                                     .SerializeToString())
    assert (msg.modality_a, msg.modality_b, msg.dim_a, msg.dim_b) == ("image", "text", 12, 8)
    back = codecs.pair_from_proto(msg, DIMS)
    for f in ("item_id_a", "item_id_b", "request_id", "annotator", "cost", "worker_id",
              "labeled_item_id"):
        assert getattr(back, f) == getattr(p, f), f
    assert back.labeled_at == pytest.approx(p.labeled_at, abs=1e-6)
    np.testing.assert_array_equal(back.vector_a, p.vector_a)
    np.testing.assert_array_equal(back.vector_b, p.vector_b)
    assert codecs.pair_key_bytes(("ab", "c")) != codecs.pair_key_bytes(("a", "bc"))
    assert codecs.pair_key_bytes(p.key) == b"2:i1|t1"


def test_training_pair_errors_name_the_problem():
    good = codecs.pair_to_proto(_training_pair(), ["image", "text"])
    swapped = pb.TrainingPair()
    swapped.CopyFrom(good)
    swapped.modality_a, swapped.modality_b = "text", "image"
    _reason(lambda: codecs.pair_from_proto(swapped, DIMS), "unknown_modality",
            r"modalities \('text', 'image'\), this service has \['image', 'text'\]")
    short = pb.TrainingPair()
    short.CopyFrom(good)
    short.dim_b = 7
    _reason(lambda: codecs.pair_from_proto(short, DIMS), "wrong_dimension",
            "dim_b 7 but 'text' has dimension 8")
    missing = pb.TrainingPair()
    missing.CopyFrom(good)
    missing.item_id_b = ""
    _reason(lambda: codecs.pair_from_proto(missing, DIMS), "missing_field", "'item_id_b'")
    nan = pb.TrainingPair()
    nan.CopyFrom(good)
    nan.vector_a = codecs.encode_vector(np.full(12, np.nan, np.float32))
    _reason(lambda: codecs.pair_from_proto(nan, DIMS), "non_finite", "vector_a")


def test_partnerless_record_round_trip_and_errors():
    img = np.arange(12, dtype=np.float32)
    p = TrainingPair("", "t9", np.zeros(0, np.float32), img[:8], request_id="r9",
                     labeled_item_id="t9", partnerless=True)
    msg = codecs.pair_to_proto(p, ["image", "text"])
    back = codecs.pair_from_proto(pb.TrainingPair.FromString(msg.SerializeToString()), DIMS)
    assert back.partnerless and back.key == ("", "t9") and back.vector_a.shape == (0,)
    np.testing.assert_array_equal(back.vector_b, img[:8])
    both = pb.TrainingPair()
    both.CopyFrom(msg)
    both.item_id_a = "i9"
    _reason(lambda: codecs.pair_from_proto(both, DIMS), "missing_field",
            "exactly one of item_id_a, item_id_b must be set, got 2")
    # a real pair still needs both sides
    one = pb.TrainingPair()
    one.CopyFrom(msg)
    one.partnerless = False
    _reason(lambda: codecs.pair_from_proto(one, DIMS), "missing_field", "'item_id_a'")


def test_model_release_round_trip_and_a_corrupt_checkpoint():
    from service.alignment import AlignmentModel

    model = AlignmentModel(DIMS, 8, version=5)
    model.n_pairs = 40
    rel = ModelRelease(model, pairs_seen=45, validation_pairs=5,
                       validation_recall={1: 0.4, 5: 0.8}, worker_id="w0", trained_at=1234.5,
                       history=((20, 0.25, 3), (40, 0.4, 5)))
    msg = pb.ModelVersion.FromString(codecs.model_release_to_proto(rel).SerializeToString())
    assert (msg.version, msg.training_pairs, msg.pairs_seen, msg.validation_pairs) == \
        (5, 40, 45, 5)
    back = codecs.model_release_from_proto(msg)
    assert (back.version, back.pairs_seen, back.validation_pairs, back.worker_id,
            back.trained_at) == (5, 45, 5, "w0", 1234.5)
    assert back.validation_recall == {1: 0.4, 5: 0.8} and back.model.n_pairs == 40
    assert back.history == ((20, 0.25, 3), (40, 0.4, 5))
    for name, t in model.state_dict().items():
        np.testing.assert_array_equal(back.model.state_dict()[name].numpy(), t.numpy())
    msg.checkpoint = b"not torch"
    _reason(lambda: codecs.model_release_from_proto(msg), "undecodable",
            "model version 5: not a model checkpoint")
    msg.checkpoint = model.to_bytes()
    msg.version = 6
    _reason(lambda: codecs.model_release_from_proto(msg), "undecodable",
            "its checkpoint says version 5")


# ------------------------------------------------------------------ pool, status, dead letters
def test_pool_request_decoding_and_errors():
    cands = [pb.PoolCandidate(item_id=f"c{i}", modality=m, dim=DIMS[m],
                              vector=codecs.encode_vector(np.full(DIMS[m], i, np.float32)))
             for i, m in enumerate(["image", "text", "image"])]
    ids, mods, vecs = codecs.pool_request_from_proto(pb.SelectPoolRequest(candidates=cands), DIMS)
    assert ids == ["c0", "c1", "c2"] and mods == ["image", "text", "image"]
    assert [len(v) for v in vecs] == [12, 8, 12] and vecs[2][0] == 2.0
    _reason(lambda: codecs.pool_request_from_proto(pb.SelectPoolRequest(), DIMS), "empty_batch",
            "no candidates")
    cands[1].dim = 12
    _reason(lambda: codecs.pool_request_from_proto(pb.SelectPoolRequest(candidates=cands), DIMS),
            "wrong_dimension", r"pool candidate 1 \('c1'\): dim 12")


def _status(total=40, remaining=30, **fields):
    base = dict(spent=10, remaining=remaining, seen=50, acceptance_rate=0.2, threshold=0.55,
                accepted_per_modality={"image": 6, "text": 4},
                seen_per_modality={"image": 30, "text": 20}, model_version=2,
                cache_fill={"image": 0.5, "text": 0.25}, cache_evictions={"image": 1, "text": 0},
                worker_id="w0", pairs_acquired=7, budget_total=total, target_rate=0.1,
                labels={"MATCH": 7}, dims=dict(DIMS))
    return EngineStatus(**{**base, **fields})


def test_status_round_trip():
    msg = pb.ServiceStatus.FromString(codecs.status_to_proto(_status(), serving=True)
                                      .SerializeToString())
    assert (msg.worker_id, msg.budget_total, msg.budget_spent, msg.budget_remaining) == \
        ("w0", 40, 10, 30)
    assert (msg.acceptance_rate, msg.target_rate, msg.threshold, msg.model_version,
            msg.pairs_acquired, msg.serving) == (0.2, 0.1, 0.55, 2, 7, True)
    mods = {m.modality: m for m in msg.modalities}
    assert (mods["image"].dim, mods["image"].seen, mods["image"].accepted,
            mods["image"].cache_fill, mods["image"].cache_evictions) == (12, 30, 6, 0.5, 1)
    assert (mods["text"].dim, mods["text"].seen, mods["text"].accepted) == (8, 20, 4)
    unlimited = codecs.status_to_proto(_status(total=None, remaining=None), serving=False)
    assert ((unlimited.budget_total, unlimited.budget_remaining, unlimited.serving)
            == (-1, -1, False))
    assert math.isnan(codecs.status_to_proto(_status(threshold=math.nan)).threshold)
    assert not msg.validation_recall and msg.trainer  # defaults: none measured; trains
    measured = codecs.status_to_proto(_status(validation_recall={5: 0.9, 1: 0.6},
                                              validation_pairs=12, trainer=False))
    assert [(r.k, r.recall) for r in measured.validation_recall] == [(1, 0.6), (5, 0.9)]
    assert (measured.validation_pairs, measured.trainer) == (12, False)
    assert math.isnan(msg.expected_gain)  # not known yet
    gain = codecs.status_to_proto(_status(expected_gain=0.03, expected_gain_se=0.01,
                                          expected_gain_pairs=100))
    assert (gain.expected_gain, gain.expected_gain_se, gain.expected_gain_pairs) == \
        (0.03, 0.01, 100)
    assert (msg.budget_unit, msg.cost_spent, msg.cost_total) == ("items", 0.0, -1.0)
    cost = codecs.status_to_proto(_status(budget_unit="cost", cost_spent=7.5, cost_total=12.0,
                                          expected_cost={"image": 3.0, "text": 1.0}))
    assert (cost.budget_unit, cost.cost_spent, cost.cost_total) == ("cost", 7.5, 12.0)
    assert dict(cost.expected_cost) == {"image": 3.0, "text": 1.0}


def test_dead_letter_bytes():
    data = codecs.dead_letter_bytes("non_finite", "event 'e1': NaN", b"\x01\x02",
                                    "pairsieve.features.v1", 3, 42, 1_700_000_000.5)
    dl = pb.DeadLetter.FromString(data)
    assert (dl.reason, dl.detail, dl.original, dl.source_topic, dl.source_partition,
            dl.source_offset) == ("non_finite", "event 'e1': NaN", b"\x01\x02",
                                  "pairsieve.features.v1", 3, 42)
    assert codecs.seconds(dl, "failed_at") == pytest.approx(1_700_000_000.5)
    dl = pb.DeadLetter.FromString(codecs.dead_letter_bytes("oversized", "x", b"", None, None,
                                                           None, 0.0))
    assert (dl.source_partition, dl.source_offset) == (-1, -1)


@given(st.integers(min_value=0, max_value=70_000), st.integers(min_value=1024, max_value=66_000))
@settings(max_examples=60, deadline=None)
def test_a_dead_letter_never_exceeds_its_limit_and_always_names_its_original(size, limit):
    import hashlib

    original = bytes(range(256)) * (size // 256) + b"\x07" * (size % 256)
    data = codecs.dead_letter_bytes("oversized", "detail " * 40, original, "t", 0, 9, 1.0,
                                    max_bytes=limit)
    assert len(data) <= limit - min(codecs.DEAD_LETTER_HEADROOM, limit // 8)
    dl = pb.DeadLetter.FromString(data)
    assert dl.original_sha256 == hashlib.sha256(original).hexdigest()
    assert dl.original_size == size and dl.source_offset == 9
    assert dl.original == (b"" if dl.original_omitted else original)
    whole = codecs.dead_letter_bytes("oversized", "detail " * 40, original, "t", 0, 9, 1.0)
    fits = len(whole) <= limit - min(codecs.DEAD_LETTER_HEADROOM, limit // 8)
    assert dl.original_omitted == (not fits)  # the original travels whenever it fits


def test_wire_error_rejects_unknown_reason():
    with pytest.raises(ValueError, match="unknown wire error reason 'bogus'"):
        WireError("bogus", "x")


def _one_by_one(msgs, dims):
    """Reference for events_from_protos: event_from_proto per message, first error wins."""
    out = []
    for i, m in enumerate(msgs):
        try:
            out.append(codecs.event_from_proto(m, dims))
        except WireError as exc:
            raise exc.prefixed(f"batch event {i} of {len(msgs)}: ") from None
    return out


CORRUPTIONS = ("none", "nan", "inf", "huge", "short", "odd_bytes", "dim", "modality", "no_id",
               "no_vector")


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12),
       faults=st.lists(st.tuples(st.integers(0, 11), st.sampled_from(CORRUPTIONS)), max_size=3))
def test_bulk_batch_decoding_equals_event_by_event(seed, n, faults):
    rng = np.random.default_rng(seed)
    msgs = []
    for i in range(n):
        mod = "image" if rng.random() < 0.5 else "text"
        vec = rng.normal(size=DIMS[mod]).astype("<f4")
        msgs.append(pb.FeatureEvent(event_id=f"e{i}", item_id=f"x{i}", modality=mod,
                                    dim=DIMS[mod], vector=vec.tobytes(), source="s",
                                    metadata={"k": str(i)}))
    for idx, kind in dict(faults).items():  # at most one fault per event
        if idx >= n or kind == "none":
            continue
        m = msgs[idx]
        vec = np.frombuffer(m.vector, "<f4").copy() if m.vector else np.zeros(m.dim, "<f4")
        if kind in ("nan", "inf", "huge"):
            vec[rng.integers(len(vec))] = {"nan": np.nan, "inf": np.inf, "huge": 1e30}[kind]
            m.vector = vec.tobytes()
        elif kind == "short":
            m.vector = vec[:-1].tobytes()
        elif kind == "odd_bytes":
            m.vector = m.vector + b"\x00"
        elif kind == "dim":
            m.dim += 1
        elif kind == "modality":
            m.modality = "audio"
        elif kind == "no_id":
            m.event_id = ""
        else:
            m.vector = b""
    try:
        want = _one_by_one(msgs, DIMS)
    except WireError as exc:
        with pytest.raises(WireError) as got:
            codecs.events_from_protos(msgs, DIMS)
        assert (got.value.reason, str(got.value)) == (exc.reason, str(exc))
        return
    got = codecs.events_from_protos(msgs, DIMS)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g.event_id, g.item_id, g.modality, g.event_time, g.source, g.metadata) == \
            (w.event_id, w.item_id, w.modality, w.event_time, w.source, w.metadata)
        assert g.vector.dtype == np.float32 and g.vector.flags.writeable
        np.testing.assert_array_equal(g.vector, w.vector)


def test_budget_reservation_round_trip_and_bad_bytes():
    raw = codecs.reservation_bytes("w-1:abc:0", "w-1:abc", "w-1", ["ev-1", "ev-2"],
                                   1_700_000_000.5)
    assert codecs.reservation_from_bytes(raw) == ("w-1:abc:0", "w-1:abc", ["ev-1", "ev-2"])
    with pytest.raises(codecs.WireError, match="budget reservation: missing field "
                                               "'reservation_id'") as err:
        codecs.reservation_from_bytes(codecs.reservation_bytes("", "w-1:abc", "w-1", ["ev-1"]))
    assert err.value.reason == "missing_field"
    with pytest.raises(codecs.WireError) as err:
        codecs.reservation_from_bytes(b"\xff\xff\xff")
    assert err.value.reason == "undecodable"


# --------------------------------------------------------------------------- the batch fast path
_FAST_DIMS = {"image": 3, "text": 2}


def test_the_fast_check_passes_exactly_the_events_the_full_check_passes():
    import itertools

    one = b"\x00\x00\x80\x3f"  # 1.0f
    cases = itertools.product(["", "e", "e" * 256, "e" * 257], ["", "i", "i" * 256, "i" * 257],
                              ["image", "text", "", "audio"], range(5), [0, 4, 7, 8, 12, 16])
    passed = 0
    for event_id, item_id, modality, dim, n_bytes in cases:  # every combination: 1,920
        msg = pb.FeatureEvent(event_id=event_id, item_id=item_id, modality=modality,
                              vector=one * (n_bytes // 4) + b"\x01" * (n_bytes % 4), dim=dim)
        try:
            codecs._check_event(msg, _FAST_DIMS)
            full = True
        except WireError:
            full = False
        assert codecs._passes_checks(msg, _FAST_DIMS) is full, msg
        passed += full
    assert passed == 2 * 2 * 2  # valid ids x valid ids x the two modalities at their own size


def test_a_decoded_event_is_the_dataclass_the_constructor_makes_and_stays_frozen():
    import dataclasses

    msgs = [pb.FeatureEvent(event_id="e1", item_id="i1", modality="image",
                            vector=codecs.encode_vector(np.array([1.0, 2.0, 3.0])), dim=3,
                            source="s", metadata={"k": "v"}),
            pb.FeatureEvent(event_id="e2", item_id="i2", modality="text",
                            vector=codecs.encode_vector(np.array([0.5, -1.0])), dim=2)]
    msgs[0].event_time.FromSeconds(12)
    got = codecs.events_from_protos(msgs, _FAST_DIMS)
    want = [IncomingEvent(event_id="e1", item_id="i1", modality="image",
                          vector=np.array([1, 2, 3], np.float32), event_time=12.0, source="s",
                          metadata={"k": "v"}),
            IncomingEvent(event_id="e2", item_id="i2", modality="text",
                          vector=np.array([0.5, -1], np.float32))]
    for g, w in zip(got, want, strict=True):
        assert type(g) is IncomingEvent
        for f in dataclasses.fields(IncomingEvent):
            a, b = getattr(g, f.name), getattr(w, f.name)
            if f.name == "vector":
                assert a.dtype == np.float32 and np.array_equal(a, b)
            else:
                assert a == b and type(a) is type(b), f.name
        with pytest.raises(dataclasses.FrozenInstanceError):
            g.event_id = "x"  # type: ignore[misc]
    got[0].metadata["k"] = "changed"  # its own dict, not the message's map
    assert msgs[0].metadata["k"] == "v"
    assert got[1].metadata == {} and got[1].event_time is None


@pytest.mark.parametrize("value, kind", [
    (float("nan"), "non_finite"), (float("inf"), "non_finite"), (-float("inf"), "non_finite"),
    (np.nextafter(np.float32(codecs.MAX_ABS_FEATURE), np.float32(np.inf)), "non_finite"),
    (-np.nextafter(np.float32(codecs.MAX_ABS_FEATURE), np.float32(np.inf)), "non_finite"),
    (0.0, "zero_vector"), (codecs.MAX_ABS_FEATURE, None), (-codecs.MAX_ABS_FEATURE, None),
    (1e-30, None)])
def test_one_event_and_a_batch_refuse_and_take_the_same_values(value, kind):
    # the single-event fast path (one reduction over the values) refuses what the full checks do
    vec = np.zeros(3, np.float32) if kind == "zero_vector" else np.array([0.5, value, -1.0],
                                                                          np.float32)
    if kind == "zero_vector":
        vec[:] = value
    msg = pb.FeatureEvent(event_id="e", item_id="i", modality="image", dim=3,
                          vector=codecs.encode_vector(vec))
    for decode in (lambda: codecs.event_from_proto(msg, _FAST_DIMS),
                   lambda: codecs.events_from_protos([msg], _FAST_DIMS)[0]):
        if kind is None:
            assert np.array_equal(decode().vector, vec)
        else:
            with pytest.raises(WireError) as ei:
                decode()
            assert ei.value.reason == kind and "'e'" in str(ei.value)
