"""Coverage-guided fuzzer (atheris + libFuzzer) of the service's input path: decode -> validate ->
decide, on the bytes a Kafka record or a gRPC request carries.

One input is ``payload + opts byte + target byte`` (``atheris.FuzzedDataProvider`` takes the
integers from the end; :func:`split` is the one place that reads that layout). Targets:

* ``features``: a ``pairsieve.features.v1`` record value through
  ``codecs.decode_feature_record`` (header variant and size limit from ``opts``: none, the
  ``FeatureEvent`` or ``FeatureBatch`` header, an empty header list, a header value taken from the
  input), then, as ``StreamProcessor.process_feature_records`` does, ``SelectionHandler.validate``
  and ``SelectionHandler.submit`` in chunks of ``batch_max_items``;
* ``label``: a labels record: ``label_from_proto(pb.AlignmentLabel.FromString(...))`` then
  ``handler.report_alignment`` (as ``StreamProcessor`` takes a label record in);
* ``grpc_submit`` / ``grpc_pool`` / ``grpc_report`` / ``grpc_status``: the raw request bytes
  through the server's lenient deserializer (``service.rpc.server._lenient``), then the real
  ``SelectorServicer`` method with an in-process call context.

Allowed outcomes (the documented rejections):

* features: :class:`codecs.WireError` from decoding (-> dead letter with its reason). A decoded
  batch must then pass ``validate`` and ``submit``: the stream processor says an engine refusal
  "cannot happen after decoding" (it would dead-letter the whole micro-batch as ``rejected``);
* label: ``WireError`` or protobuf ``DecodeError`` from decoding, ``ValueError`` from
  ``report_alignment`` (``rejected``), unresolved labels (``label_unresolved``);
* gRPC: a response, or ``INVALID_ARGUMENT`` (a ``ValueError``/``WireError``, an
  ``UndecodableRequest``). ``INTERNAL`` (any other exception in the servicer) is a finding.

Anything else raises :class:`Finding` (or lets the unexpected exception through), which atheris
reports as a crash with the input saved: an unexpected exception type, an accepted decision whose
utility or cost is NaN/inf, more accepts than the budget, spend that disagrees with the accepts,
a result list that does not match its events, label counts that do not add up.

The engine is built once (a small budget, a recording publisher; rebuilt every
:data:`REBUILD_EVERY` engine calls so its memories stay small and the budget-exhausted and fresh
states both occur).

Usage (libFuzzer flags and corpus directories are passed through; the FIRST directory receives
new inputs, so name a scratch directory first and the committed seeds second)::

    python -m tests.fuzz.fuzz_inputs -runs=3000 -artifact_prefix=/tmp/fz/ /tmp/fz/work \
        tests/fuzz/corpus
    python -m tests.fuzz.fuzz_inputs -max_total_time=180 -timeout=20 /tmp/fz/work tests/fuzz/corpus
    python -m tests.fuzz.fuzz_inputs crash-<sha1>          # re-run one saved input
    python -m tests.fuzz.fuzz_inputs --write-seeds tests/fuzz/corpus   # regenerate the seeds
    python -m tests.fuzz.fuzz_inputs --check-seeds tests/fuzz/corpus   # committed == generated

``PAIRSIEVE_FUZZ_STATS=path`` makes the harness write its outcome counters there (JSON, every
:data:`STATS_EVERY` inputs).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import logging
import math
import os
import sys
from pathlib import Path

import atheris

# Only the service's own modules are instrumented for coverage (torch/numpy would be slow and
# are not what is fuzzed). tests.support imports service.alignment, so it goes in the block too.
with atheris.instrument_imports(include=["service"]):
    import grpc
    import numpy as np
    from google.protobuf.message import DecodeError

    from service.alignment import AlignmentTrainer
    from service.core.budget import BudgetConfig
    from service.core.selector import SelectorConfig, StreamingSelector
    from service.handlers import SelectionHandler
    from service.messages import IncomingEvent, NullPublisher
    from service.rpc.server import SelectorServicer, UndecodableRequest, _lenient
    from service.wire import codecs
    from service.wire.gen.pairsieve.v1 import pairsieve_pb2 as pb
    from tests.support import DIMS, data_and_model

TARGETS = ("features", "label", "grpc_submit", "grpc_pool", "grpc_report", "grpc_status")
HEADER_VARIANTS = ("none", "event", "batch", "empty_list", "fuzzed_value", "other_key")
MAX_BYTES = 16 * 1024 * 1024  # Settings.max_message_bytes default
SMALL_MAX_BYTES = 64  # opts >= 0xF0: exercises the "oversized" check
BATCH_MAX_ITEMS = 64  # Settings.batch_max_items default: the stream processor's chunk size
BUDGET_TOTAL = 24
REBUILD_EVERY = 256
STATS_EVERY = 50


class Finding(AssertionError):
    """A broken contract of the input path (atheris reports it as a crash)."""


# --------------------------------------------------------------------------- input layout
def split(data: bytes) -> tuple[str, int, bytes]:
    """``(target, opts, payload)`` of one fuzz input (see the module docstring)."""
    fdp = atheris.FuzzedDataProvider(data)
    target = TARGETS[fdp.ConsumeIntInRange(0, len(TARGETS) - 1)]
    opts = fdp.ConsumeIntInRange(0, 255)
    return target, opts, fdp.ConsumeBytes(fdp.remaining_bytes())


def join(target: str, opts: int, payload: bytes) -> bytes:
    """The input that :func:`split` reads as ``(target, opts, payload)``."""
    return payload + bytes([opts, TARGETS.index(target)])


def feature_headers(opts: int, payload: bytes) -> tuple[list | None, bytes, int]:
    """``(headers, value, max_bytes)`` of a features record from ``opts`` and the payload."""
    variant = HEADER_VARIANTS[(opts & 0x0F) % len(HEADER_VARIANTS)]
    max_bytes = SMALL_MAX_BYTES if opts >= 0xF0 else MAX_BYTES
    headers: list | None
    if variant == "none":
        headers = None
    elif variant == "event":
        headers = [codecs.FEATURE_HEADER_EVENT]
    elif variant == "batch":
        headers = [codecs.FEATURE_HEADER_BATCH]
    elif variant == "empty_list":
        headers = []
    elif variant == "fuzzed_value":  # first byte: length of the header value that follows
        n = payload[0] % 24 if payload else 0
        headers = [("trace-id", b"x"), (codecs.FEATURE_HEADER, payload[1:1 + n])]
        payload = payload[1 + n:]
    else:  # another key, and the documented key in another case
        headers = [("content-type", b"application/x-protobuf"),
                   ("Pairsieve-Message", b" FeatureBatch " if opts & 0x10 else b"FeatureEvent")]
    return headers, payload, max_bytes


# --------------------------------------------------------------------------- the engine
class RecordingPublisher(NullPublisher):
    """Counts what the handler publishes (never fails)."""

    def __init__(self):
        self.requests = 0
        self.pairs = 0

    async def publish_requests(self, requests):
        self.requests += len(requests)

    async def publish_pairs(self, pairs):
        self.pairs += len(pairs)


class _Aborted(Exception):
    def __init__(self, code, details: str):
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class CallContext:
    """The part of ``grpc.aio.ServicerContext`` the servicer uses: no deadline; ``abort`` raises
    like grpc's does."""

    def time_remaining(self):
        return None

    async def abort(self, code, details):
        raise _Aborted(code, details)


