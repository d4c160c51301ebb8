"""Scale-out measurement: do several workers in one consumer group accept near-duplicates twice?

Starts W ``pairsieve serve`` subprocesses in ONE consumer group on fresh topics, streams
"near-duplicate pairs" (two events with different ids whose vectors differ by ~1e-3 noise,
routed to partitions owned by DIFFERENT workers, the second copy produced ``--gap`` seconds after
the first) mixed with unrelated filler events, reads the alignment-requests topic back and
measures the **double-accept rate**: among the pairs of which at least one copy was accepted, the
fraction of which BOTH copies were accepted.

Three configurations are measured (each on its own topics and consumer group):

* ``followers``: W workers with ``PAIRSIEVE_FOLLOW_SELECTIONS=1`` (default of the service): every
  worker tails the requests topic and folds the others' accepts into its distance caches/budget;
* ``baseline``:  W workers with ``PAIRSIEVE_FOLLOW_SELECTIONS=0`` (each sees only its own accepts);
* ``single``:    one worker (all copies decided by the same engine).

Why the stream is single-modality by default (``--text-share 0``): the service's utility is
``0.7 * z(uncertainty) + 0.3 * z(diversity)`` with fixed weights. With only image events the
uncertainty term has no other-modality items to score against, so it is a constant and its
z-score is 0; the utility is then diversity alone, which is the only thing the follower changes.
``--text-share 0.5`` streams both modalities (uncertainty is then live and dilutes the effect).

Besides the rates, every run checks the bookkeeping (printed and written to the JSON):

* every produced event was decided exactly once (sum of the workers' ``seen`` via gRPC
  ``GetStatus`` == events produced; request ids on the topic are unique);
* each worker owned partitions and decided events;
* with followers, each worker's ``budget_spent`` (GetStatus) == the number of requests on the
  topic (each counts the other's accepts); without, == its own accepts.

Usage::

    .venv/bin/python loadtests/scaleout.py --pairs 240 --out reports/scaleout.json
    .venv/bin/python loadtests/scaleout.py --bootstrap 127.0.0.1:9092 --configs followers,baseline

Every subprocess is stopped with SIGTERM at the end (SIGKILL after ``--stop-timeout``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field

import numpy as np

from service.messages import IncomingEvent
from service.perfbench.fixtures import machine_info
from service.streaming.broker import EmbeddedBroker
from service.streaming.topics import FEATURES_TOPIC, REQUESTS_TOPIC, create_topics, topic_specs
from service.wire import codecs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (workers' cwd)
CONFIGS = ("followers", "baseline", "single")
_SERVING = re.compile(r"pairsieve serving: gRPC :(\d+), metrics :(\d+)")


@dataclass
class ScaleoutParams:
    """Everything that shapes one measurement (also written to the JSON)."""

    pairs: int = 240
    workers: int = 2
    partitions: int = 4
    chunk: int = 40            # pairs whose first copies are produced together
    # delay between a chunk's first and second copies: the follower needs ~0.5-1 s on tansu to
    # fold a selection in (fetch long-poll), so at 0.8 s many twins are still unseen
    gap_s: float = 2.0
    filler_per_pair: float = 1.0
    warmup_per_partition: int = 40
    noise: float = 1e-3
    text_share: float = 0.0    # fraction of pairs/fillers that are text events
    dims: tuple = (("image", 16), ("text", 12))
    embedding_dim: int = 8
    target_rate: float = 0.3
    batch_max_items: int = 8
    max_wait_seconds: float = 0.05
    seed: int = 0
    ready_timeout_s: float = 90.0
    decide_timeout_s: float = 60.0
    quiet_s: float = 1.0
    stop_timeout_s: float = 20.0

    @property
    def modalities(self) -> str:
        return ",".join(f"{m}:{d}" for m, d in self.dims)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------- workers
@dataclass
class Worker:
    worker_id: str
    proc: subprocess.Popen
    log_path: str
    grpc_port: int | None = None
    metrics_port: int | None = None

    def text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def tail(self, n: int = 3000) -> str:
        return self.text()[-n:]


@dataclass
class WorkerSet:
    """W ``pairsieve serve`` processes in one consumer group on their own topics."""

    name: str
    bootstrap: str
    params: ScaleoutParams
    workers: int
    follow: bool
    log_dir: str
    suffix: str = field(default_factory=lambda: "." + uuid.uuid4().hex[:8])
    group_id: str = field(default_factory=lambda: "scaleout-" + uuid.uuid4().hex[:6])
    procs: list[Worker] = field(default_factory=list)
    started_at: float = 0.0
    ready_s: float | None = None

    @property
    def features_topic(self) -> str:
        return FEATURES_TOPIC + self.suffix

    @property
    def requests_topic(self) -> str:
        return REQUESTS_TOPIC + self.suffix

    def env(self, worker_id: str) -> dict[str, str]:
        p = self.params
        return {**os.environ, "PYTHONUNBUFFERED": "1",
                "PAIRSIEVE_KAFKA_BOOTSTRAP": self.bootstrap,
                "PAIRSIEVE_TOPIC_SUFFIX": self.suffix,
                "PAIRSIEVE_FEATURES_PARTITIONS": str(p.partitions),
                "PAIRSIEVE_GROUP_ID": self.group_id, "PAIRSIEVE_WORKER_ID": worker_id,
                "PAIRSIEVE_GRPC_PORT": "0", "PAIRSIEVE_GRPC_HOST": "127.0.0.1",
                "PAIRSIEVE_METRICS_PORT": "0", "PAIRSIEVE_METRICS_HOST": "127.0.0.1",
                "PAIRSIEVE_MODALITIES": p.modalities,
                "PAIRSIEVE_EMBEDDING_DIM": str(p.embedding_dim),
                "PAIRSIEVE_WARMUP_ACCEPTS": "0", "PAIRSIEVE_EXPLORE_FRACTION": "0",
                "PAIRSIEVE_TARGET_RATE": str(p.target_rate),
                "PAIRSIEVE_BATCH_MAX_ITEMS": str(p.batch_max_items),
                "PAIRSIEVE_MAX_WAIT_SECONDS": str(p.max_wait_seconds),
                "PAIRSIEVE_FOLLOW_SELECTIONS": "1" if self.follow else "0",
                "PAIRSIEVE_SEED": str(p.seed), "PAIRSIEVE_DEVICE": "cpu",
                "PAIRSIEVE_SHUTDOWN_GRACE_SECONDS": "5", "PAIRSIEVE_LOG_LEVEL": "INFO"}

    def create_topics(self) -> None:
        specs = {t + self.suffix: n for t, n in topic_specs(self.params.partitions).items()}
        create_topics(self.bootstrap, specs)

    def start(self) -> None:
        """Create the topics and spawn the workers (does not wait for them)."""
        self.create_topics()
        self.started_at = time.monotonic()
        for i in range(self.workers):
            wid = f"{self.name}-w{i}"
            path = os.path.join(self.log_dir, f"{wid}.log")
            out = open(path, "w")
            try:
                proc = subprocess.Popen([sys.executable, "-m", "service", "serve"],
                                        env=self.env(wid), cwd=ROOT, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            finally:
                out.close()  # the child keeps its own descriptor
            self.procs.append(Worker(wid, proc, path))

    def assignment(self) -> dict[str, set[int]]:
        """Each worker's latest features-topic assignment, from its log (faust/aiokafka line
        'Setting newly assigned partitions {...}')."""
        pat = re.compile(r"topic='" + re.escape(self.features_topic) + r"', partition=(\d+)")
        out = {}
        for w in self.procs:
            lines = [ln for ln in w.text().splitlines()
                     if "Setting newly assigned partitions" in ln]
            out[w.worker_id] = {int(x) for x in pat.findall(lines[-1])} if lines else set()
        return out

    def wait_ready(self, settle_s: float = 1.0) -> dict[str, set[int]]:
        """Wait until every worker serves and the group's assignment is complete, disjoint,
        gives every worker a partition, and stayed so for ``settle_s``. Returns it."""
        deadline = time.monotonic() + self.params.ready_timeout_s
        stable_since, last = None, None
        while time.monotonic() < deadline:
            for w in self.procs:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"worker {w.worker_id} exited with {w.proc.returncode}:\n"
                                       f"{w.tail()}")
                if w.grpc_port is None:
                    m = _SERVING.search(w.text())
                    if m:
                        w.grpc_port, w.metrics_port = int(m.group(1)), int(m.group(2))
            if all(w.grpc_port for w in self.procs):
                asg = self.assignment()
                parts = [p for s in asg.values() for p in s]
                ok = (sorted(parts) == list(range(self.params.partitions))
                      and all(asg[w.worker_id] for w in self.procs[:self.params.partitions]))
                if ok and asg == last:
                    if time.monotonic() - stable_since >= settle_s:
                        self.ready_s = time.monotonic() - self.started_at
                        return asg
                elif ok:
                    stable_since, last = time.monotonic(), asg
                else:
                    stable_since, last = None, None
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: workers not ready / group not settled after "
                           f"{self.params.ready_timeout_s}s; assignment "
                           f"{self.assignment() if self.procs else None}\n"
                           + "\n".join(f"--- {w.worker_id}\n{w.tail(1500)}" for w in self.procs))

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every worker, wait, SIGKILL whatever is left (after a stack dump into its log,
        SIGUSR1). Returns exit codes (None: killed)."""
        for w in self.procs:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.params.stop_timeout_s
        codes = {}
        for w in self.procs:
            try:
                codes[w.worker_id] = w.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # every thread's stack into its log first (the worker's faulthandler), so a
                # worker that did not stop says where it was
                w.proc.send_signal(signal.SIGUSR1)
                time.sleep(1.0)
                w.proc.kill()
                w.proc.wait()
                codes[w.worker_id] = None  # killed
        return codes


