"""Chaos suite: pairsieve's promises under faults, driven from outside as an operator would.

Real ``pairsieve serve`` processes on a Kafka broker (the standalone tansu this script starts,
or yours with ``--bootstrap``), hostile input over Kafka and gRPC, and the checks read back from
the topics (the decision log is the record of what was decided)::

    .venv/bin/python -m loadtests.chaos --out reports/reliability.md            # full (~30 min)
    .venv/bin/python -m loadtests.chaos --short --out runs/chaos-short.md       # ~6 min (CI)
    .venv/bin/python -m loadtests.chaos --scenarios kill,poison --bootstrap k:9092

Scenarios (``--scenarios``, default all):

* ``kill`` -- 1 and 2 workers while a producer streams single-event records: every 10-30 s
  (short: 2-4 s) one worker gets SIGKILL and is restarted. Checked: every acknowledged event
  appears in the decision log (0 lost), requests <= the budget (0 overspend), each event id
  requested at most once (0 duplicate requests), every request holds a unit on the budget ledger
  (the units granted but never requested, by kills between reservation and publish, are
  reported); spawn-to-serving time of every restart.
* ``history`` -- the same with a long history on the topics first (>= 50k selections; short 3k):
  the restarted worker must replay all of it before it decides, or the budget overspends.
* ``poison`` -- one worker, valid events interleaved with 16 kinds of malformed records and
  labels (sizes at and around ``PAIRSIEVE_MAX_MESSAGE_BYTES``, all-zero vectors, over-long and
  non-UTF-8 ids, unknown modality, NaN, wrong dimension, empty batch, bad labels...). Checked:
  dead letters per reason exactly as injected, every valid event decided, no agent crash or
  restart; and valid throughput with 10 % poison as a share of the same worker's clean run.
* ``broker`` -- the broker paused (SIGSTOP) while a producer streams: health NOT_SERVING
  within 15 s, ``Submit`` answers UNAVAILABLE, SERVING again after SIGCONT (recovery time),
  0 events lost. Needs the broker's pid: only with the standalone broker (or ``--broker-pid``).
* ``broker-restart`` -- the broker killed (SIGKILL) and started again on durable storage (tansu
  on S3, served by an in-process moto server) while a producer streams: the same checks as the
  pause, plus no event requested twice and no overspend across the restart. A request record
  written twice (same bytes: a retry after an acknowledgement lost in the crash) is counted
  apart: 0 is the target with an idempotent publisher (``PAIRSIEVE_KAFKA_IDEMPOTENCE``); tansu
  refuses one, so there it is reported as measured (readers deduplicate by request id).
* ``grpc`` -- garbage and mutated frames on every method (0 UNKNOWN/INTERNAL), oversized
  requests (RESOURCE_EXHAUSTED; RSS after 100 of them), deadlines, the concurrency cap
  (RESOURCE_EXHAUSTED beyond it), SIGTERM under load (every ``Submit`` answered OK has its
  decision in the log).
* ``fuzz`` -- the coverage-guided fuzzer (atheris, ``tests/fuzz/fuzz_inputs.py``) on decode ->
  validate -> decide, ``--fuzz-seconds`` (600; short 30): 0 findings.

Exit status 1 when any check fails; the report says which, with the measured value.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.core.budget_ledger import BudgetLedger
from service.messages import IncomingEvent
from service.perfbench.e2e import proc_cpu_seconds
from service.perfbench.loadgen import scrape_pairsieve
from service.streaming.topics import (
    BUDGET_LEDGER_TOPIC,
    DEAD_LETTER_TOPIC,
    DECISIONS_TOPIC,
    FEATURES_TOPIC,
    LABELS_TOPIC,
    REQUESTS_TOPIC,
    create_topics,
    topic_configs,
    topic_specs,
)
from service.wire import codecs

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = "image:32,text:16"
DIMS = {"image": 32, "text": 16}
PARTITIONS = 4
_SERVING = re.compile(r"pairsieve serving: gRPC :(\d+), metrics :(\d+)")


def say(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------- plumbing
@dataclass
class Check:
    """One checked promise: what, the target, what was measured, passed. ``info``: a timing
    reported but not judged (the short version's speed figures: no timed assertions in CI)."""
    scenario: str
    what: str
    target: str
    measured: str
    ok: bool
    info: bool = False


@dataclass
class Deployment:
    """Where the scenarios run: a broker and a fresh topic suffix per scenario."""
    bootstrap: str
    broker_pid: int | None
    workdir: Path
    checks: list[Check] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)

    def topics(self, partitions: int = PARTITIONS, max_message_bytes: int = 16 << 20) -> str:
        suffix = ".chaos-" + uuid.uuid4().hex[:8]
        specs = {t + suffix: n for t, n in topic_specs(partitions).items()}
        configs = {t + suffix: c for t, c in topic_configs(max_message_bytes).items()}
        create_topics(self.bootstrap, specs, configs=configs)
        return suffix

    def check(self, scenario: str, what: str, target: str, measured, ok: bool,
              info: bool = False) -> bool:
        self.checks.append(Check(scenario, what, target, str(measured), bool(ok), info))
        verdict = "INFO" if info else "PASS" if ok else "FAIL"
        say(f"{verdict} {scenario}: {what}: {measured} (target {target})")
        return bool(ok)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and not c.info]


class Worker:
    """One ``pairsieve serve`` process (``python -m service serve``) with its own log."""

    def __init__(self, dep: Deployment, suffix: str, name: str, group: str, **env):
        self.dep, self.suffix, self.name, self.group = dep, suffix, name, group
        self.env = {k.upper(): str(v) for k, v in env.items()}
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.grpc_port = self.metrics_port = 0
        self.log_path = dep.workdir / f"{name}.log"

    def spawn(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PAIRSIEVE_KAFKA_BOOTSTRAP": self.dep.bootstrap,
               "PAIRSIEVE_TOPIC_SUFFIX": self.suffix, "PAIRSIEVE_MODALITIES": MODALITIES,
               "PAIRSIEVE_FEATURES_PARTITIONS": str(PARTITIONS), "PAIRSIEVE_GROUP_ID": self.group,
               "PAIRSIEVE_WORKER_ID": self.name, "PAIRSIEVE_GRPC_PORT": "0",
               "PAIRSIEVE_GRPC_HOST": "127.0.0.1", "PAIRSIEVE_METRICS_PORT": "0",
               "PAIRSIEVE_METRICS_HOST": "127.0.0.1", "PAIRSIEVE_DEVICE": "cpu",
               "PAIRSIEVE_EMBEDDING_DIM": "16", "PAIRSIEVE_REBALANCE_TIMEOUT_SECONDS": "3",
               "PAIRSIEVE_SESSION_TIMEOUT_SECONDS": "3", "PAIRSIEVE_SHUTDOWN_GRACE_SECONDS": "5",
               **{f"PAIRSIEVE_{k}": v for k, v in self.env.items()}}
        self.starts += 1
        self.log = open(self.log_path, "a")
        self.log.write(f"\n===== start {self.starts} at {time.time():.3f}\n")
        self.log.flush()
        self._log_offset = self.log_path.stat().st_size
        self.spawned_at = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env,
                                     cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def _new_log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            f.seek(self._log_offset)
            return f.read()

    def wait_serving(self, timeout_s: float = 120.0) -> float:
        """Seconds from spawn to the "serving" log line (raises on exit or timeout)."""
        while time.monotonic() - self.spawned_at < timeout_s:
            m = _SERVING.search(self._new_log())
            if m:
                self.grpc_port, self.metrics_port = int(m.group(1)), int(m.group(2))
                return time.monotonic() - self.spawned_at
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}: "
                                   f"{self._new_log()[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not serving after {timeout_s}s: "
                           f"{self._new_log()[-2000:]}")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