class _ErrorCapture(logging.Handler):
    """Keeps the exception the servicer logs before it answers INTERNAL."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.exc: BaseException | None = None

    def emit(self, record):
        if record.exc_info and record.exc_info[1] is not None:
            self.exc = record.exc_info[1]


class Engine:
    """A real SelectionHandler (small budget) and SelectorServicer on one event loop."""

    def __init__(self):
        import torch

        torch.set_num_threads(1)  # tiny matmuls; the test machine has 2 shared cores
        self.model = data_and_model()[2]
        self.loop = asyncio.new_event_loop()
        self.capture = _ErrorCapture()
        grpc_log = logging.getLogger("pairsieve.grpc")
        grpc_log.addHandler(self.capture)
        grpc_log.propagate = False
        self.handler: SelectionHandler | None = None
        self.builds = 0
        self.rebuild()

    def rebuild(self) -> None:
        if self.handler is not None:
            self.handler.close()
        cfg = SelectorConfig(index_size=128, cache_capacity=64,
                             budget=BudgetConfig(total=BUDGET_TOTAL, target_rate=0.5,
                                                 min_history=8, window=64, explore=0.0,
                                                 warmup_accepts=4))
        sel = StreamingSelector(copy.deepcopy(self.model), cfg, seed=0, device="cpu")
        self.publisher = RecordingPublisher()
        self.handler = SelectionHandler(sel, AlignmentTrainer(DIMS, seed=0), self.publisher,
                                        worker_id="w-fuzz", retrain_every=1000,
                                        dedup_capacity=4096, vector_capacity=4096)
        self.servicer = SelectorServicer(self.handler)
        self.servicer.serving = True
        self.accepts = 0  # fresh (non-duplicate) accepts since the build
        self.calls = 0
        self.builds += 1

    def tick(self) -> SelectionHandler:
        """The handler for the next engine call (rebuilt every REBUILD_EVERY calls)."""
        self.calls += 1
        if self.calls > REBUILD_EVERY:
            self.rebuild()
            self.calls = 1
        assert self.handler is not None
        return self.handler

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def check_outcomes(self, events, outcomes, where: str) -> None:
        """Contracts of ``submit``'s result and the budget after it."""
        if len(outcomes) != len(events):
            raise Finding(f"{where}: {len(events)} events but {len(outcomes)} outcomes")
        for ev, out in zip(events, outcomes, strict=True):
            if out.event_id != ev.event_id:
                raise Finding(f"{where}: outcome for {out.event_id!r} in the place of "
                              f"{ev.event_id!r}")
            d = out.decision
            if not out.duplicate and (d.item_id, d.modality) != (ev.item_id, ev.modality):
                raise Finding(f"{where}: decision for {d.item_id!r}/{d.modality!r}, event is "
                              f"{ev.item_id!r}/{ev.modality!r}")
            if d.accept and not (math.isfinite(d.utility) and math.isfinite(d.cost)):
                raise Finding(f"{where}: accepted {ev.event_id!r} with utility {d.utility!r}, "
                              f"cost {d.cost!r} ({d.reason})")
        fresh_accepts = {o.event_id for o in outcomes if o.decision.accept and not o.duplicate}
        self.accepts += len(fresh_accepts)
        self.check_budget(where)

    def check_budget(self, where: str) -> None:
        assert self.handler is not None
        budget = self.handler.selector.budget
        if self.accepts > BUDGET_TOTAL or budget.spent > BUDGET_TOTAL:
            raise Finding(f"{where}: {self.accepts} accepts / spent {budget.spent} beyond the "
                          f"budget of {BUDGET_TOTAL}")
        if budget.spent != self.accepts:
            raise Finding(f"{where}: spent {budget.spent} but {self.accepts} accepts since the "
                          "engine was built")