def grpc_status(port: int, timeout_s: float = 5.0) -> dict:
    """GetStatus of one worker as a dict (spent, seen, accepted)."""
    import grpc

    from service.wire.gen.pairsieve.v1 import pairsieve_pb2 as pb
    from service.wire.gen.pairsieve.v1 import pairsieve_pb2_grpc as pb_grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        st = pb_grpc.SelectorStub(ch).GetStatus(pb.GetStatusRequest(), timeout=timeout_s)
    return {"worker_id": st.worker_id, "budget_spent": int(st.budget_spent),
            "seen": sum(int(m.seen) for m in st.modalities),
            "accepted": sum(int(m.accepted) for m in st.modalities),
            "acceptance_rate": float(st.acceptance_rate)}


def metrics_value(port: int, name: str, timeout_s: float = 5.0) -> float | None:
    """One unlabelled sample from a worker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


# ---------------------------------------------------------------------------- stream
@dataclass
class StreamPlan:
    """What was produced: event id -> (kind, pair index or -1, copy 0/1, partition)."""

    events: dict[str, tuple[str, int, int, int]] = field(default_factory=dict)
    pair_workers: list[tuple[str | None, str | None]] = field(default_factory=list)


class RequestReader:
    """Reads the requests topic from the start with a plain kafka-python consumer (no group)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int):
        from kafka import KafkaConsumer, TopicPartition
        self.c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                               enable_auto_commit=False, auto_offset_reset="earliest")
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.c.assign(tps)
        self.c.seek_to_beginning(*tps)
        self.requests: list = []

    def poll(self, timeout_ms: int = 200) -> int:
        n = 0
        for recs in self.c.poll(timeout_ms=timeout_ms).values():
            for r in recs:
                self.requests.append(codecs.pb.AlignmentRequest.FromString(r.value))
                n += 1
        return n

    def until_quiet(self, quiet_s: float, timeout_s: float) -> None:
        deadline, last_new = time.monotonic() + timeout_s, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last_new < quiet_s:
            if self.poll():
                last_new = time.monotonic()

    def close(self) -> None:
        self.c.close()