class Tail(threading.Thread):
    """Reads ``topic`` from its start, decoding every record with ``parse``, until stopped;
    ``items`` holds what ``parse`` returned, or with ``many`` the items of the lists it
    returned (a decision-log record holds a batch)."""

    def __init__(self, bootstrap: str, topic: str, parse, *, many: bool = False):
        super().__init__(daemon=True, name=f"tail-{topic}")
        from kafka import KafkaConsumer

        self.items: list = []
        self.stopping = threading.Event()
        self.parse = parse
        self.many = many
        self.c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                               group_id=None, consumer_timeout_ms=200,
                               max_partition_fetch_bytes=32 << 20, fetch_max_bytes=64 << 20)
        self.start()

    def run(self) -> None:
        while not self.stopping.is_set():
            for rec in self.c:
                if self.many:
                    self.items.extend(self.parse(rec.value))
                else:
                    self.items.append(self.parse(rec.value))
                if self.stopping.is_set():
                    break
        self.c.close()

    def stop(self) -> list:
        self.stopping.set()
        self.join(10)
        return list(self.items)


def decided_id_at(value: bytes) -> list[tuple[str, float]]:
    """(event id, the worker's ``decided_at`` in seconds) of each decision of one decision-log
    record (a worker writes one record per engine batch)."""
    outcomes, at = codecs.decision_records_from_proto(codecs.pb.DecisionRecord.FromString(value))
    return [(o.event_id, at) for o in outcomes]


def decided_id(value: bytes) -> list[str]:
    return [event_id for event_id, _ in decided_id_at(value)]


def decision_rate(decided_at: Sequence[float]) -> float:
    """A worker's decisions per second from its own clock: the events decided after its first
    micro-batch over the time from that batch to the last (every event of a batch carries the
    batch's ``decided_at``). The worker's start-up, its consumer-group join and the driver's
    polling delay fall outside; NaN with fewer than two distinct times."""
    if not decided_at:
        return float("nan")
    first, last = min(decided_at), max(decided_at)
    if last <= first:
        return float("nan")
    return sum(1 for t in decided_at if t > first) / (last - first)


def request_id(value: bytes) -> str:
    return codecs.pb.AlignmentRequest.FromString(value).request_id


def request_key(value: bytes) -> tuple[str, str]:
    """(request id, digest of the whole record). Two records of one id and one digest are one
    request written twice (a retry after a lost acknowledgement: the same bytes, the same
    ``requested_at``); two digests are two decisions for one event (a double spend)."""
    return request_id(value), hashlib.sha256(value).hexdigest()[:16]


@dataclass
class RequestTally:
    """What the requests topic holds, by event: distinct requests, events requested twice (two
    different records: a double spend) and copies (one record written more than once)."""

    ids: set
    twice: list
    copies: list

    @classmethod
    def of(cls, keys: list[tuple[str, str]]) -> RequestTally:
        digests: dict[str, set] = {}
        for rid, digest in keys:
            digests.setdefault(rid, set()).add(digest)
        n_by_id = Counter(rid for rid, _ in keys)
        return cls(set(digests), sorted(r for r, d in digests.items() if len(d) > 1),
                   sorted(r for r, n in n_by_id.items() if n > len(digests[r])))


def dead_reason(value: bytes) -> str:
    return codecs.pb.DeadLetter.FromString(value).reason


def event(i: int, prefix: str, rng: np.random.Generator, **kw) -> IncomingEvent:
    m = "image" if i % 2 == 0 else "text"
    vec = kw.pop("vector", None)
    if vec is None:
        vec = rng.normal(size=DIMS[m]).astype(np.float32)
    return IncomingEvent(kw.pop("event_id", f"{prefix}-{i}"), kw.pop("item_id", f"{prefix}-i{i}"),
                         kw.pop("modality", m), vec, time.time())


class Producer(threading.Thread):
    """Streams ``n`` single-event records at ``rate``/s; ``acked`` holds the event ids the
    broker acknowledged (acks=all). Keeps trying through broker pauses."""

    def __init__(self, bootstrap: str, topic: str, n: int, rate: float, prefix: str, seed: int):
        super().__init__(daemon=True, name="producer")
        from kafka import KafkaProducer

        self.p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                               request_timeout_ms=60000, delivery_timeout_ms=300000,
                               max_block_ms=300000)
        self.topic, self.n, self.rate, self.prefix = topic, n, rate, prefix
        self.rng = np.random.default_rng(seed)
        self.acked: set[str] = set()
        self.failed = 0
        self.start()

    def run(self) -> None:
        t0 = time.monotonic()
        futures = []
        for i in range(self.n):
            due = t0 + i / self.rate
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            ev = event(i, self.prefix, self.rng)
            fut = self.p.send(self.topic, codecs.encode_feature_event(ev),
                              key=ev.item_id.encode())
            futures.append((ev.event_id, fut))
        for eid, fut in futures:
            try:
                fut.get(timeout=300)
                self.acked.add(eid)
            except Exception:
                self.failed += 1
        self.p.close()


def wait_until(pred, timeout_s: float, every_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every_s)
    return bool(pred())


def wait_settled(count, want: int, timeout_s: float, quiet_s: float = 8.0) -> int:
    """Wait until ``count()`` reaches ``want`` or has not grown for ``quiet_s`` (a reader that
    caught up with a topic missing some records); returns the last count."""
    deadline = time.monotonic() + timeout_s
    last, since = count(), time.monotonic()
    while last < want and time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.25)
        now = count()
        if now > last:
            last, since = now, time.monotonic()
    return last