ENGINE: Engine | None = None
STATS: dict[str, collections.Counter] = {t: collections.Counter() for t in TARGETS}
_runs = 0


def engine() -> Engine:
    global ENGINE
    if ENGINE is None:
        ENGINE = Engine()
    return ENGINE


# --------------------------------------------------------------------------- targets
def fuzz_features(opts: int, payload: bytes, st: collections.Counter) -> None:
    headers, value, max_bytes = feature_headers(opts, payload)
    try:
        events = codecs.decode_feature_record(value, headers, DIMS, max_bytes)
    except codecs.WireError as exc:
        st[f"wire:{exc.reason}"] += 1
        return
    if not events:
        raise Finding("decode_feature_record returned no events and no WireError")
    for ev in events:
        if not isinstance(ev, IncomingEvent):
            raise Finding(f"decode_feature_record returned {type(ev).__name__}")
    eng = engine()
    handler = eng.tick()
    for ev in events:
        handler.validate(ev)  # the codec checked the ids: any ValueError here is a finding
    for lo in range(0, len(events), BATCH_MAX_ITEMS):
        chunk = events[lo:lo + BATCH_MAX_ITEMS]
        outcomes = eng.run(handler.submit(chunk))  # a ValueError here is a finding too
        eng.check_outcomes(chunk, outcomes, "features submit")
        st["decided"] += len(chunk)
        st["accepted"] += sum(o.decision.accept and not o.duplicate for o in outcomes)


def fuzz_label(opts: int, payload: bytes, st: collections.Counter) -> None:
    try:
        label = codecs.label_from_proto(pb.AlignmentLabel.FromString(payload), DIMS)
    except codecs.WireError as exc:
        st[f"wire:{exc.reason}"] += 1
        return
    except DecodeError:
        st["wire:undecodable"] += 1
        return
    eng = engine()
    handler = eng.tick()
    try:
        result = eng.run(handler.report_alignment([label]))
    except ValueError:  # the engine refused it: dead-lettered as "rejected"
        st["rejected"] += 1
        return
    _check_label_result(result, 1, "label")
    st["label_accepted"] += result.accepted
    st["label_unresolved"] += len(result.unresolved)
    eng.check_budget("label")