def _producer(bootstrap: str):
    from kafka import KafkaProducer
    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)


def _event(eid: str, modality: str, vec: np.ndarray) -> IncomingEvent:
    return IncomingEvent(eid, "item-" + eid, modality, vec.astype(np.float32), time.time())


def _send(prod, topic: str, partition: int, ev: IncomingEvent) -> None:
    prod.send(topic, codecs.encode_feature_event(ev), key=ev.event_id.encode(),
              partition=partition, headers=[codecs.FEATURE_HEADER_EVENT])


def wait_decided(ws: WorkerSet, expect: int, timeout_s: float) -> list[dict]:
    """Poll GetStatus until the workers together decided ``expect`` events; returns statuses."""
    deadline = time.monotonic() + timeout_s
    while True:
        sts = [grpc_status(w.grpc_port) for w in ws.procs]
        if sum(s["seen"] for s in sts) >= expect or time.monotonic() > deadline:
            return sts
        time.sleep(0.2)


def produce_stream(ws: WorkerSet, asg: dict[str, set[int]], rng: np.random.Generator,
                   plan: StreamPlan, progress) -> None:
    """Warm-up filler on every partition, then the near-duplicate pairs in chunks."""
    p = ws.params
    dims = dict(p.dims)
    mods = [m for m, _ in p.dims]
    owner = {part: wid for wid, parts in asg.items() for part in parts}
    by_worker = [sorted(asg[w.worker_id]) for w in ws.procs if asg[w.worker_id]]
    prod = _producer(ws.bootstrap)
    topic = ws.features_topic

    def modality() -> str:
        return mods[1] if rng.random() < p.text_share else mods[0]

    def filler(tag: str) -> None:
        m = modality()
        eid = f"{ws.name}-{tag}{len(plan.events)}"
        part = int(rng.integers(p.partitions))
        _send(prod, topic, part, _event(eid, m, rng.normal(size=dims[m])))
        plan.events[eid] = ("filler" if tag == "f" else "warmup", -1, 0, part)

    try:
        for _ in range(p.warmup_per_partition):
            for part in range(p.partitions):
                m = modality()
                eid = f"{ws.name}-warm{len(plan.events)}"
                _send(prod, topic, part, _event(eid, m, rng.normal(size=dims[m])))
                plan.events[eid] = ("warmup", -1, 0, part)
        prod.flush()
        n_warm = len(plan.events)
        sts = wait_decided(ws, n_warm, p.decide_timeout_s)
        progress(f"warm-up: {n_warm} filler events decided "
                 f"({', '.join(str(s['seen']) for s in sts)} per worker)")

        chunks = [list(range(i, min(i + p.chunk, p.pairs))) for i in range(0, p.pairs, p.chunk)]
        pending: list[tuple[int, str, np.ndarray, int]] = []  # second copies of the last chunk
        for k in range(len(chunks) + 1):
            t_tick = time.monotonic()
            for idx, m, vec, part in pending:
                eid = f"{ws.name}-p{idx}b"
                _send(prod, topic, part, _event(eid, m, vec))
                plan.events[eid] = ("pair", idx, 1, part)
            pending = []
            if k < len(chunks):
                n_fill = rng.binomial(len(chunks[k]) * 2, p.filler_per_pair / 2)
                fill_slots = set(rng.choice(len(chunks[k]) + n_fill, n_fill, replace=False)
                                 .tolist()) if n_fill else set()
                it = iter(chunks[k])
                for slot in range(len(chunks[k]) + n_fill):
                    if slot in fill_slots:
                        filler("f")
                        continue
                    idx = next(it)
                    m = modality()
                    x = rng.normal(size=dims[m])
                    twin = x + p.noise * rng.normal(size=dims[m])
                    if len(by_worker) >= 2:  # the two copies on partitions of two workers
                        a, b = rng.choice(len(by_worker), 2, replace=False)
                        pa = int(rng.choice(by_worker[a]))
                        pb_ = int(rng.choice(by_worker[b]))
                    else:
                        pa, pb_ = (int(v) for v in rng.choice(p.partitions, 2, replace=False))
                    eid = f"{ws.name}-p{idx}a"
                    _send(prod, topic, pa, _event(eid, m, x))
                    plan.events[eid] = ("pair", idx, 0, pa)
                    plan.pair_workers.append((owner.get(pa), owner.get(pb_)))
                    pending.append((idx, m, twin, pb_))
            prod.flush()
            if k < len(chunks):
                progress(f"chunk {k + 1}/{len(chunks)} produced ({len(plan.events)} events)")
                time.sleep(max(0.0, p.gap_s - (time.monotonic() - t_tick)))
    finally:
        prod.close()