# ---------------------------------------------------------------------------------- kill
def scenario_kill(dep: Deployment, workers: int, short: bool, history: int = 0) -> None:
    name = f"kill-{workers}w" + (f"+history{history // 1000}k" if history else "")
    suffix = dep.topics()
    if history:
        from loadtests.startup import fill

        say(f"{name}: filling {history} earlier selections ...")
        fill(dep.bootstrap, suffix, DIMS, history, 0, PARTITIONS, seed=1, say=say,
             embedding_dim=16)
    n_events = 1500 if short else 12000
    rate = 150.0 if short else 120.0
    kills = 3 if short else 6
    gap = (2.0, 4.0) if short else (10.0, 30.0)
    budget = history + (60 if short else 400)
    group = "chaos-" + uuid.uuid4().hex[:6]
    ws = [Worker(dep, suffix, f"{name}-w{k}", group, budget_total=budget, target_rate=0.1,
                 warmup_accepts=5, decision_replay=200000) for k in range(workers)]
    for w in ws:
        w.spawn()
    for w in ws:
        w.wait_serving()
    decided = Tail(dep.bootstrap, DECISIONS_TOPIC + suffix, decided_id, many=True)
    requests = Tail(dep.bootstrap, REQUESTS_TOPIC + suffix, request_key)
    ledger = Tail(dep.bootstrap, BUDGET_LEDGER_TOPIC + suffix, codecs.reservation_from_bytes)
    prod = Producer(dep.bootstrap, FEATURES_TOPIC + suffix, n_events, rate, f"{name}", seed=3)
    rng = random.Random(7)
    restarts: list[float] = []
    for _ in range(kills):
        time.sleep(rng.uniform(*gap))
        w = rng.choice(ws)
        say(f"{name}: kill -9 {w.name} (pid {w.proc.pid})")
        w.kill9()
        w.spawn()
        restarts.append(w.wait_serving())
    prod.join()
    wanted = prod.acked

    def all_decided() -> bool:
        return wanted <= set(decided.items)

    wait_until(all_decided, 180)
    time.sleep(2)
    seen = set(decided.stop())
    reqs = requests.stop()
    reservations = ledger.stop()
    for w in ws:
        w.stop()
    tally = RequestTally.of([k for k in reqs if k[0].startswith(name)])
    missing = sorted(wanted - seen)
    lost = len(missing)
    # a missing decision record of a requested event: its worker was killed between writing
    # the request and the decision record, and the redelivery did not write it
    requested = sum(1 for e in missing if e in tally.ids)
    dep.check(name, "acknowledged events without a decision (lost)", "0",
              f"{lost} of {len(wanted)} ({prod.failed} sends not acknowledged; {requested} of "
              f"the lost requested) {missing[:5]}", lost == 0)
    dep.check(name, "budget overspend (requests - budget)", "0",
              f"{max(0, len(reqs) - budget)} ({len(reqs)} requests, budget {budget})",
              len(reqs) <= budget)
    # the budget ledger, applied in its order as every worker applies it: units granted to
    # an accept whose worker was killed before it published the request stay unspent
    grants = BudgetLedger(budget)
    for _, holder, ids in reservations:
        grants.apply(ids, holder)
    distinct = {k[0] for k in reqs}
    unheld = sorted(e for e in distinct if not grants.holds(e))
    dep.check(name, "requests without a unit on the budget ledger", "0",
              f"{len(unheld)} {unheld[:5]}", not unheld)
    dep.check(name, "budget units granted on the ledger but never requested (kills between "
              "reservation and publish)", "reported",
              f"{grants.granted - len(distinct)} ({grants.granted} granted in "
              f"{len(reservations)} reservations, {len(distinct)} requested)", True, info=True)
    dup = len(tally.twice) + len(tally.copies)
    dep.check(name, "duplicate requests (an event id requested twice, or one request written "
              "twice)", "0", f"{dup} {(tally.twice + tally.copies)[:5]}", dup == 0)
    dep.check(name, f"restarts after kill -9 (spawn -> serving, s; {len(restarts)} kills)",
              "p95 <= 30 s",
              f"median {statistics.median(restarts):.1f}, max {max(restarts):.1f}",
              max(restarts) <= 30, info=short)


# ---------------------------------------------------------------------------------- poison
LIMIT = 65536


def _sized_batch(target: int, prefix: str, rng) -> bytes:
    """A valid FeatureBatch record of exactly ``target`` bytes (the last event's ``source``
    padded; one more character of its item id when a length-prefix step skips the size)."""
    evs, i = [], 0
    while len(codecs.encode_feature_batch(evs)) < target - 1200:
        evs.append(event(i, prefix, rng))
        i += 1
    base = len(codecs.encode_feature_batch(evs[:-1]))
    last = evs[-1]
    for extra in range(4):
        for pad in range(1600):
            cand = IncomingEvent(last.event_id, last.item_id + "x" * extra, last.modality,
                                 last.vector, last.event_time, source="p" * pad)
            n = len(codecs.encode_feature_event(cand))  # + field tag and length varint
            size = base + 1 + len(_varint(n)) + n
            if size == target:
                value = codecs.encode_feature_batch([*evs[:-1], cand])
                assert len(value) == target
                return value
            if size > target:
                break
    raise ValueError(f"cannot build a {target}-byte batch")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def poison_records(rng, prefix: str) -> list[tuple[str, str, bytes, list | None]]:
    """(kind, expected dead-letter reason, value, headers) for every malformed kind; topic
    'features' or 'labels' is in the kind's prefix."""
    pb = codecs.pb
    batch_h = [codecs.FEATURE_HEADER_BATCH]

    def ev(**kw) -> bytes:
        base = dict(event_id=f"{prefix}-bad-{uuid.uuid4().hex[:8]}", item_id="x",
                    modality="image", vector=np.ones(32, "<f4").tobytes(), dim=32)
        base.update(kw)
        return pb.FeatureEvent(**base).SerializeToString()

    def label(**kw) -> bytes:
        base = dict(request_id=f"{prefix}-lab-{uuid.uuid4().hex[:8]}", item_id="never-seen",
                    modality="image", partner_item_id="p", status=pb.MATCH, annotator="a")
        base.update(kw)
        return pb.AlignmentLabel(**base).SerializeToString()

    bad_utf8 = bytearray(ev(event_id="zzzzzzzz"))
    at = bad_utf8.index(b"zzzzzzzz")
    bad_utf8[at:at + 2] = b"\xff\xfe"
    over = _sized_batch(LIMIT + 1, f"{prefix}-over1", rng)
    return [
        ("features: undecodable bytes", "undecodable", b"\xff\x00not protobuf at all", None),
        ("features: non-UTF-8 event id", "undecodable", bytes(bad_utf8), None),
        ("features: wrong dimension", "wrong_dimension",
         ev(vector=np.ones(3, "<f4").tobytes(), dim=3), None),
        ("features: NaN vector", "non_finite",
         ev(vector=np.full(32, np.nan, "<f4").tobytes()), None),
        ("features: unknown modality", "unknown_modality", ev(modality="audio"), None),
        ("features: missing event id", "missing_field", ev(event_id=""), None),
        ("features: all-zero vector", "zero_vector", ev(vector=np.zeros(32, "<f4").tobytes()),
         None),
        ("features: 300-character id", "out_of_range", ev(item_id="i" * 300), None),
        ("features: empty FeatureBatch", "empty_batch", b"", batch_h),
        ("features: record of limit + 1 bytes", "oversized", over, batch_h),
        ("features: record of 2 x limit bytes", "oversized", over + over[:LIMIT - 1], batch_h),
        ("labels: undecodable bytes", "undecodable", b"\xff\xfe\xfd", None),
        ("labels: MATCH for an unknown item", "label_unresolved", label(), None),
        ("labels: negative cost", "out_of_range", label(cost=-1.0), None),
        ("labels: NaN cost", "non_finite", label(cost=float("nan")), None),
        ("labels: wrong partner dimension", "wrong_dimension",
         label(partner_vector=np.ones(3, "<f4").tobytes(), partner_dim=3), None),
    ]