def _check_label_result(result, n: int, where: str) -> None:
    total = result.accepted + result.ignored + result.duplicates + len(result.unresolved)
    if total != n or min(result.accepted, result.ignored, result.duplicates) < 0:
        raise Finding(f"{where}: {n} labels but accepted={result.accepted} "
                      f"ignored={result.ignored} duplicates={result.duplicates} "
                      f"unresolved={len(result.unresolved)}")


_GRPC = {
    "grpc_submit": (pb.SubmitRequest, "Submit"),
    "grpc_pool": (pb.SelectPoolRequest, "SelectPool"),
    "grpc_report": (pb.ReportAlignmentRequest, "ReportAlignment"),
    "grpc_status": (pb.GetStatusRequest, "GetStatus"),
}


def fuzz_grpc(target: str, payload: bytes, st: collections.Counter) -> None:
    cls, method = _GRPC[target]
    request = _lenient(cls)(payload)  # what grpc hands the method; raising here is a finding
    if isinstance(request, UndecodableRequest):
        st["undecodable_request"] += 1
    elif not isinstance(request, cls):
        raise Finding(f"lenient {cls.__name__} deserializer returned {type(request).__name__}")
    eng = engine()
    eng.tick()
    eng.capture.exc = None
    call = getattr(eng.servicer, method)
    try:
        response = eng.run(call(request, CallContext()))
    except _Aborted as ab:
        if ab.code == grpc.StatusCode.INVALID_ARGUMENT:
            st["invalid_argument"] += 1
            return
        raise Finding(f"{method}: {ab.code.name} ({ab.details})") from eng.capture.exc
    if isinstance(request, UndecodableRequest):
        raise Finding(f"{method} answered an undecodable request: {response!r}")
    st["ok"] += 1
    if target == "grpc_submit":
        events = codecs.submit_request_from_proto(request, DIMS)
        decisions = list(response.decisions)
        if len(decisions) != len(events):
            raise Finding(f"Submit: {len(events)} events, {len(decisions)} decisions")
        for ev, d in zip(events, decisions, strict=True):
            if d.event_id != ev.event_id:
                raise Finding(f"Submit: decision {d.event_id!r} in the place of {ev.event_id!r}")
            if d.accept and not (math.isfinite(d.utility) and math.isfinite(d.cost)):
                raise Finding(f"Submit: accepted {d.event_id!r} with utility {d.utility!r}, "
                              f"cost {d.cost!r} ({d.reason})")
        eng.accepts += len({d.event_id for d in decisions if d.accept and not d.duplicate})
        st["accepted"] += sum(d.accept and not d.duplicate for d in decisions)
        eng.check_budget("Submit")
    elif target == "grpc_pool":
        ids = {c.item_id for c in request.candidates}
        picked = list(response.selected_item_ids)
        if not set(picked) <= ids or len(picked) > min(request.budget, len(request.candidates)):
            raise Finding(f"SelectPool: picked {picked} of {sorted(ids)} with budget "
                          f"{request.budget}")
    elif target == "grpc_report":
        _check_label_result(response, len(request.labels), "ReportAlignment")


def TestOneInput(data: bytes) -> None:  # noqa: N802 (atheris' name)
    global _runs
    target, opts, payload = split(data)
    st = STATS[target]
    st["runs"] += 1
    if target == "features":
        fuzz_features(opts, payload, st)
    elif target == "label":
        fuzz_label(opts, payload, st)
    else:
        fuzz_grpc(target, payload, st)
    _runs += 1
    if _runs % STATS_EVERY == 0:
        write_stats()


def write_stats() -> None:
    path = os.environ.get("PAIRSIEVE_FUZZ_STATS")
    if not path:
        return
    out = {"runs": _runs, "engine_builds": ENGINE.builds if ENGINE else 0,
           "targets": {t: dict(c) for t, c in STATS.items()}}
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(out, sort_keys=True))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- seeds
def _vec(i: int, modality: str) -> np.ndarray:
    a, b, _ = data_and_model()
    return (a if modality == "image" else b)[i]


def _event(i: int, modality: str, **kw) -> pb.FeatureEvent:
    v = _vec(i, modality)
    return pb.FeatureEvent(event_id=f"ev-{modality[0]}{i}", item_id=f"{modality[0]}{i}",
                           modality=modality, vector=codecs.encode_vector(v), dim=len(v),
                           source="seed", **kw)


def _label(i: int, status, partner: bool = True) -> pb.AlignmentLabel:
    msg = pb.AlignmentLabel(request_id=f"ev-i{i}", item_id=f"i{i}", modality="image",
                            partner_item_id=f"t{i}", status=status, annotator="seed", cost=1.0)
    if partner:
        msg.partner_vector = codecs.encode_vector(_vec(i, "text"))
        msg.partner_dim = DIMS["text"]
    return msg


