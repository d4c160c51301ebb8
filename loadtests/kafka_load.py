"""Kafka load driver for pairsieve: produce feature events at a target rate, measure what comes out.

Point it at any deployment (its Kafka bootstrap and, optionally, the workers' ``/metrics`` URLs)::

    .venv/bin/python loadtests/kafka_load.py --bootstrap 127.0.0.1:9092 --rate 2000 --duration 30 \\
        --ramp-seconds 5 --modalities image:512,text:384,audio:128 --mix 0.6,0.3,0.1 \\
        --malformed 0.01 --metrics-url http://127.0.0.1:9464/metrics --group-id pairsieve \\
        --out-dir reports/loadtest

    # stepped rates (each step --duration seconds), as `make bench` does
    .venv/bin/python loadtests/kafka_load.py --rates 500,1000,2000,4000 --duration 5 ...

What it produces (``pairsieve.features.v1`` + ``--topic-suffix``)
-------------------------------------------------------------------
* ``FeatureBatch`` records (header ``pairsieve-message: FeatureBatch``) of up to ``--batch-size``
  events of ONE modality each (``--batch-size 1``: single ``FeatureEvent`` records instead; one
  producer per encoder, as in a real pipeline), sent when full or
  ``--linger-ms`` after their first event; vectors are clustered, pre-packed float32 of the
  modality's dimension; every event has a unique ``event_id`` (``<run id>-<sequence>``);
* modalities drawn per event with probabilities ``--mix``. The service accepts exactly two
  modalities: the first ``--service-modalities`` (2) listed are expected to be valid, any further
  one (e.g. ``audio:128``) exercises the dead-letter path (``unknown_modality``, one dead letter
  per batch record);
* a fraction ``--malformed`` of events is replaced by a malformed single record, cycling through
  undecodable bytes, a wrong dimension and a NaN vector (``undecodable``, ``wrong_dimension``,
  ``non_finite``). They are single records because a batch is all-or-nothing at the service;
* open loop: the number of events due at time t is the integral of the rate schedule (linear
  ramp from 0 over ``--ramp-seconds``, then each rate of ``--rates`` for ``--duration`` s). When
  the driver itself cannot keep up (more than one second of events overdue) the overdue events
  are dropped and counted as ``driver_dropped``: the achieved rate is always reported.

What it measures
----------------
* **event time**: ``event_time`` is stamped when the record is handed to the producer (all events
  of a record share it), so the driver's own batching (``--linger-ms``) is NOT in the latencies;
* **decision latency** = the ``AlignmentRequest``'s ``requested_at`` (stamped by the service when
  it decided the batch) minus the event's ``event_time``. Same definition as the service's
  ``pairsieve_decision_latency_seconds`` histogram, but measured on the accepted events only
  (only those reach the requests topic). Driver and service clocks must agree (same host, or
  NTP): with a remote deployment read it together with the e2e latency below;
* **e2e latency** = time the driver consumed the request minus ``event_time`` (driver clock
  only): decision + publish (acks=all) + the reader's fetch;
* **throughput in**: events produced per second (acknowledged by Kafka);
* **throughput out**: alignment requests and dead letters read back per second, and with
  ``--metrics-url`` the events the workers decided per second (``pairsieve_events_received_total``
  over accepted/skipped/duplicate, summed over the URLs), plus the service's latency histogram
  over ALL decided events (p50/p99 interpolated inside the buckets) and its
  ``pairsieve_consumer_lag`` gauge; with ``--group-id`` the service's committed offsets give the
  events processed and the lag in records behind the last offset this driver produced (faust
  commits every ~2.8 s, so this lags by up to that);
* **drain rate** (with ``--metrics-url``; ``summary.drain``): events the workers decided per
  second while they worked off the backlog left when the producer stopped, i.e. their own
  throughput with nothing producing (None without a backlog of at least a second).

Output in ``--out-dir``: ``kafka_result.json`` (config, summary, per-step results, time series),
``kafka_timeseries.csv`` (one row per second), ``kafka_steps.csv`` (one row per rate step),
``kafka_requests.csv`` (one row per alignment request read: latencies, worker, reason) and
``kafka_load.png`` (rates, latencies and lag over time).

It only connects to ``--bootstrap`` and the ``--metrics-url`` addresses, runs for the schedule
plus at most ``--drain-seconds`` and stops by itself; ``--max-events`` bounds the total.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np

from service.perfbench.fixtures import VectorBank, machine_info
from service.perfbench.loadgen import (
    HEADER_BATCH,
    HEADER_EVENT,
    drain_rate,
    hist_delta,
    hist_fraction_le,
    hist_quantile,
    md_table,
    parse_floats,
    parse_mix,
    parse_modalities,
    pb,
    percentiles,
    pyplot,
    save_figure,
    scrape_pairsieve,
    set_timestamp,
    sum_scrapes,
    ts_seconds,
    write_csv,
    write_json,
)

FEATURES_TOPIC = "pairsieve.features.v1"
REQUESTS_TOPIC = "pairsieve.alignment-requests.v1"
DEAD_LETTER_TOPIC = "pairsieve.dead-letter.v1"
MALFORMED_KINDS = ("undecodable", "wrong_dimension", "non_finite")
GARBAGE_PREFIX = b"\xff\x00"  # field 15 with wire type 7: never parses as protobuf


@dataclass
class KafkaLoadConfig:
    """Everything that shapes one run (also written to the JSON)."""

    bootstrap: str = "127.0.0.1:9092"
    topic_suffix: str = ""
    rates: list[float] = field(default_factory=lambda: [1000.0])
    duration: float = 10.0           # seconds per rate step
    ramp_seconds: float = 0.0
    modalities: str = "image:512,text:384"
    service_modalities: int = 2
    mix: str = ""
    malformed: float = 0.0
    batch_size: int = 32
    linger_ms: float = 20.0
    read_dead_letter: bool = True
    metrics_urls: list[str] = field(default_factory=list)
    group_id: str = ""
    drain_seconds: float = 15.0
    idle_seconds: float = 3.0
    out_dir: str = "loadtest-out"
    seed: int = 0
    max_events: int = 2_000_000
    bank_size: int = 1024
    scrape_interval: float = 0.5
    settle_seconds: float = 1.0      # skipped at the start of each step for the metric windows
    plot: bool = True
    label: str = "kafka"

    def validate(self) -> None:
        if not self.rates or any(r <= 0 or not math.isfinite(r) for r in self.rates):
            raise ValueError(f"rates must be positive, got {self.rates}")
        if self.duration <= 0 or self.ramp_seconds < 0:
            raise ValueError("duration must be > 0 and ramp_seconds >= 0")
        if not 0 <= self.malformed < 1:
            raise ValueError(f"malformed must be in [0, 1), got {self.malformed}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        mods = parse_modalities(self.modalities)
        parse_mix(self.mix, len(mods))
        if not 1 <= self.service_modalities <= len(mods):
            raise ValueError("service_modalities must be between 1 and the number of modalities")


@dataclass
class Phase:
    name: str
    start: float   # seconds after the run start
    duration: float
    rate_from: float
    rate_to: float

    @property
    def end(self) -> float:
        return self.start + self.duration

    def rate(self, t: float) -> float:
        f = min(1.0, max(0.0, (t - self.start) / self.duration))
        return self.rate_from + (self.rate_to - self.rate_from) * f

    def cum(self, t: float) -> float:
        """Events due from the phase start to ``t`` (clamped to the phase)."""
        dt = min(self.duration, max(0.0, t - self.start))
        slope = (self.rate_to - self.rate_from) / self.duration
        return self.rate_from * dt + 0.5 * slope * dt * dt


def build_schedule(cfg: KafkaLoadConfig) -> list[Phase]:
    phases, t = [], 0.0
    if cfg.ramp_seconds > 0:
        phases.append(Phase("ramp", 0.0, cfg.ramp_seconds, 0.0, cfg.rates[0]))
        t = cfg.ramp_seconds
    for r in cfg.rates:
        phases.append(Phase(f"{r:g}/s", t, cfg.duration, r, r))
        t += cfg.duration
    return phases


def _due(phases: list[Phase], t: float) -> float:
    return sum(p.cum(t) for p in phases)


def _phase_at(phases: list[Phase], t: float) -> int:
    for i, p in enumerate(phases):
        if t < p.end:
            return i
    return len(phases) - 1


class KafkaLoad:
    """One run (see module docstring). ``await KafkaLoad(cfg).run()`` -> result dict."""

    def __init__(self, cfg: KafkaLoadConfig, log=print):
        cfg.validate()
        self.cfg = cfg
        self.log = log
        self.run_id = "lt" + uuid.uuid4().hex[:10]
        self.prefix = self.run_id + "-"
        self.mods = parse_modalities(cfg.modalities)
        self.mix = parse_mix(cfg.mix, len(self.mods))
        self.valid_mods = {m for m, _ in self.mods[:cfg.service_modalities]}
        self.bank = VectorBank(self.mods, cfg.bank_size, cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.phases = build_schedule(cfg)
        self.features = FEATURES_TOPIC + cfg.topic_suffix
        self.requests_topic = REQUESTS_TOPIC + cfg.topic_suffix
        self.dl_topic = DEAD_LETTER_TOPIC + cfg.topic_suffix
        n = cfg.max_events
        self.send_t = np.full(n, np.nan)          # seq -> event_time (send time)
        self.seq_mod = np.full(n, -1, np.int8)    # seq -> modality index (-1 malformed)
        self.seq = 0
        self.driver_dropped = 0
        self.send_errors = 0
        self.records: dict[tuple[int, int], tuple[int, str, int, float]] = {}  # (p, off) -> info
        self.sent_log: list[tuple[float, int, str]] = []  # (t, events, kind) per acked record
        self.pending = 0
        self.kind_events = {k: 0 for k in ("batch", "unknown_modality", *MALFORMED_KINDS)}
        self.req_rows: list[tuple] = []   # (seq, requested_at, consumed_at, worker, reason, mod)
        self.dl_raw: list[tuple] = []     # (consumed_at, reason, partition, offset, topic)
        self.scrapes: list[dict] = []
        self.commits: list[tuple[float, dict[int, int]]] = []
        self.last_read = 0.0
        self.t0 = 0.0
        self.t_produce_end = 0.0
        self.t_end = 0.0
        self.scrape_errors = 0
        self.commit_errors = 0

    # ------------------------------------------------------------------ producing
    def _event(self, seq: int, mod: str, dim: int, t: float, vector: bytes | None = None):
        ev = pb.FeatureEvent(event_id=f"{self.prefix}{seq}", item_id=f"{self.prefix}i{seq}",
                             modality=mod, dim=dim,
                             vector=vector if vector is not None else self.bank.vector(mod, seq),
                             source="loadtests/kafka_load.py")
        set_timestamp(ev.event_time, t)
        return ev

    async def _send(self, producer, value: bytes, headers, n: int, kind: str, first_seq: int,
                    t: float) -> None:
        try:
            fut = await producer.send(self.features, value, headers=headers)
        except Exception as exc:  # noqa: BLE001 - counted, the run goes on
            self.send_errors += 1
            self.log(f"send failed: {exc!r}")
            return
        self.pending += 1

        def done(f):
            self.pending -= 1
            if f.cancelled() or f.exception() is not None:
                self.send_errors += 1
                return
            md = f.result()
            self.records[(md.partition, md.offset)] = (n, kind, first_seq, t)
            self.sent_log.append((time.time(), n, kind))
            self.kind_events[kind] += n

        fut.add_done_callback(done)

    async def _flush(self, producer, mi: int, seqs: list[int]) -> None:
        mod, dim = self.mods[mi]
        t = time.time()
        self.send_t[seqs] = t
        kind = "batch" if mod in self.valid_mods else "unknown_modality"
        if self.cfg.batch_size == 1:  # single-event records, as an encoder without batching
            value, header = self._event(seqs[0], mod, dim, t).SerializeToString(), HEADER_EVENT
        else:
            value = pb.FeatureBatch(events=[self._event(s, mod, dim, t)
                                            for s in seqs]).SerializeToString()
            header = HEADER_BATCH
        await self._send(producer, value, [header], len(seqs), kind, seqs[0], t)

    async def _malformed(self, producer, seq: int) -> None:
        kind = MALFORMED_KINDS[seq % len(MALFORMED_KINDS)]
        mod, dim = self.mods[seq % min(len(self.mods), self.cfg.service_modalities)]
        t = time.time()
        self.send_t[seq] = t
        if kind == "undecodable":
            value = GARBAGE_PREFIX + f"pairsieve-loadtest {self.prefix}{seq}".encode()
            headers = []
        elif kind == "wrong_dimension":
            ev = self._event(seq, mod, 3, t, np.zeros(3, "<f4").tobytes())
            value, headers = ev.SerializeToString(), [HEADER_EVENT]
        else:
            ev = self._event(seq, mod, dim, t, np.full(dim, np.nan, "<f4").tobytes())
            value, headers = ev.SerializeToString(), [HEADER_EVENT]
        await self._send(producer, value, headers, 1, kind, seq, t)

    async def _produce(self, producer) -> None:
        cfg = self.cfg
        total = self.phases[-1].end
        buffers: list[list[int]] = [[] for _ in self.mods]
        opened = [0.0] * len(self.mods)
        linger = cfg.linger_ms / 1000.0
        emitted = 0
        last_report = 0.0
        while True:
            now = time.time()
            el = now - self.t0
            if el >= total or self.seq >= cfg.max_events:
                break
            due = int(_due(self.phases, el)) - emitted
            cap = max(1, int(self.phases[_phase_at(self.phases, el)].rate(el)))  # 1 s of events
            if due > cap:
                self.driver_dropped += due - cap
                emitted += due - cap
                due = cap
            due = min(due, cfg.max_events - self.seq)
            if due > 0:
                emitted += due
                mods = self.rng.choice(len(self.mods), size=due, p=self.mix)
                bad = self.rng.random(due) < cfg.malformed if cfg.malformed > 0 else None
                for j in range(due):
                    s = self.seq
                    self.seq += 1
                    if bad is not None and bad[j]:
                        await self._malformed(producer, s)
                        continue
                    mi = int(mods[j])
                    self.seq_mod[s] = mi
                    if not buffers[mi]:
                        opened[mi] = now
                    buffers[mi].append(s)
                    if len(buffers[mi]) >= cfg.batch_size:
                        await self._flush(producer, mi, buffers[mi])
                        buffers[mi] = []
            for mi, buf in enumerate(buffers):
                if buf and now - opened[mi] >= linger:
                    await self._flush(producer, mi, buf)
                    buffers[mi] = []
            if el - last_report >= 5.0:
                last_report = el
                name = self.phases[_phase_at(self.phases, el)].name
                self.log(f"[{self.cfg.label}] t={el:5.1f}s phase {name}: "
                         f"{self.seq} events produced, {len(self.req_rows)} requests, "
                         f"{len(self.dl_raw)} dead letters read")
            await asyncio.sleep(0.004)
        for mi, buf in enumerate(buffers):
            if buf:
                await self._flush(producer, mi, buf)
        await producer.flush()
        self.t_produce_end = time.time()

    # ------------------------------------------------------------------ reading
    async def _open_reader(self):
        from aiokafka import AIOKafkaConsumer, TopicPartition

        c = AIOKafkaConsumer(bootstrap_servers=self.cfg.bootstrap, group_id=None,
                             enable_auto_commit=False, auto_offset_reset="latest",
                             client_id=f"pairsieve-loadtest-{self.run_id}",
                             max_partition_fetch_bytes=8 * 1024 * 1024,
                             # short long-poll: tansu holds a fetch ~half of this even when data
                             # arrives, which would be added to the e2e latency
                             fetch_max_wait_ms=20)
        try:
            await c.start()
        except Exception as exc:  # noqa: BLE001 - KafkaConnectionError and friends
            await c.stop()
            raise RuntimeError(f"cannot reach Kafka at {self.cfg.bootstrap}: {exc}") from exc
        topics = [self.requests_topic] + ([self.dl_topic] if self.cfg.read_dead_letter else [])
        tps = []
        for topic in topics:
            parts = None
            for _ in range(100):
                parts = c.partitions_for_topic(topic)
                if parts:
                    break
                await asyncio.sleep(0.1)
                await c._client.force_metadata_update()
            if not parts:
                await c.stop()
                raise RuntimeError(f"topic {topic!r} not found at {self.cfg.bootstrap}: start the "
                                           f"service first (it creates its topics), or check "
                                           f"--topic-suffix")
            tps += [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        await c.seek_to_end(*tps)
        for tp in tps:  # resolve the positions now, before anything is produced
            await c.position(tp)
        return c

    async def _read(self, consumer, stop: asyncio.Event) -> None:
        from google.protobuf.message import DecodeError

        prefix, n_pre = self.prefix, len(self.prefix)
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100, max_records=2000)
            now = time.time()
            for tp, recs in batches.items():
                if tp.topic == self.requests_topic:
                    for r in recs:
                        try:
                            req = pb.AlignmentRequest.FromString(r.value)
                        except DecodeError:
                            continue
                        rid = req.request_id
                        if not rid.startswith(prefix):
                            continue
                        try:
                            s = int(rid[n_pre:])
                        except ValueError:
                            continue
                        self.req_rows.append((s, ts_seconds(req.requested_at)
                                              if req.HasField("requested_at") else math.nan, now,
                                              req.worker_id, req.decision.reason, req.modality))
                        self.last_read = now
                else:
                    for r in recs:
                        try:
                            dl = pb.DeadLetter.FromString(r.value)
                        except DecodeError:
                            continue
                        if dl.source_topic != self.features:
                            continue
                        self.dl_raw.append((now, dl.reason, dl.source_partition,
                                                    dl.source_offset))
                        self.last_read = now

    # ------------------------------------------------------------------ observing the service
    async def _scrape_once(self) -> None:
        if not self.cfg.metrics_urls:
            return
        try:
            got = await asyncio.gather(*[asyncio.to_thread(scrape_pairsieve, u)
                                                 for u in self.cfg.metrics_urls])
            self.scrapes.append(sum_scrapes(got))
        except Exception as exc:  # noqa: BLE001 - a missed scrape is reported, not fatal
            self.scrape_errors += 1
            if self.scrape_errors <= 3:
                self.log(f"metrics scrape failed: {exc!r}")

    async def _scrape(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self._scrape_once()
            try:
                await asyncio.wait_for(stop.wait(), self.cfg.scrape_interval)
            except TimeoutError:
                pass

    def _committed(self, admin) -> dict[int, int]:
        group = self.cfg.group_id
        if hasattr(admin, "list_group_offsets"):  # kafka-python >= 3
            offs = admin.list_group_offsets({group: None}).get(group, {})
        else:
            offs = admin.list_consumer_group_offsets(group)
        return {tp.partition: om.offset for tp, om in offs.items()
                if tp.topic == self.features and om.offset >= 0}

    async def _poll_commits(self, stop: asyncio.Event) -> None:
        if not self.cfg.group_id:
            return
        from kafka.admin import KafkaAdminClient

        try:
            admin = await asyncio.to_thread(KafkaAdminClient, bootstrap_servers=self.cfg.bootstrap,
                                                    client_id=f"pairsieve-loadtest-{self.run_id}-admin",
                                                    request_timeout_ms=5000)
        except Exception as exc:  # noqa: BLE001
            self.log(f"cannot open an admin client for committed offsets: {exc!r}")
            return
        try:
            while not stop.is_set():
                try:
                    got = await asyncio.to_thread(self._committed, admin)
                    self.commits.append((time.time(), got))
                except Exception as exc:  # noqa: BLE001
                    self.commit_errors += 1
                    if self.commit_errors <= 3:
                        self.log(f"committed offsets of group {self.cfg.group_id!r}: {exc!r}")
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except TimeoutError:
                    pass
        finally:
            await asyncio.to_thread(admin.close)

    # ------------------------------------------------------------------ bookkeeping
    def _expected_decided(self) -> int:
        return self.kind_events["batch"]

    def _decided_since_start(self) -> float | None:
        if len(self.scrapes) < 2:
            return None
        return self.scrapes[-1]["decided"] - self.scrapes[0]["decided"]

    def _end_offsets(self) -> dict[int, int]:
        ends: dict[int, int] = {}
        for p, off in self.records:
            ends[p] = max(ends.get(p, -1), off + 1)
        return ends

    def _rec_arrays(self):
        """(partition, offset, events, send time) of every acknowledged record, as arrays."""
        if getattr(self, "_rec_cache", (None,))[0] != len(self.records):
            keys = list(self.records)
            vals = [self.records[k] for k in keys]
            arrs = (np.array([k[0] for k in keys], dtype=np.int64),
                    np.array([k[1] for k in keys], dtype=np.int64),
                    np.array([v[0] for v in vals], dtype=np.int64),
                    np.array([v[3] for v in vals], dtype=float))
            self._rec_cache = (len(self.records), arrs)
        return self._rec_cache[1]

    def _processed(self, committed: dict[int, int]) -> tuple[int, int]:
        """(events, records) of this run below the committed offsets."""
        p, off, n, _t = self._rec_arrays()
        if not p.size:
            return 0, 0
        lim = np.array([committed.get(int(i), -1) for i in range(int(p.max()) + 1)])
        below = off < lim[p]
        return int(n[below].sum()), int(below.sum())

    def _drained(self) -> bool:
        quiet = time.time() - max(self.last_read, self.t_produce_end)
        if self.pending:
            return False
        d = self._decided_since_start()
        if d is not None:
            return d >= self._expected_decided() and quiet >= min(1.0, self.cfg.idle_seconds)
        if self.cfg.group_id and self.commits:
            committed = self.commits[-1][1]
            ends = self._end_offsets()
            if all(committed.get(p, -1) >= e for p, e in ends.items()):
                return quiet >= min(1.0, self.cfg.idle_seconds)
        return quiet >= self.cfg.idle_seconds

    # ------------------------------------------------------------------ run
    async def run(self) -> dict:
        from aiokafka import AIOKafkaProducer

        cfg = self.cfg
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.log(f"[{cfg.label}] run {self.run_id}: {cfg.bootstrap} topic {self.features}, phases "
                 + ", ".join(f"{p.name} {p.duration:g}s" for p in self.phases))
        consumer = await self._open_reader()
        producer = AIOKafkaProducer(bootstrap_servers=cfg.bootstrap, acks=1, linger_ms=2,
                                    max_batch_size=1024 * 1024, max_request_size=16 * 1024 * 1024,
                                    client_id=f"pairsieve-loadtest-{self.run_id}")
        await producer.start()
        stop = asyncio.Event()
        await self._scrape_once()  # baseline of the counters
        tasks = [asyncio.create_task(self._read(consumer, stop)),
                 asyncio.create_task(self._scrape(stop)),
                 asyncio.create_task(self._poll_commits(stop))]
        try:
            self.t0 = time.time()
            await self._produce(producer)
            self.log(f"[{cfg.label}] produced {self.seq} events in "
                     f"{self.t_produce_end - self.t0:.1f}s; draining (<= {cfg.drain_seconds:g}s)")
            deadline = time.time() + cfg.drain_seconds
            while time.time() < deadline and not self._drained():
                for t in tasks:
                    if t.done() and t.exception() is not None:
                        raise t.exception()
                await asyncio.sleep(0.2)
            self.drained = self._drained()
        finally:
            self.t_end = time.time()
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._scrape_once()
            await producer.stop()
            await consumer.stop()
        result = self.analyse()
        self.write(result)
        return result

    # ------------------------------------------------------------------ analysis
    def _latency_arrays(self):
        if not self.req_rows:
            e = np.zeros(0)
            return e, e, e, e, np.zeros(0, int)
        seq = np.array([r[0] for r in self.req_rows], dtype=np.int64)
        req_at = np.array([r[1] for r in self.req_rows])
        cons = np.array([r[2] for r in self.req_rows])
        sent = self.send_t[seq]
        return sent, (req_at - sent) * 1e3, (cons - sent) * 1e3, cons, seq

    def _dead_letters(self) -> tuple[dict, int, int, list]:
        by_reason: dict[str, int] = {}
        events = records = 0
        rows = []
        for t, reason, p, off in self.dl_raw:
            info = self.records.get((p, off))
            if info is None:
                continue  # not one of this run's records
            n = info[0]
            by_reason[reason] = by_reason.get(reason, 0) + n
            events += n
            records += 1
            rows.append((t, n, info[3]))
        return by_reason, events, records, rows

    def _scrape_at(self, t: float) -> dict | None:
        """The last scrape taken at or before ``t`` (the first one if none)."""
        best = None
        for s in self.scrapes:
            if s["t"] <= t:
                best = s
            else:
                break
        return best or (self.scrapes[0] if self.scrapes else None)

    def _metric_window(self, t_from: float, t_to: float) -> dict:
        a, b = self._scrape_at(t_from), self._scrape_at(t_to)
        if a is None or b is None or b["t"] - a["t"] <= 0:
            return {}
        buckets = hist_delta(b["latency_buckets"], a["latency_buckets"])
        lags = [s["lag"] for s in self.scrapes if t_from <= s["t"] <= t_to]
        return {"decided": b["decided"] - a["decided"],
                "decided_per_s": (b["decided"] - a["decided"]) / (b["t"] - a["t"]),
                "service_p50_ms": _ms(hist_quantile(buckets, 0.50)),
                "service_p99_ms": _ms(hist_quantile(buckets, 0.99)),
                "service_le_50ms": hist_fraction_le(buckets, 0.05),
                "service_le_100ms": hist_fraction_le(buckets, 0.1),
                "service_latency_n": buckets[-1][1] if buckets else 0,
                "lag_max_metric": max(lags) if lags else None}

    def analyse(self) -> dict:
        cfg = self.cfg
        n = self.seq
        sent, dec_ms, e2e_ms, cons, req_seq = self._latency_arrays()
        dl_by_reason, dl_events, dl_records, dl_rows = self._dead_letters()
        good = self.kind_events["batch"]
        produce_s = max(1e-9, self.t_produce_end - self.t0)
        expected_dl = sum(self.kind_events[k] for k in ("unknown_modality", *MALFORMED_KINDS))
        win = self._metric_window(self.t0, self.t_end)
        committed = self.commits[-1][1] if self.commits else None
        processed = self._processed(committed) if committed is not None else None
        ends = self._end_offsets()
        lag_end = (sum(max(0, e - committed.get(p, 0)) for p, e in ends.items())
                   if committed is not None else None)
        t_last_out = max([self.t_produce_end] + [r[2] for r in self.req_rows]
                         + [r[0] for r in dl_rows])
        summary = {
            "run_id": self.run_id, "bootstrap": cfg.bootstrap, "features_topic": self.features,
            "produced_events": int(sum(self.kind_events.values())),
            "produced_records": len(self.records), "sequence_numbers": n,
            "good_events": good, "events_by_kind": dict(self.kind_events),
            "driver_dropped": self.driver_dropped, "send_errors": self.send_errors,
            "produce_seconds": produce_s,
            "produced_per_s": sum(self.kind_events.values()) / produce_s,
            "events_per_record": (sum(self.kind_events.values()) / len(self.records)
                                          if self.records else None),
            "requests": len(self.req_rows),
            "requests_per_s": len(self.req_rows) / max(1e-9, t_last_out - self.t0),
            "acceptance": len(self.req_rows) / good if good else None,
            "dead_letter_read": cfg.read_dead_letter,
            "dead_letter_records": dl_records, "dead_letter_events": dl_events,
            "dead_letter_expected_events": expected_dl, "dead_letters_by_reason": dl_by_reason,
            "decision_latency_ms": percentiles(dec_ms),
            "e2e_latency_ms": percentiles(e2e_ms),
            "decided_events": win.get("decided"),
            "decided_per_s": (win["decided"] / max(1e-9, t_last_out - self.t0)
                              if win.get("decided") is not None else None),
            "service_latency_p50_ms": win.get("service_p50_ms"),
            "service_latency_p99_ms": win.get("service_p99_ms"),
            "committed_processed_events": processed[0] if processed else None,
            "lag_records_end": lag_end, "drained": getattr(self, "drained", False),
            "elapsed_s": self.t_end - self.t0, "scrape_errors": self.scrape_errors,
            # the worker's own rate while it worked off the backlog, the producer stopped
            "drain": drain_rate(self.scrapes, self.t_produce_end),
        }
        steps = []
        for ph in self.phases:
            a, b = self.t0 + ph.start, self.t0 + ph.end
            in_ph = (sent >= a) & (sent < b) if sent.size else np.zeros(0, bool)
            seq_in = (self.send_t[:n] >= a) & (self.send_t[:n] < b)
            produced = int(seq_in.sum())
            good_in = int((seq_in & (self.seq_mod[:n] >= 0)
                           & np.isin(self.seq_mod[:n], [j for j, (m, _) in enumerate(self.mods)
                                                                if m in self.valid_mods])).sum())
            row = {"phase": ph.name, "target_per_s": ph.rate_to if ph.name != "ramp" else None,
                   "seconds": ph.duration, "produced": produced,
                   "produced_per_s": produced / ph.duration, "good": good_in,
                   "requests": int(in_ph.sum()),
                   "decision_p50_ms": percentiles(dec_ms[in_ph])["p50"] if sent.size else None,
                   "decision_p99_ms": percentiles(dec_ms[in_ph])["p99"] if sent.size else None,
                   "e2e_p50_ms": percentiles(e2e_ms[in_ph])["p50"] if sent.size else None,
                   "e2e_p99_ms": percentiles(e2e_ms[in_ph])["p99"] if sent.size else None}
            settle = min(cfg.settle_seconds, ph.duration / 2) if ph.name != "ramp" else 0.0
            row["settle_s"] = settle
            row.update(self._metric_window(a + settle, b))
            if self.commits:
                cs = [c for t, c in self.commits if t <= b]
                if cs:
                    row["lag_records_at_end"] = sum(max(0, e - cs[-1].get(p, 0))
                                                    for p, e in self._end_offsets_before(b).items())
            steps.append(row)
        series = self._timeseries(sent, dec_ms, e2e_ms, cons, dl_rows)
        return {"kind": "kafka_load", "config": asdict(cfg),
                "machine": machine_info(torch_info=False),
                "summary": summary, "steps": steps, "timeseries": series,
                "phases": [asdict(p) for p in self.phases],
                "requests_detail": self._request_rows(sent, dec_ms, e2e_ms, req_seq)}

    def _end_offsets_before(self, t: float) -> dict[int, int]:
        p, off, _n, ts = self._rec_arrays()
        m = ts <= t
        ends: dict[int, int] = {}
        for part in np.unique(p[m]):
            ends[int(part)] = int(off[m & (p == part)].max()) + 1
        return ends

    def _request_rows(self, sent, dec_ms, e2e_ms, req_seq) -> list[dict]:
        rows = []
        for i, r in enumerate(self.req_rows):
            rows.append({"event_id": f"{self.prefix}{r[0]}", "modality": r[5], "worker_id": r[3],
                         "reason": r[4], "event_time": float(sent[i]), "requested_at": r[1],
                         "consumed_at": r[2], "decision_ms": float(dec_ms[i]),
                         "e2e_ms": float(e2e_ms[i])})
        return rows

    def _timeseries(self, sent, dec_ms, e2e_ms, cons, dl_rows) -> list[dict]:
        t0 = self.t0
        n_bins = max(1, int(math.ceil(self.t_end - t0)))
        rows = [{"t_s": i, "phase": self.phases[_phase_at(self.phases, i + 0.5)].name,
                 "target_per_s": self.phases[_phase_at(self.phases, i + 0.5)].rate(i + 0.5)
                 if i + 0.5 < self.phases[-1].end else 0.0,
                 "produced_per_s": 0, "records_per_s": 0, "malformed_per_s": 0,
                 "requests_per_s": 0, "dead_letters_per_s": 0} for i in range(n_bins)]

        def b(t):
            return min(n_bins - 1, max(0, int(t - t0)))

        for t, n, kind in self.sent_log:
            r = rows[b(t)]
            r["produced_per_s"] += n
            r["records_per_s"] += 1
            if kind in MALFORMED_KINDS:
                r["malformed_per_s"] += n
        for t in cons:
            rows[b(t)]["requests_per_s"] += 1
        for t, n, _ts in dl_rows:
            rows[b(t)]["dead_letters_per_s"] += n
        if cons.size:
            idx = np.clip((cons - t0).astype(int), 0, n_bins - 1)
            for i in np.unique(idx):
                m = idx == i
                pd, pe = percentiles(dec_ms[m]), percentiles(e2e_ms[m])
                rows[i].update(decision_p50_ms=pd["p50"], decision_p99_ms=pd["p99"],
                                       e2e_p50_ms=pe["p50"], e2e_p99_ms=pe["p99"])
        edges = t0 + np.arange(n_bins + 1, dtype=float)
        if len(self.scrapes) >= 2:
            st = np.array([s["t"] for s in self.scrapes])
            dec = np.interp(edges, st, [s["decided"] for s in self.scrapes])
            for i in range(n_bins):
                if st[0] <= edges[i + 1] and edges[i] <= st[-1]:
                    rows[i]["decided_per_s"] = float(dec[i + 1] - dec[i])
            for i in range(n_bins):  # histogram/gauge: the scrapes bracketing the second
                a, b_ = self._scrape_at(edges[i]), self._scrape_at(edges[i + 1])
                if a is None or b_ is None or b_ is a:
                    continue
                rows[i]["lag_metric"] = b_["lag"]
                d = hist_delta(b_["latency_buckets"], a["latency_buckets"])
                rows[i]["service_p50_ms"] = _ms(hist_quantile(d, 0.5))
                rows[i]["service_p99_ms"] = _ms(hist_quantile(d, 0.99))
        if len(self.commits) >= 2:
            ct = np.array([t for t, _ in self.commits])
            proc = np.interp(edges, ct, [self._processed(c)[0] for _, c in self.commits])
            for i in range(n_bins):
                if ct[0] <= edges[i + 1] and edges[i] <= ct[-1]:
                    rows[i]["processed_per_s"] = float(proc[i + 1] - proc[i])
        for t, c in self.commits:
            rows[b(t)]["lag_records"] = sum(max(0, e - c.get(p, 0))
                                                    for p, e in self._end_offsets_before(t).items())
        return rows

    # ------------------------------------------------------------------ output
    def write(self, result: dict) -> None:
        d = self.cfg.out_dir
        ts_fields = ["t_s", "phase", "target_per_s", "produced_per_s", "records_per_s",
                     "malformed_per_s", "requests_per_s", "dead_letters_per_s", "decided_per_s",
                     "processed_per_s", "lag_records", "lag_metric", "decision_p50_ms",
                     "decision_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "service_p50_ms",
                     "service_p99_ms"]
        write_csv(os.path.join(d, "kafka_timeseries.csv"), result["timeseries"], ts_fields)
        step_fields = ["phase", "target_per_s", "seconds", "produced", "produced_per_s", "good",
                       "requests", "decided", "decided_per_s", "decision_p50_ms",
                       "decision_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "service_p50_ms",
                       "service_p99_ms", "service_le_50ms", "service_le_100ms", "lag_max_metric",
                       "lag_records_at_end"]
        write_csv(os.path.join(d, "kafka_steps.csv"), result["steps"], step_fields)
        write_csv(os.path.join(d, "kafka_requests.csv"), result["requests_detail"],
                  ["event_id", "modality", "worker_id", "reason", "event_time", "requested_at",
                   "consumed_at", "decision_ms", "e2e_ms"])
        out = {k: v for k, v in result.items() if k != "requests_detail"}
        write_json(os.path.join(d, "kafka_result.json"), out)
        if self.cfg.plot:
            try:
                plot(result, os.path.join(d, "kafka_load.png"))
            except Exception as exc:  # noqa: BLE001 - the numbers matter more than the picture
                self.log(f"plot failed: {exc!r}")


def _ms(x):
    return None if x is None else x * 1e3


def plot(result: dict, path: str) -> str:
    plt = pyplot()
    ts = result["timeseries"]
    t = [r["t_s"] + 0.5 for r in ts]

    def col(k):
        return [r.get(k) if r.get(k) is not None else float("nan") for r in ts]

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax = axes[0]
    ax.plot(t, col("target_per_s"), "k:", label="target")
    ax.plot(t, col("produced_per_s"), label="produced")
    if any(r.get("decided_per_s") is not None for r in ts):
        ax.plot(t, col("decided_per_s"), label="decided (metrics)")
    if any(r.get("processed_per_s") is not None for r in ts):
        ax.plot(t, col("processed_per_s"), alpha=0.6, label="processed (committed offsets)")
    ax.set_ylabel("events/s")
    ax2 = ax.twinx()
    ax2.plot(t, col("requests_per_s"), "g--", label="alignment requests")
    if result["config"].get("read_dead_letter", True):
        ax2.plot(t, col("dead_letters_per_s"), "r--", label="dead letters (events)")
    ax2.set_ylabel("out/s (requests, dead letters)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax.set_title(f"pairsieve Kafka load ({result['summary']['run_id']})")
    ax = axes[1]
    for k, lab in (("decision_p50_ms", "decision p50 (accepted)"),
                   ("decision_p99_ms", "decision p99 (accepted)"),
                   ("e2e_p99_ms", "e2e p99 (read back)"), ("service_p50_ms", "service p50 (all)"),
                   ("service_p99_ms", "service p99 (all)")):
        if any(r.get(k) is not None for r in ts):
            ax.plot(t, col(k), label=lab)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[2]
    if any(r.get("lag_records") is not None for r in ts):
        ax.plot(t, col("lag_records"), ".-", label="lag (records, committed offsets)")
    if any(r.get("lag_metric") is not None for r in ts):
        ax.plot(t, col("lag_metric"), label="pairsieve_consumer_lag (sum)")
    ax.set_ylabel("lag")
    ax.set_xlabel("seconds since start")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", fontsize=8)
    for a in axes:
        for ph in result["phases"]:
            a.axvline(ph["start"], color="grey", lw=0.5)
    return save_figure(fig, path)


def steps_table(result: dict) -> str:
    rows = []
    for s in result["steps"]:
        rows.append([s["phase"], s["produced_per_s"], s.get("decided_per_s"), s["requests"],
                     s.get("decision_p50_ms"), s.get("decision_p99_ms"), s.get("service_p50_ms"),
                     s.get("service_p99_ms"), s.get("lag_max_metric")])
    return md_table(["step", "produced/s", "decided/s", "requests", "decision p50 ms",
                     "decision p99 ms", "service p50 ms", "service p99 ms", "max lag"], rows)


def run(cfg: KafkaLoadConfig, log=print) -> dict:
    """Run one load test synchronously (its own event loop); returns the result dict."""
    return asyncio.run(KafkaLoad(cfg, log).run())


def config_from_args(argv=None) -> KafkaLoadConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092", help="Kafka bootstrap host:port")
    ap.add_argument("--topic-suffix", default="", help="PAIRSIEVE_TOPIC_SUFFIX of the service")
    ap.add_argument("--rate", type=float, default=1000.0, help="events/s (one step)")
    ap.add_argument("--rates", default="", help="comma-separated events/s, one step each "
                    "(overrides --rate)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per step")
    ap.add_argument("--ramp-seconds", type=float, default=0.0,
                    help="linear ramp from 0 to the first rate before the steps")
    ap.add_argument("--modalities", default="image:512,text:384",
                    help="NAME:DIM,...; names past --service-modalities go to the dead letters")
    ap.add_argument("--service-modalities", type=int, default=2,
                    help="how many of --modalities (the first ones) the service accepts")
    ap.add_argument("--mix", default="", help="share of each modality, e.g. 0.7,0.3")
    ap.add_argument("--malformed", type=float, default=0.0,
                    help="fraction of events sent as malformed single records")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="events per FeatureBatch record (1: single FeatureEvent records)")
    ap.add_argument("--linger-ms", type=float, default=20.0,
                    help="a partial batch is sent this long after its first event")
    ap.add_argument("--no-dead-letter", action="store_true", help="do not read the dead letters")
    ap.add_argument("--metrics-url", action="append", default=[],
                    help="a worker's /metrics URL (repeat, or comma-separate, for several)")
    ap.add_argument("--group-id", default="", help="PAIRSIEVE_GROUP_ID: lag from committed offsets")
    ap.add_argument("--drain-seconds", type=float, default=15.0,
                    help="longest wait for the service to catch up after producing")
    ap.add_argument("--idle-seconds", type=float, default=3.0,
                    help="without --metrics-url/--group-id: stop after this long with no output")
    ap.add_argument("--settle-seconds", type=float, default=1.0,
                    help="per-step decided/s and service latency leave out the step's first "
                         "seconds (the transition from the previous rate)")
    ap.add_argument("--out-dir", default="loadtest-out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-events", type=int, default=2_000_000, help="hard bound on events")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--label", default="kafka")
    a = ap.parse_args(argv)
    urls = [u for part in a.metrics_url for u in part.split(",") if u]
    return KafkaLoadConfig(
        bootstrap=a.bootstrap, topic_suffix=a.topic_suffix,
        rates=parse_floats(a.rates) if a.rates else [a.rate], duration=a.duration,
        ramp_seconds=a.ramp_seconds, modalities=a.modalities,
        service_modalities=a.service_modalities, mix=a.mix, malformed=a.malformed,
        batch_size=a.batch_size, linger_ms=a.linger_ms, read_dead_letter=not a.no_dead_letter,
        metrics_urls=urls, group_id=a.group_id, drain_seconds=a.drain_seconds,
        idle_seconds=a.idle_seconds, settle_seconds=a.settle_seconds, out_dir=a.out_dir,
        seed=a.seed, max_events=a.max_events,
        plot=not a.no_plot, label=a.label)


def main(argv=None) -> int:
    cfg = config_from_args(argv)
    try:
        result = run(cfg)
    except (RuntimeError, ValueError) as exc:
        print(f"kafka_load: {exc}", file=sys.stderr)
        return 2
    s = result["summary"]
    dec, e2e = s["decision_latency_ms"], s["e2e_latency_ms"]
    print(steps_table(result))
    print(f"produced {s['produced_events']} events ({s['produced_per_s']:.0f}/s, "
          f"{s['driver_dropped']} dropped by the driver); {s['requests']} alignment requests "
          f"(acceptance {s['acceptance'] or 0:.3f}); dead letters {s['dead_letter_events']} of "
          f"{s['dead_letter_expected_events']} expected {s['dead_letters_by_reason']}")
    print(f"decision latency ms p50 {_f(dec['p50'])} p99 {_f(dec['p99'])}; e2e p50 "
          f"{_f(e2e['p50'])} p99 {_f(e2e['p99'])}; decided {s['decided_events']}; "
          f"drained {s['drained']}; results in {cfg.out_dir}")
    return 0


def _f(x):
    return "-" if x is None else f"{x:.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