def _run_poison_stream(dep: Deployment, n_valid: int, poison_every: int | None, tag: str,
                       rng, keep=lambda kind, reason: True) -> dict:
    """Preload a topic (valid events, poison mixed in when ``poison_every``: every
    ``poison_every``-th record one of the kinds in turn, sent only when ``keep`` lets it through,
    so a breakdown leaves the other records where they were), start one worker, time until every
    valid event is decided. Clean and poisoned runs carry the same valid records, the two
    FeatureBatch records exactly at and just below the size limit included."""
    from kafka import KafkaProducer

    suffix = dep.topics(max_message_bytes=LIMIT)
    prefix = f"{tag}"
    prod = KafkaProducer(bootstrap_servers=dep.bootstrap, acks="all", linger_ms=20,
                         max_request_size=4 * LIMIT)
    kinds = poison_records(rng, prefix) if poison_every else []
    expected: Counter = Counter()
    per_kind: Counter = Counter()
    valid_ids = []
    sizes_ok = []
    k = 0
    for i in range(n_valid):
        e = event(i, prefix, rng)
        valid_ids.append(e.event_id)
        prod.send(FEATURES_TOPIC + suffix, codecs.encode_feature_event(e), key=e.item_id.encode())
        if poison_every and i % poison_every == 0:
            kind, reason, value, headers = kinds[k % len(kinds)]
            k += 1
            if not keep(kind, reason):
                continue
            topic = (LABELS_TOPIC if kind.startswith("labels") else FEATURES_TOPIC) + suffix
            prod.send(topic, value, headers=headers)
            expected[reason] += 1
            per_kind[kind] += 1
    for size in (LIMIT, LIMIT - 1):  # valid records exactly at and just below the limit
        value = _sized_batch(size, f"{prefix}-at{size}", rng)
        batch = codecs.pb.FeatureBatch.FromString(value)
        valid_ids += [x.event_id for x in batch.events]
        sizes_ok.append(size)
        prod.send(FEATURES_TOPIC + suffix, value, headers=[codecs.FEATURE_HEADER_BATCH])
    prod.flush()
    prod.close()
    w = Worker(dep, suffix, f"poison-{tag}", "chaos-" + uuid.uuid4().hex[:6],
               max_message_bytes=LIMIT, target_rate=0.05)
    w.spawn()
    w.wait_serving()
    t0, cpu0 = time.monotonic(), proc_cpu_seconds(w.proc.pid)
    want = set(valid_ids)
    # While the worker runs, the driver only reads its decided-events count, twice a second:
    # decoding the decision log as it grew took a third of a core on this 2-core machine, and
    # rendering /metrics costs the worker's interpreter a few milliseconds (every 50 ms it took
    # a third as much CPU as the engine). The rates come from the worker's own clock, so the
    # polling interval does not enter them. The log is read (and checked) afterwards. (The
    # decision log's end offsets are no such probe on tansu 0.6.0: its latest offset lagged
    # the records it held by about the last batch of each partition.)
    url = f"http://127.0.0.1:{w.metrics_port}/metrics"
    wait_until(lambda: scrape_pairsieve(url)["decided"] >= len(want), 300, every_s=0.5)
    took, cpu = time.monotonic() - t0, proc_cpu_seconds(w.proc.pid) - cpu0
    end = scrape_pairsieve(url)
    mean_batch = end["batch_sum"] / max(1.0, end["batch_count"])
    decided = Tail(dep.bootstrap, DECISIONS_TOPIC + suffix, decided_id_at, many=True)
    dead = Tail(dep.bootstrap, DEAD_LETTER_TOPIC + suffix, dead_reason)
    wait_until(lambda: want <= {i for i, _ in decided.items}, 60, every_s=0.25)
    wait_until(lambda: sum(expected.values()) <= len(dead.items), 30)
    time.sleep(1.0)
    records, reasons = decided.stop(), Counter(dead.stop())
    seen = {i for i, _ in records}
    alive = w.proc.poll() is None
    w.stop()
    log = w.log_text()
    return {"took": took, "valid": len(want), "lost": len(want - seen), "reasons": reasons,
            "rate": decision_rate([t for i, t in records if i in want]),
            "cpu_rate": len(want) / cpu if cpu > 0 else float("nan"), "batch": mean_batch,
            "expected": expected, "per_kind": per_kind, "alive": alive, "starts": w.starts,
            "crashes": len(re.findall(r"crashed|Traceback", log)), "sizes_ok": sizes_ok}


def _ratio_text(ratios: Sequence[float], what: str) -> str:
    return (f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}; "
            f"{what})")


def scenario_poison(dep: Deployment, short: bool) -> None:
    rng = np.random.default_rng(11)
    n_valid = 2000 if short else 18000
    reps = 1 if short else 5
    runs = []
    for r in range(reps):  # interleaved: clean, poisoned, clean, poisoned, ...
        clean = _run_poison_stream(dep, n_valid, None, f"clean{r}", rng)
        dirty = _run_poison_stream(dep, n_valid, 9, f"dirty{r}", rng)  # 1 in 9: 10 % of records
        runs.append((clean, dirty))
        say(f"poison: repetition {r + 1}: clean {clean['rate']:.0f}, poisoned "
            f"{dirty['rate']:.0f} valid events/s on the worker's clock, "
            f"{clean['cpu_rate']:.0f} and {dirty['cpu_rate']:.0f} per worker CPU-second "
            f"(serving to the last decision {clean['took']:.1f} s, {dirty['took']:.1f} s; mean "
            f"micro-batch {clean['batch']:.0f} and {dirty['batch']:.0f} valid events)")
    dirty = runs[0][1]
    n_kinds = len(dirty["per_kind"])
    dep.check("poison", f"malformed kinds injected ({sum(dirty['per_kind'].values())} records "
              f"per run, {reps} run(s))", ">= 12", n_kinds, n_kinds >= 12)
    for i, (_, d) in enumerate(runs):
        tag = f" (run {i + 1})" if reps > 1 else ""
        dep.check("poison", "dead letters per reason = injected" + tag, "exact",
                  ", ".join(f"{r} {d['reasons'][r]}/{d['expected'][r]}"
                            for r in sorted(set(d["expected"]) | set(d["reasons"]))),
                  d["reasons"] == d["expected"])
        dep.check("poison", "valid events without a decision (incl. records at limit and "
                  "limit-1)" + tag, "0", f"{d['lost']} of {d['valid']}", d["lost"] == 0)
        dep.check("poison", "agent crashes / worker restarts / tracebacks" + tag, "0",
                  f"alive {d['alive']}, starts {d['starts']}, tracebacks {d['crashes']}",
                  d["alive"] and d["starts"] == 1 and d["crashes"] == 0)
    wall = [d["rate"] / c["rate"] for c, d in runs]
    cpu = [d["cpu_rate"] / c["cpu_rate"] for c, d in runs]
    clean_rate = statistics.median(c["rate"] for c, _ in runs)
    dep.check("poison", f"valid throughput with 10 % poison (all 16 kinds) / clean, same worker "
              f"settings: decisions/s on the worker's clock (median of {reps} interleaved pairs)",
              ">= 0.90", _ratio_text(wall, f"clean {clean_rate:.0f} events/s"),
              statistics.median(wall) >= 0.9, info=short)
    dep.check("poison", f"valid events per worker CPU-second with 10 % poison / clean (median of "
              f"{reps} interleaved pairs)", "(measured)",
              _ratio_text(cpu, f"clean {statistics.median(c['cpu_rate'] for c, _ in runs):.0f} "
                               "per CPU-second"), True, info=True)
    if not short:  # where the cost comes from: the same positions, some kinds left out
        for part, (what, keep) in enumerate((
                ("without the 250 oversized records (14 kinds, 1,750 records)",
                 lambda kind, reason: reason != "oversized"),
                ("the 250 oversized records alone (64-128 KiB each)",
                 lambda kind, reason: reason == "oversized"))):
            pairs = []
            for r in range(3):
                c = _run_poison_stream(dep, n_valid, None, f"cl-{part}-{r}", rng)
                d = _run_poison_stream(dep, n_valid, 9, f"dl-{part}-{r}", rng, keep)
                pairs.append((c, d))
            dep.check("poison", f"poison {what} / clean: valid events/s on the worker's "
                      "clock; per worker CPU-second (median of 3 pairs)", "(breakdown)",
                      _ratio_text([d["rate"] / c["rate"] for c, d in pairs], "clock") + "; "
                      + _ratio_text([d["cpu_rate"] / c["cpu_rate"] for c, d in pairs], "CPU"),
                      True, info=True)
    dep.facts.append("poison kinds: " + "; ".join(f"{k} -> {r}" for k, r, _, _ in
                                                  poison_records(rng, "x")))