def seeds() -> dict[str, bytes]:
    """The seed corpus: valid (and a few near-valid) messages of every target, by file name."""
    ts = codecs.timestamp(1_700_000_000.0)
    nan = codecs.encode_vector(np.array([np.nan] + [1.0] * 11, np.float32))
    hv = HEADER_VARIANTS.index
    batch = pb.FeatureBatch(events=[_event(i, m) for i, m in
                                    ((1, "image"), (1, "text"), (2, "image"), (2, "text"))])
    pool = pb.SelectPoolRequest(
        candidates=[pb.PoolCandidate(item_id=f"{m[0]}{i}", modality=m,
                                     vector=codecs.encode_vector(_vec(i, m)), dim=DIMS[m])
                    for i, m in ((20, "image"), (21, "image"), (20, "text"), (22, "text"))],
        budget=2, seed=1)
    pool_coreset = pb.SelectPoolRequest(
        candidates=[pb.PoolCandidate(item_id=f"i{i}", modality="image",
                                     vector=codecs.encode_vector(_vec(i, "image")), dim=12)
                    for i in (23, 24, 25)], budget=1, strategy="coreset")
    table = [  # (file name, target, opts, message or raw payload)
        ("features-event-noheader", "features", hv("none"), _event(0, "image")),
        ("features-event-header", "features", hv("event"), _event(0, "text", event_time=ts)),
        ("features-event-metadata", "features", hv("none"),
         _event(3, "image", metadata={"k": "v"}, encoder_version="e1")),
        ("features-batch-header", "features", hv("batch"), batch),
        ("features-batch-noheader", "features", hv("none"),
         pb.FeatureBatch(events=[_event(i, "image") for i in range(4, 8)])),
        ("features-batch-fuzzedheader", "features", hv("fuzzed_value"),
         bytes([12]) + b"FeatureBatch" + batch.SerializeToString()),
        ("features-event-otherkey", "features", hv("other_key"), _event(9, "text")),
        ("features-event-nan", "features", hv("none"),
         pb.FeatureEvent(event_id="ev-nan", item_id="nan", modality="image", vector=nan, dim=12)),
        ("features-event-oversized", "features", 0xF0, _event(10, "image")),
        ("label-match", "label", 0, _label(0, pb.MATCH)),
        ("label-match-nopartner", "label", 0, _label(1, pb.MATCH, partner=False)),
        ("label-nomatch", "label", 0, _label(2, pb.NO_MATCH, partner=False)),
        ("label-unsure", "label", 0, _label(3, pb.UNSURE)),
        ("grpc-submit", "grpc_submit", 0, pb.SubmitRequest(
            events=[_event(i, m) for i, m in ((11, "image"), (11, "text"), (12, "image"))])),
        ("grpc-pool", "grpc_pool", 0, pool),
        ("grpc-pool-coreset", "grpc_pool", 0, pool_coreset),
        ("grpc-report", "grpc_report", 0, pb.ReportAlignmentRequest(
            labels=[_label(11, pb.MATCH), _label(12, pb.NO_MATCH, partner=False)])),
        ("grpc-status", "grpc_status", 0, pb.GetStatusRequest()),
    ]
    out = {}
    for name, target, opts, msg in table:
        payload = msg if isinstance(msg, bytes) else msg.SerializeToString(deterministic=True)
        data = join(target, opts, payload)
        assert split(data) == (target, opts, payload), name  # the layout round-trips
        out[name] = data
    return out


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        old.unlink()
    for name, data in seeds().items():
        (directory / name).write_bytes(data)


def check_seeds(directory: Path) -> list[str]:
    """Differences between ``directory`` and :func:`seeds` (empty when it is up to date)."""
    want = seeds()
    have = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    problems = [f"missing {n}" for n in sorted(set(want) - set(have))]
    problems += [f"extra {n}" for n in sorted(set(have) - set(want))]
    problems += [f"stale {n}" for n in sorted(set(want) & set(have)) if want[n] != have[n]]
    return problems


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "--write-seeds":
        write_seeds(Path(argv[2]))
        return 0
    if len(argv) == 3 and argv[1] == "--check-seeds":
        problems = check_seeds(Path(argv[2]))
        print("\n".join(problems) or "seeds up to date")
        return 1 if problems else 0
    logging.basicConfig(level=logging.CRITICAL)
    engine()  # built before libFuzzer starts: its set-up is no input's cost
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