# ---------------------------------------------------------------------------- analysis
def _summary(xs) -> dict | None:
    if not len(xs):
        return None
    a = np.asarray(xs, dtype=float)
    return {"n": len(a), "min": round(float(a.min()), 4), "median": round(float(np.median(a)), 4),
            "max": round(float(a.max()), 4)}


def analyse(plan: StreamPlan, requests: list, pairs: int, asg: dict[str, set[int]]) -> dict:
    """Rates and bookkeeping from the requests read back."""
    ids = [r.request_id for r in requests]
    per_worker: dict[str, int] = {}
    for r in requests:
        per_worker[r.worker_id] = per_worker.get(r.worker_id, 0) + 1
    owner = {part: wid for wid, parts in asg.items() for part in parts}
    # partition -> worker as seen on the topic (a rebalance mid-run shows up as two workers)
    seen_owner: dict[int, set[str]] = {}
    for r in requests:
        info = plan.events.get(r.request_id)
        if info:
            seen_owner.setdefault(info[3], set()).add(r.worker_id)
    acc = np.zeros((pairs, 2), dtype=bool)
    acc_by: dict[tuple[int, int], str] = {}
    for r in requests:
        info = plan.events.get(r.request_id)
        if info and info[0] == "pair":
            acc[info[1], info[2]] = True
            acc_by[(info[1], info[2])] = r.worker_id
    any_acc = acc.any(axis=1)
    both = acc.all(axis=1)
    # how the later-decided copy of a doubly accepted pair looked: seconds after its twin's
    # request and its diversity (~noise when the twin was in its cache, large when not)
    req_by = {(plan.events[r.request_id][1], plan.events[r.request_id][2]): r for r in requests
              if r.request_id in plan.events and plan.events[r.request_id][0] == "pair"}
    lag, div_later = [], []
    for i in np.flatnonzero(both):
        ra, rb = req_by[(i, 0)], req_by[(i, 1)]
        ta = ra.requested_at.seconds + ra.requested_at.nanos * 1e-9
        tb = rb.requested_at.seconds + rb.requested_at.nanos * 1e-9
        later = rb if tb >= ta else ra
        lag.append(abs(tb - ta))
        div_later.append(later.decision.components.diversity)
    cross = np.array([a is not None and b is not None and a != b for a, b in plan.pair_workers],
                     dtype=bool)[:pairs]
    n_any, n_both = int(any_acc.sum()), int(both.sum())

    def rate(mask) -> float | None:
        k = int((any_acc & mask).sum())
        return round(int((both & mask).sum()) / k, 4) if k else None

    return {
        "events_produced": len(plan.events),
        "requests": len(requests), "unique_request_ids": len(set(ids)),
        "unknown_request_ids": sum(1 for i in ids if i not in plan.events),
        "accepted_per_worker": dict(sorted(per_worker.items())),
        "acceptance_rate": round(len(set(ids)) / max(1, len(plan.events)), 4),
        "pairs": pairs, "pairs_with_an_accept": n_any, "pairs_both_accepted": n_both,
        "double_accept_rate": round(n_both / n_any, 4) if n_any else None,
        "double_accept_rate_cross_worker_pairs": rate(cross),
        "double_accept_rate_same_worker_pairs": rate(~cross),
        "pairs_on_different_workers": round(float(cross.mean()), 4) if len(cross) else None,
        "double_accepts_twin_lag_s": _summary(lag),
        "double_accepts_later_copy_diversity": _summary(div_later),
        "double_accepts_by_two_workers": sum(
            1 for i in np.flatnonzero(both) if acc_by[(i, 0)] != acc_by[(i, 1)]),
        "assignment": {w: sorted(s) for w, s in sorted(asg.items())},
        "partitions_with_requests_from_two_workers": sorted(
            p for p, ws in seen_owner.items() if len(ws) > 1),
        "assignment_matches_topic": all(ws == {owner.get(p)} for p, ws in seen_owner.items()),
    }