# ---------------------------------------------------------------------------------- broker
def _health(port: int, timeout_s: float = 1.0) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                      timeout=timeout_s)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    except grpc.RpcError as exc:
        return exc.code().name


def _submit(port: int, events: list[IncomingEvent], timeout_s: float = 5.0) -> str:
    import grpc

    from service.wire.gen.pairsieve.v1 import pairsieve_pb2_grpc as pb_grpc

    req = codecs.pb.SubmitRequest(events=[codecs.event_to_proto(e) for e in events])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            pb_grpc.SelectorStub(ch).Submit(req, timeout=timeout_s)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def _while_broker_down(dep: Deployment, scenario: str, what: str, port: int, seconds: float,
                       prefix: str, seed: int) -> None:
    """For ``seconds`` after the broker went away: probe health until NOT_SERVING, then call
    ``Submit`` every 0.5 s; check both (NOT_SERVING within 15 s, UNAVAILABLE only)."""
    t0 = time.monotonic()
    not_serving_after = None
    codes: Counter = Counter()
    rng = np.random.default_rng(seed)
    while time.monotonic() - t0 < seconds:
        if not_serving_after is None and _health(port) == "NOT_SERVING":
            not_serving_after = time.monotonic() - t0
        if not_serving_after is not None:
            codes[_submit(port, [event(0, f"{prefix}-{uuid.uuid4().hex[:6]}", rng)],
                          timeout_s=3)] += 1
        time.sleep(0.5)
    dep.check(scenario, f"health NOT_SERVING after the broker {what} ({seconds:.0f} s down)",
              "<= 15 s", "never" if not_serving_after is None else f"{not_serving_after:.1f} s",
              not_serving_after is not None and not_serving_after <= 15)
    dep.check(scenario, "Submit while the broker is down", "UNAVAILABLE only", dict(codes),
              bool(codes) and set(codes) == {"UNAVAILABLE"})


def scenario_broker(dep: Deployment, short: bool) -> None:
    if dep.broker_pid is None:
        dep.facts.append("broker pause: not run (needs the broker's pid: the standalone broker "
                         "or --broker-pid)")
        return
    suffix = dep.topics()
    w = Worker(dep, suffix, "broker", "chaos-" + uuid.uuid4().hex[:6], target_rate=0.1,
               broker_down_after_seconds=10)
    w.spawn()
    w.wait_serving()
    decided = Tail(dep.bootstrap, DECISIONS_TOPIC + suffix, decided_id, many=True)
    pause_s = 20.0 if short else 40.0
    prod = Producer(dep.bootstrap, FEATURES_TOPIC + suffix, int(50 * (pause_s + 20)), 50.0,
                    "brk", seed=5)
    time.sleep(5)
    os.kill(dep.broker_pid, signal.SIGSTOP)
    try:
        _while_broker_down(dep, "broker", "paused", w.grpc_port, pause_s, "sub", seed=2)
    finally:
        os.kill(dep.broker_pid, signal.SIGCONT)
    t_cont = time.monotonic()
    wait_until(lambda: _health(w.grpc_port) == "SERVING", 60, every_s=0.1)
    recovered = time.monotonic() - t_cont
    prod.join()
    wait_until(lambda: prod.acked <= set(decided.items), 120)
    lost = len(prod.acked - set(decided.stop()))
    w.stop()
    dep.check("broker", "SERVING again after SIGCONT", "recovers", f"{recovered:.1f} s",
              recovered < 60)
    dep.check("broker", "acknowledged events lost across the pause", "0",
              f"{lost} of {len(prod.acked)}", lost == 0)


class DurableBroker:
    """tansu on S3 storage (an in-process moto S3 server): topics, records and committed
    offsets survive a broker restart (tansu 0.6.0's memory storage does not). ``kill()`` ends
    the broker with SIGKILL, ``start()`` starts it again on the same port."""

    def __init__(self, workdir: Path):
        import boto3
        from moto.server import ThreadedMotoServer

        from service.streaming.broker import _broker_bin, _free_port

        self.s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.s3.start()
        host, port = self.s3.get_host_and_port()
        self.env = {**os.environ, "AWS_ENDPOINT": f"http://{host}:{port}",
                    "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "chaos",
                    "AWS_SECRET_ACCESS_KEY": "chaos", "AWS_DEFAULT_REGION": "eu-west-2"}
        boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT"], aws_access_key_id="chaos",
                     aws_secret_access_key="chaos", region_name="eu-west-2").create_bucket(
            Bucket="tansu", CreateBucketConfiguration={"LocationConstraint": "eu-west-2"})
        self.port = _free_port("127.0.0.1")
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.binary = _broker_bin()
        self.log = workdir / "durable-tansu.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        from service.streaming.broker import wait_for_broker

        url = f"tcp://{self.bootstrap}"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "s3://tansu/"], env=self.env, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_for_broker(self.bootstrap, 30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        self.s3.stop()


def scenario_broker_restart(dep: Deployment, short: bool) -> None:
    """The broker killed (SIGKILL) and started again on durable storage while a producer
    streams: health NOT_SERVING within 15 s, UNAVAILABLE to gRPC callers, SERVING after the
    restart (recovery time), no acknowledged event lost, no duplicate request, no overspend."""
    broker = DurableBroker(dep.workdir)
    try:
        own = Deployment(broker.bootstrap, broker.proc.pid if broker.proc else None, dep.workdir,
                         dep.checks, dep.facts)
        suffix = own.topics()
        budget = 300
        w = Worker(own, suffix, "broker-restart", "chaos-" + uuid.uuid4().hex[:6],
                   target_rate=0.1, budget_total=budget, broker_down_after_seconds=10)
        w.spawn()
        w.wait_serving()
        down_s = 20.0 if short else 40.0
        prod = Producer(broker.bootstrap, FEATURES_TOPIC + suffix, int(40 * (down_s + 25)), 40.0,
                        "rst", seed=9)
        time.sleep(8)
        broker.kill()
        _while_broker_down(dep, "broker-restart", "was killed", w.grpc_port, down_s, "rs",
                           seed=4)
        broker.start()
        t_up = time.monotonic()
        wait_until(lambda: _health(w.grpc_port) == "SERVING", 120, every_s=0.2)
        recovered = time.monotonic() - t_up
        prod.join()
        decided = Tail(broker.bootstrap, DECISIONS_TOPIC + suffix, decided_id, many=True)
        requests = Tail(broker.bootstrap, REQUESTS_TOPIC + suffix, request_key)
        # attribute: an acknowledged record missing from the features topic after the restart
        # was lost by the broker; one on the topic without a decision would be pairsieve's
        feats = Tail(broker.bootstrap, FEATURES_TOPIC + suffix,
                     lambda v: codecs.pb.FeatureEvent.FromString(v).event_id)
        wait_settled(lambda: len(set(feats.items) & prod.acked), len(prod.acked), 90, quiet_s=15)
        on_topic = prod.acked & set(feats.stop())
        wait_until(lambda: on_topic <= set(decided.items), 180)
        time.sleep(2)
        seen = set(decided.stop())
        tally = RequestTally.of([k for k in requests.stop() if k[0].startswith("rst")])
        lost = len(on_topic - seen)
        broker_lost = sorted(prod.acked - on_topic)
        alive = w.proc is not None and w.proc.poll() is None
        w.stop()
        log_text = w.log_text()
        dep.check("broker-restart", "SERVING again after the broker restarted",
                  "recovers, same process", f"{recovered:.1f} s, worker alive {alive}",
                  recovered < 120 and alive)
        dep.check("broker-restart", "events on the features topic without a decision (lost) / "
                  "events requested twice (two decisions) / overspend (distinct requests - "
                  "budget)", "0 / 0 / 0",
                  f"{lost} of {len(on_topic)} / {len(tally.twice)} {tally.twice[:5]} / "
                  f"{max(0, len(tally.ids) - budget)}",
                  lost == 0 and not tally.twice and len(tally.ids) <= budget)
        idempotent = "refused an idempotent producer" not in log_text
        dep.check("broker-restart", "a request record written twice (a retry after an "
                  "acknowledgement lost in the crash; same bytes, readers deduplicate by request "
                  "id)", "0 with an idempotent publisher" if idempotent else
                  "(measured: tansu refuses an idempotent producer)",
                  f"{len(tally.copies)} {tally.copies[:5]}",
                  not tally.copies or not idempotent, info=not idempotent)
        dep.check("broker-restart", "records the broker acknowledged (acks=all) but no longer "
                  "had after its SIGKILL", "(the broker's durability)",
                  f"{len(broker_lost)} of {len(prod.acked)} {broker_lost[:5]}", True, info=True)
    finally:
        broker.stop()


# ---------------------------------------------------------------------------------- gRPC
METHODS = ("Submit", "SelectPool", "ReportAlignment", "GetStatus")


def scenario_grpc(dep: Deployment, short: bool) -> None:
    import grpc

    suffix = dep.topics(max_message_bytes=LIMIT)
    w = Worker(dep, suffix, "grpc", "chaos-" + uuid.uuid4().hex[:6], target_rate=0.2,
               max_message_bytes=LIMIT, grpc_max_concurrent_rpcs=8)
    w.spawn()
    w.wait_serving()
    target = f"127.0.0.1:{w.grpc_port}"
    rng = random.Random(3)
    nrng = np.random.default_rng(3)
    valid = codecs.pb.SubmitRequest(events=[codecs.event_to_proto(event(i, "g", nrng))
                                            for i in range(4)]).SerializeToString()
    frames = 400 if short else 5000
    codes: Counter = Counter()
    with grpc.insecure_channel(target) as ch:
        calls = {m: ch.unary_unary(f"/pairsieve.v1.Selector/{m}") for m in METHODS}
        stream = ch.stream_stream("/pairsieve.v1.Selector/SubmitStream")
        for i in range(frames):
            if rng.random() < 0.5:
                frame = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))
            else:
                frame = bytearray(valid)
                for _ in range(rng.randint(1, 8)):
                    frame[rng.randrange(len(frame))] = rng.getrandbits(8)
                frame = bytes(frame)
            method = METHODS[i % len(METHODS)]
            try:
                calls[method](frame, timeout=5)
                codes[(method, "OK")] += 1
            except grpc.RpcError as exc:
                codes[(method, exc.code().name)] += 1
        for _ in range(frames // 20):
            try:
                list(stream(iter([bytes(rng.getrandbits(8) for _ in range(50))]), timeout=5))
                codes[("SubmitStream", "OK")] += 1
            except grpc.RpcError as exc:
                codes[("SubmitStream", exc.code().name)] += 1
        bad = sum(n for (_, c), n in codes.items() if c in ("UNKNOWN", "INTERNAL"))
        dep.check("grpc", f"garbage/mutated frames on every method ({sum(codes.values())} calls)",
                  "0 UNKNOWN/INTERNAL",
                  f"{bad}; " + ", ".join(f"{c} {n}" for c, n in
                                         Counter(c for (_, c) in codes.elements()).items()),
                  bad == 0)
        # oversized: RESOURCE_EXHAUSTED, and memory flat over 100 of them
        big = b"\x0a" + b"\xff" * (2 * LIMIT)
        rss0 = w.rss_kb()
        over = Counter()
        for _ in range(100):
            try:
                calls["Submit"](big, timeout=5)
                over["OK"] += 1
            except grpc.RpcError as exc:
                over[exc.code().name] += 1
        rss1 = w.rss_kb()
        dep.check("grpc", "100 requests of 2 x the message limit", "RESOURCE_EXHAUSTED",
                  dict(over), set(over) == {"RESOURCE_EXHAUSTED"})
        dep.check("grpc", "RSS growth over those 100 requests", "<= 10 MB",
                  f"{(rss1 - rss0) / 1024:+.1f} MB", rss1 - rss0 <= 10 * 1024)
        try:
            calls["Submit"](valid, timeout=0.0005)
            dl = "OK"
        except grpc.RpcError as exc:
            dl = exc.code().name
        dep.check("grpc", "a 0.5 ms deadline", "DEADLINE_EXCEEDED, server healthy after",
                  f"{dl}, health {_health(w.grpc_port)}",
                  dl == "DEADLINE_EXCEEDED" and _health(w.grpc_port) == "SERVING")

    # the concurrency cap: 64 calls at once against a cap of 8
    async def burst() -> Counter:
        out: Counter = Counter()
        async with grpc.aio.insecure_channel(target) as ch:
            call = ch.unary_unary("/pairsieve.v1.Selector/SelectPool")
            cands = []
            for i in range(400):
                e = event(i, "pool", nrng)
                cands.append(codecs.pb.PoolCandidate(item_id=e.item_id, modality=e.modality,
                                                     vector=codecs.encode_vector(e.vector),
                                                     dim=len(e.vector)))
            big_pool = codecs.pb.SelectPoolRequest(candidates=cands, budget=50,
                                                   seed=1).SerializeToString()

            async def one():
                try:
                    await call(big_pool, timeout=30)
                    out["OK"] += 1
                except grpc.RpcError as exc:
                    out[exc.code().name] += 1

            await asyncio.gather(*(one() for _ in range(64)))
        return out

    try:
        cap = asyncio.run(burst())
    except Exception as exc:  # a request the proto refuses is a harness error: report it
        cap = Counter({f"harness error {exc!r}"[:80]: 1})
    dep.check("grpc", "64 concurrent calls, cap 8", "some RESOURCE_EXHAUSTED, rest OK, no other",
              dict(cap), cap.get("RESOURCE_EXHAUSTED", 0) > 0 and set(cap) <= {
                  "OK", "RESOURCE_EXHAUSTED"})
    # SIGTERM under load: every Submit answered OK must have its decision in the log
    decided = Tail(dep.bootstrap, DECISIONS_TOPIC + suffix, decided_id, many=True)
    ok_ids: list[str] = []
    stop = threading.Event()

    def client(k: int) -> None:
        r = np.random.default_rng(100 + k)
        i = 0
        while not stop.is_set():
            evs = [event(i * 8 + j, f"term{k}", r) for j in range(8)]
            i += 1
            if _submit(w.grpc_port, evs, timeout_s=5) == "OK":
                ok_ids.extend(e.event_id for e in evs)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    w.proc.send_signal(signal.SIGTERM)
    rc = w.proc.wait(60)
    stop.set()
    for t in threads:
        t.join(10)
    wait_until(lambda: set(ok_ids) <= set(decided.items), 30)
    lost = len(set(ok_ids) - set(decided.stop()))
    dep.check("grpc", "SIGTERM under load: Submit answered OK but not decided", "0",
              f"{lost} of {len(ok_ids)} (exit code {rc})", lost == 0 and rc == 0)


# ---------------------------------------------------------------------------------- fuzz
def scenario_fuzz(dep: Deployment, seconds: int) -> None:
    """The coverage-guided fuzzer (atheris, ``tests/fuzz/fuzz_inputs.py``) on decode -> validate
    -> decide for feature records, labels and every gRPC request, for ``seconds``."""
    work = dep.workdir / "fuzz"
    (work / "corpus").mkdir(parents=True)
    env = {**os.environ, "PAIRSIEVE_FUZZ_STATS": str(work / "stats.json")}
    say(f"fuzz: {seconds} s of atheris on the input path ...")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.fuzz_inputs", f"-max_total_time={seconds}",
         "-timeout=20", "-print_final_stats=1", f"-artifact_prefix={work}/",
         str(work / "corpus"), str(ROOT / "tests" / "fuzz" / "corpus")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=seconds + 300)
    out = proc.stdout + proc.stderr
    done = re.search(r"Done (\d+) runs in (\d+) second", out)
    cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
    found = sorted(p.name for p in work.iterdir() if p.name.startswith(("crash-", "timeout-",
                                                                        "oom-")))
    runs = int(done.group(1)) if done else 0
    dep.check("fuzz", f"atheris, {seconds} s on decode -> validate -> decide (features, labels, "
              "4 gRPC methods)", "0 findings",
              f"{len(found)} findings, exit {proc.returncode}; {runs:,} inputs"
              + (f" ({runs / max(1, int(done.group(2))):,.0f}/s)" if done else "")
              + (f", coverage cov {cov[-1][0]} ft {cov[-1][1]} (seeds: cov {cov[0][0]})"
                 if cov else ""),
              proc.returncode == 0 and not found and runs > 0)
    if found:
        keep = Path("runs/fuzz-findings")
        keep.mkdir(parents=True, exist_ok=True)
        for name in found:
            (keep / name).write_bytes((work / name).read_bytes())
        say(f"fuzz findings kept in {keep}: re-run one with "
            "`python -m tests.fuzz.fuzz_inputs runs/fuzz-findings/<file>`")