def measure(ws: WorkerSet, seed: int, progress=log) -> dict:
    """Run one configuration on a started WorkerSet: wait for the group, stream, read back,
    collect statuses. Does NOT stop the workers (the caller does, in a finally)."""
    p = ws.params

    def say(msg: str) -> None:
        progress(f"[{ws.name}] {msg}")

    t0 = time.monotonic()
    asg = ws.wait_ready()
    say(f"{len(ws.procs)} worker(s) ready {ws.ready_s:.1f}s after start; assignment "
        + ", ".join(f"{w}: {sorted(s)}" for w, s in sorted(asg.items())))
    rng = np.random.default_rng(seed)
    plan = StreamPlan()
    t_stream = time.monotonic()
    produce_stream(ws, asg, rng, plan, say)
    sts = wait_decided(ws, len(plan.events), p.decide_timeout_s)
    say(f"decided {sum(s['seen'] for s in sts)}/{len(plan.events)} events")
    reader = RequestReader(ws.bootstrap, ws.requests_topic, p.partitions)
    try:
        reader.until_quiet(p.quiet_s, p.decide_timeout_s)
        total = len(reader.requests)
        # followers fold the last selections with a short lag: give them a moment to agree
        deadline = time.monotonic() + (5.0 if ws.follow and len(ws.procs) > 1 else 0.0)
        while True:
            sts = [grpc_status(w.grpc_port) for w in ws.procs]
            if not (ws.follow and len(ws.procs) > 1) or time.monotonic() > deadline or \
                    all(s["budget_spent"] == total for s in sts):
                break
            time.sleep(0.2)
            reader.poll(50)
            total = len(reader.requests)
        requests = list(reader.requests)
    finally:
        reader.close()
    stream_s = time.monotonic() - t_stream
    res = analyse(plan, requests, p.pairs, asg)
    own = res["accepted_per_worker"]
    res.update({
        "config": ws.name, "workers": len(ws.procs), "follow_selections": ws.follow,
        "topic_suffix": ws.suffix, "group_id": ws.group_id,
        "ready_seconds": round(ws.ready_s or 0.0, 2), "stream_seconds": round(stream_s, 2),
        "run_seconds": round(time.monotonic() - t0, 2),
        "status": {s["worker_id"]: s for s in sts},
        "decided_total": sum(s["seen"] for s in sts),
        "every_event_decided_once": sum(s["seen"] for s in sts) == len(plan.events),
        "budget_spent_equals_total_requests": all(s["budget_spent"] == len(requests) for s in sts),
        "budget_spent_equals_own_accepts": all(s["budget_spent"] == own.get(s["worker_id"], 0)
                                               for s in sts),
    })
    try:
        res["metrics_budget_spent"] = {w.worker_id: metrics_value(w.metrics_port,
                                                                  "pairsieve_budget_spent")
                                       for w in ws.procs}
    except OSError as exc:
        res["metrics_budget_spent"] = f"unreadable: {exc}"
    say(f"requests {len(requests)} (per worker {own}); pairs with an accept "
        f"{res['pairs_with_an_accept']}, both accepted {res['pairs_both_accepted']} -> "
        f"double-accept rate {res['double_accept_rate']}")
    return res