# ---------------------------------------------------------------------------------- report
def render(dep: Deployment, argv: list[str], took_s: float, short: bool) -> str:
    failed = dep.failed()
    judged = [c for c in dep.checks if not c.info]
    lines = [
        "# Reliability: the chaos suite",
        "",
        f"Generated by `.venv/bin/python -m loadtests.chaos {' '.join(argv)}` "
        f"({'short' if short else 'full'} version) on {platform.node()} ({os.cpu_count()} "
        f"cores, {platform.machine()}), broker "
        f"{'standalone tansu 0.6.0 (in memory)' if dep.broker_pid else dep.bootstrap}, "
        f"in {took_s / 60:.1f} min. Workers are real `pairsieve serve` processes; what was "
        "decided is read back from the decision log, requests from the requests topic, dead "
        "letters from the dead-letter topic.",
        "",
        f"**{len(judged) - len(failed)} of {len(judged)} checks passed** (rows marked "
        "*measured* are figures without a verdict).",
        "",
        "| scenario | what was injected / checked | target | measured | |",
        "|---|---|---|---|---|",
        *[f"| {c.scenario} | {c.what} | {c.target} | {c.measured} | "
          f"{'*measured*' if c.info else 'pass' if c.ok else '**FAIL**'} |"
          for c in dep.checks],
        "",
    ]
    if dep.facts:
        lines += ["## Notes", "", *[f"- {f}" for f in dep.facts], ""]
    lines += [
        "## What else checks reliability (in `make test`)",
        "",
        "- `tests/integration/test_chaos_suite.py`: this suite's short version (`--short`), "
        "every check must pass.",
        "- `tests/unit/test_engine_state_machine.py`: hypothesis state machines over the engine "
        "(fresh and redelivered batches, labels, failed and partly written publishes, the "
        "followers, crash and replay in every follower order): budget never overspent, no "
        "event requested twice, bounded memories within capacity, replay idempotent, every "
        "event of a batch that returned in the decision log. It found four engine defects, "
        "fixed with it (a failed decision-log publish re-requested a batch; a skip replayed "
        "before its request hid the spend; an echo of a relabelled pair counted its cost "
        "again; a final answer after UNSURE in one call was lost). A fifth was found by this "
        "suite's short run in CI and the machine checks it since: a worker killed between "
        "writing a request and its decision record left the decision log without it. A sixth "
        "by its full run (kill-2w): once two workers' selections in flight took the shared "
        "spend one past the total (the overshoot the README's Scale-out section allows), the "
        "budget refused every later commit of that worker, skips included, and the stream "
        "dead-lettered each of its batches as `rejected` (8,193 of 12,000 events); "
        "`tests/unit/test_budget.py` and `tests/unit/test_handler.py` check it.",
        "- `tests/unit/test_fuzz_inputs.py`: 30 s of the same fuzzer with a fixed seed.",
        "- `tests/component/test_observability_metrics.py`: the metric series are the same "
        "set after 100,000 unique ids, and `promtool check metrics` is clean.",
        "- `tests/integration/test_kafka_security.py`: TLS + SASL (SCRAM) end to end.",
        "",
        "## Limits",
        "",
        "- Broker restart runs on tansu with S3 storage served by an in-process moto server "
        "(tansu 0.6.0's memory storage starts empty after a restart and its `postgres://` "
        "storage is not compiled into this build); with `--bootstrap`, restart your own broker "
        "during `--scenarios kill` to see the same checks hold.",
        "- The budget is exact with two workers through the budget ledger (README, Scale-out; "
        "`tests/unit/test_shared_budget_machine.py` checks it under arbitrary interleavings, "
        "stale views and crashes): a worker killed between its reservation and its publish "
        "leaves that unit granted but unspent, so a run with kills can end below the budget "
        "(the row 'granted but never requested'), never above it. Before the ledger, kill-2w's "
        "overspend check failed by one in one full run of 2026-12-07 (each worker counted only "
        "the selections it had seen).",
        "- The machine has 2 cores shared by the broker, the producer, the workers and this "
        "driver, and other tenants: the throughput ratio is the median of interleaved "
        "clean/poisoned pairs of one run (topics preloaded), each run's rate taken on the "
        "worker's own clock (the decision records' `decided_at`: the events after its first "
        "micro-batch over the time from that batch to its last), so start-up, the group join "
        "and the driver's polling stay outside it. While a worker runs the driver only reads "
        "its decided count from `/metrics` twice a second and reads the decision log "
        "afterwards. The earlier harness, timed by the driver from serving while it decoded "
        "the decision log as it grew (a third of a core), put the same stream at 0.84 one day "
        "and 0.88 (min 0.83, max 1.39) another, with breakdown rows that contradicted each "
        "other from run to run (the oversized records alone 0.85, then 1.02). Polling "
        "`/metrics` every 50 ms was no better: py-spy put a third as many worker samples in "
        "rendering the page as in the engine.",
        "- What the poison itself costs: in py-spy profiles of poisoned runs (100 Hz, all "
        "threads) the dead-letter path and the label path hold 1-2 % of the worker's samples "
        "and decoding errors no more than decoding valid records. Poison records used to take "
        "slots of the 256-record take buffer before they were refused, so the valid events came "
        "in micro-batches about 7 % smaller (233-237 against 250-254 clean); the features agent "
        "now takes more records per batch while malformed ones come in (`record_target` in "
        "`service/streaming/take.py`: the valid part two standard deviations under 256), "
        "238-244 valid events per batch (the repetition lines of the log). What remains is the "
        "poison records themselves: 11 % more records through faust's per-record path (about "
        "5,400 records/s at faust's own ceiling, `reports/perf.md`), a decode attempt and a "
        "dead letter each: 2,000 records at ~0.19 ms plus ~0.05-0.1 ms each in a ~5 s run, a "
        "ratio of 0.90-0.93 at best by that count. Clean runs "
        "of one configuration scatter by 10-40 % on this shared machine (2,516-5,230 events/s "
        "within minutes on 2026-12-07), and paired ratios by 0.67-1.15, so the median of five "
        "pairs lands on either side of 0.90 (2026-12-07: 0.91, 0.86 and 0.86 in three runs of "
        "the scenario, the last with 16 MiB fetches; 15 pairs pooled 0.89); on a quiet machine "
        "rerun `--scenarios poison` for a tighter one. A larger fetch changed nothing "
        "measurable (`PAIRSIEVE_FETCH_MAX_PARTITION_BYTES=16777216` with `--scenarios poison`: "
        "0.86, as with the default 4 MiB in this report). "
        "Oversized records travel to the worker before they can be refused (25 MB against "
        "2.7 MB of valid records here); a broker-side `max.message.bytes` on the features "
        "topic keeps them off it on a broker that enforces it (tansu 0.6.0 does not).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", help="your broker (default: start a standalone tansu)")
    ap.add_argument("--broker-pid", type=int, help="with --bootstrap: the broker process to "
                                                   "pause in the broker scenario")
    ap.add_argument("--scenarios", default="kill,history,poison,broker,broker-restart,grpc,fuzz")
    ap.add_argument("--fuzz-seconds", type=int, default=600,
                    help="fuzz scenario length (short: 30)")
    ap.add_argument("--short", action="store_true", help="the CI version (~6 min)")
    ap.add_argument("--out", default="reports/reliability.md")
    a = ap.parse_args(argv)
    broker = None
    if a.bootstrap:
        bootstrap, pid = a.bootstrap, a.broker_pid
    else:
        from service.streaming.broker import EmbeddedBroker

        broker = EmbeddedBroker().start()
        bootstrap, pid = broker.bootstrap, broker.proc.pid
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pairsieve-chaos-") as tmp:
        dep = Deployment(bootstrap, pid, Path(tmp))
        wanted = a.scenarios.split(",")
        unknown = set(wanted) - {"kill", "history", "poison", "broker", "broker-restart", "grpc",
                                 "fuzz"}
        if unknown:
            ap.error(f"unknown scenarios {sorted(unknown)}")
        try:
            if "kill" in wanted:
                scenario_kill(dep, 1, a.short)
                scenario_kill(dep, 2, a.short)
            if "history" in wanted:
                scenario_kill(dep, 1, a.short, history=3000 if a.short else 50000)
            if "poison" in wanted:
                scenario_poison(dep, a.short)
            if "broker" in wanted:
                scenario_broker(dep, a.short)
            if "broker-restart" in wanted:
                scenario_broker_restart(dep, a.short)
            if "grpc" in wanted:
                scenario_grpc(dep, a.short)
            if "fuzz" in wanted:
                scenario_fuzz(dep, 30 if a.short else a.fuzz_seconds)
        finally:
            if broker is not None:
                broker.stop()
            keep = Path(a.out).with_suffix(".logs")
            if dep.failed():  # keep the workers' logs of a failed run
                keep.mkdir(parents=True, exist_ok=True)
                for f in Path(tmp).glob("*.log"):
                    (keep / f.name).write_text(f.read_text(errors="replace"))
                say(f"worker logs kept in {keep}")
        report = render(dep, argv, time.monotonic() - t0, a.short)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(report)
    say(f"wrote {a.out}")
    return 0 if not dep.failed() else 1


if __name__ == "__main__":
    raise SystemExit(main())