def config_workers(name: str, workers: int) -> tuple[int, bool]:
    return {"followers": (workers, True), "baseline": (workers, False), "single": (1, True)}[name]


def run_configs(bootstrap: str, params: ScaleoutParams, configs=CONFIGS, log_dir: str | None = None,
                progress=log) -> dict[str, dict]:
    """Start the worker sets of all ``configs`` at once (start-up dominates the wall time), then
    measure them one after the other, stopping each set as soon as it was measured."""
    log_dir = log_dir or tempfile.mkdtemp(prefix="pairsieve-scaleout-")
    os.makedirs(log_dir, exist_ok=True)
    sets = []
    for name in configs:
        n, follow = config_workers(name, params.workers)
        sets.append(WorkerSet(name, bootstrap, params, n, follow, log_dir))
    results: dict[str, dict] = {}
    try:
        for ws in sets:
            ws.start()
        progress(f"started {sum(len(s.procs) for s in sets)} workers for {list(configs)}; "
                 f"logs in {log_dir}")
        for i, ws in enumerate(sets):
            try:
                results[ws.name] = measure(ws, params.seed + 1000 * i, progress)
            finally:
                codes = ws.stop()
                killed = {w.worker_id: w.tail(6000) for w in ws.procs
                          if codes.get(w.worker_id) is None}
                if ws.name in results:
                    results[ws.name]["exit_codes"] = codes
                progress(f"[{ws.name}] stopped workers: exit codes {codes}")
                for wid, tail in killed.items():  # where it was: the stack dump in its log
                    progress(f"--- {wid} did not stop on SIGTERM; its log ends:\n{tail}")
    finally:
        for ws in sets:  # on an error: never leave a worker behind
            ws.stop()
    for r in results.values():
        r["log_dir"] = log_dir
    return results


# ---------------------------------------------------------------------------- CLI
def table(results: dict[str, dict]) -> str:
    head = (f"{'config':<10} {'workers':>7} {'follow':>6} {'events':>6} {'req':>5} "
            f"{'per worker':<26} {'pairs>=1':>8} {'both':>5} {'double-accept':>13} "
            f"{'x-worker':>8} {'spent==total':>12}")
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        pw = ",".join(str(v) for v in r["accepted_per_worker"].values())
        rate = r["double_accept_rate"]
        rows.append(f"{name:<10} {r['workers']:>7} {int(r['follow_selections']):>6} "
                    f"{r['events_produced']:>6} {r['requests']:>5} {pw:<26} "
                    f"{r['pairs_with_an_accept']:>8} {r['pairs_both_accepted']:>5} "
                    f"{'-' if rate is None else f'{rate:.3f}':>13} "
                    f"{r['pairs_on_different_workers']:>8.2f} "
                    f"{str(r['budget_spent_equals_total_requests']):>12}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    d = ScaleoutParams()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default="", help="existing Kafka; default: start tansu")
    ap.add_argument("--workers", type=int, default=d.workers)
    ap.add_argument("--pairs", type=int, default=d.pairs)
    ap.add_argument("--chunk", type=int, default=d.chunk)
    ap.add_argument("--gap", type=float, default=d.gap_s,
                    help="seconds between a chunk's first and second copies")
    ap.add_argument("--filler-per-pair", type=float, default=d.filler_per_pair)
    ap.add_argument("--warmup-per-partition", type=int, default=d.warmup_per_partition)
    ap.add_argument("--noise", type=float, default=d.noise)
    ap.add_argument("--text-share", type=float, default=d.text_share,
                    help="fraction of text events (0: single modality, utility = diversity)")
    ap.add_argument("--target-rate", type=float, default=d.target_rate)
    ap.add_argument("--batch-max-items", type=int, default=d.batch_max_items)
    ap.add_argument("--partitions", type=int, default=d.partitions)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated subset of {CONFIGS}")
    ap.add_argument("--log-dir", default="", help="worker logs (default: a temp dir)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    a = ap.parse_args(argv)
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        ap.error(f"unknown config(s) {bad}; choose from {CONFIGS}")
    if a.workers < 1 or a.pairs < 1 or a.chunk < 1 or not 0 <= a.text_share <= 1:
        ap.error("--workers, --pairs, --chunk must be >= 1 and --text-share in [0, 1]")
    params = ScaleoutParams(pairs=a.pairs, workers=a.workers, partitions=a.partitions,
                            chunk=a.chunk, gap_s=a.gap, filler_per_pair=a.filler_per_pair,
                            warmup_per_partition=a.warmup_per_partition, noise=a.noise,
                            text_share=a.text_share, target_rate=a.target_rate,
                            batch_max_items=a.batch_max_items, seed=a.seed)
    # SIGTERM -> SystemExit, so the finally blocks stop every worker and the broker
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    broker = None
    bootstrap = a.bootstrap
    try:
        if not bootstrap:
            broker = EmbeddedBroker().start()
            bootstrap = broker.bootstrap
            log(f"started the embedded tansu broker at {bootstrap}")
        results = run_configs(bootstrap, params, configs, a.log_dir or None)
    finally:
        if broker is not None:
            broker.stop()
    wall = time.monotonic() - t0
    print(table(results), flush=True)
    print(f"wall time {wall:.1f}s", flush=True)
    doc = {"command": [sys.executable, *sys.argv] if argv is None else ["scaleout", *argv],
           "wall_seconds": round(wall, 2), "bootstrap": bootstrap if a.bootstrap else "embedded",
           "settings": {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in params.__dict__.items()} | {"modalities": params.modalities},
           "machine": machine_info(),
           "rates": {name: r["double_accept_rate"] for name, r in results.items()},
           "results": results}
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=2, default=str)
        log(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:  # the finally blocks above already stopped every subprocess
        raise SystemExit(130) from None
