"""Start-up at scale: how long a worker needs to serve with a long history on the topics.

A worker replays three topics before it decides anything (the selections, for the budget spent,
the diversity caches and the decided ids; the training pairs; the newest model version) and
serves only when all three were read to their end. This script fills them as a long-running
deployment would have, then starts real ``pairsieve serve`` processes and times them::

    .venv/bin/python loadtests/startup.py --selections 100000 --pairs 10000 \\
        --modalities image:512,text:384 --restarts 3 --out reports/startup.md

* ``--selections`` ``AlignmentRequest`` records on the requests topic (spread over its
  partitions, half per modality), ``--pairs`` ``TrainingPair`` records and one ``ModelVersion``;
* each restart spawns a worker (same group), waits for its "serving" log line and stops it with
  SIGTERM; the time from spawn to serving is reported (median, min-max), with the replay time the
  worker logs itself ("state replayed in ...") and its ``GetStatus`` afterwards, which must show
  the whole history: ``budget_spent`` = selections, ``pairs_acquired`` = pairs, the model
  version published. A worker that served with less is reported as a failure (exit 1).

It starts the embedded tansu broker unless ``--bootstrap`` is given. Target (issue "learning
loop"): serving within 30 s with 100k selections and 10k pairs.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from service.alignment import AlignmentModel
from service.core.types import Decision
from service.messages import (
    AlignmentRequestOut,
    ModelRelease,
    Outcome,
    TrainingPair,
)
from service.settings import Settings, parse_modalities
from service.streaming.broker import bootstrap_or_embedded
from service.streaming.topics import (
    BUDGET_LEDGER_TOPIC,
    DECISIONS_TOPIC,
    MODELS_TOPIC,
    REQUESTS_TOPIC,
    TRAINING_PAIRS_TOPIC,
    create_topics,
    topic_configs,
    topic_specs,
)
from service.wire import codecs

ROOT = Path(__file__).resolve().parents[1]
_SERVING = re.compile(r"pairsieve serving: gRPC :(\d+)")
_REPLAYED = re.compile(r"state replayed in ([\d.]+)s")


def _decision(item_id: str, modality: str, accept: bool) -> Decision:
    """A plausible decision of the history (its scores do not matter to a replay)."""
    return Decision(item_id=item_id, modality=modality, accept=accept,
                    utility=0.5 if accept else 0.1, uncertainty=0.1, diversity=0.2,
                    coverage_bonus=0.0, margin=0.0, entropy=0.0, least_confidence=0.0,
                    threshold=0.4, model_version=1,
                    reason="accept:utility" if accept else "skip:below_threshold")


def fill(bootstrap: str, suffix: str, dims: dict[str, int], selections: int, pairs: int,
         partitions: int, seed: int, say=print, decisions: int = 0,
         embedding_dim: int = 128) -> int:
    """Produce the history (``decisions`` skip records on the decision log besides the
    selections and their budget-ledger reservations; a model version of an ``embedding_dim``-d
    shared space); returns the model version published."""
    from kafka import KafkaProducer

    rng = np.random.default_rng(seed)
    mods = list(dims)
    prod = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20,
                         batch_size=1 << 20, max_request_size=16 << 20)
    t0 = time.perf_counter()
    vecs = {m: rng.normal(size=(1024, d)).astype(np.float32) for m, d in dims.items()}
    for i in range(selections):
        m = mods[i % 2]
        dec = _decision(f"item-{i}", m, accept=True)
        req = AlignmentRequestOut(request_id=f"ev-{i}", item_id=f"item-{i}", modality=m,
                                  vector=vecs[m][i % 1024], candidates=[],
                                  outcome=Outcome(f"ev-{i}", dec, False, "history"),
                                  requested_at=time.time())
        prod.send(REQUESTS_TOPIC + suffix, codecs.request_to_proto(req).SerializeToString(),
                  key=req.item_id.encode(), partition=i % partitions)
        if (i + 1) % 20000 == 0:
            say(f"  {i + 1} selections produced ({time.perf_counter() - t0:.0f}s)")
    # ... and their units on the budget ledger, as the workers that made them reserved them
    # (README, Scale-out), in reservations of a micro-batch's size
    for lo in range(0, selections, 256):
        ids = [f"ev-{i}" for i in range(lo, min(lo + 256, selections))]
        prod.send(BUDGET_LEDGER_TOPIC + suffix,
                  codecs.reservation_bytes(f"history:{lo}", "history", "history", ids,
                                           time.time()))
    for n, lo in enumerate(range(0, decisions, 256)):  # as a worker writes them: a record a batch
        batch = [Outcome(f"sk-{i}", _decision(f"skipped-{i}", mods[i % 2], accept=False), False,
                         "history") for i in range(lo, min(lo + 256, decisions))]
        for rec in codecs.decision_records_to_proto(batch, time.time()):
            prod.send(DECISIONS_TOPIC + suffix, rec.SerializeToString(), partition=n % partitions)
        if (lo + 256) % 102400 == 0:
            say(f"  {lo + 256} decisions produced ({time.perf_counter() - t0:.0f}s)")
    a, b = mods
    for j in range(pairs):
        p = TrainingPair(f"item-{2 * j}", f"partner-{j}", vecs[a][j % 1024], vecs[b][j % 1024],
                         request_id=f"ev-{2 * j}", labeled_at=time.time(), worker_id="history",
                         labeled_item_id=f"item-{2 * j}")
        prod.send(TRAINING_PAIRS_TOPIC + suffix,
                  codecs.pair_to_proto(p, mods).SerializeToString(),
                  key=codecs.pair_key_bytes(p.key))
    model = AlignmentModel(dims, embedding_dim, version=7, blocks=2)
    model.n_pairs = pairs
    prod.send(MODELS_TOPIC + suffix, codecs.model_release_to_proto(ModelRelease(
        model, pairs, 0, {}, "history", time.time())).SerializeToString(), key=codecs.MODEL_KEY)
    prod.flush()
    prod.close()
    say(f"  history produced in {time.perf_counter() - t0:.0f}s")
    return model.version


def restart_once(bootstrap: str, suffix: str, modalities: str, partitions: int, group: str,
                 log_path: Path, timeout_s: float) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PAIRSIEVE_KAFKA_BOOTSTRAP": bootstrap,
           "PAIRSIEVE_TOPIC_SUFFIX": suffix, "PAIRSIEVE_MODALITIES": modalities,
           "PAIRSIEVE_FEATURES_PARTITIONS": str(partitions), "PAIRSIEVE_GROUP_ID": group,
           "PAIRSIEVE_WORKER_ID": "startup", "PAIRSIEVE_GRPC_PORT": "0",
           "PAIRSIEVE_GRPC_HOST": "127.0.0.1", "PAIRSIEVE_METRICS_PORT": "0",
           "PAIRSIEVE_METRICS_HOST": "127.0.0.1", "PAIRSIEVE_DEVICE": "cpu",
           "PAIRSIEVE_LOG_LEVEL": "INFO", "PAIRSIEVE_CACHE_CAPACITY": "4096",
           "PAIRSIEVE_EMBEDDING_DIM": "128"}
    t0 = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        port = None
        while time.perf_counter() - t0 < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited {proc.returncode}:\n"
                                   f"{log_path.read_text()[-3000:]}")
            m = _SERVING.search(log_path.read_text(errors="replace"))
            if m:
                port = int(m.group(1))
                break
            time.sleep(0.05)
        served = time.perf_counter() - t0
        if port is None:
            raise TimeoutError(f"not serving after {timeout_s}s:\n{log_path.read_text()[-3000:]}")
        import grpc

        from service.wire.gen.pairsieve.v1 import pairsieve_pb2_grpc as pb_grpc
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            st = pb_grpc.SelectorStub(ch).GetStatus(codecs.pb.GetStatusRequest(), timeout=10)
        replay = _REPLAYED.search(log_path.read_text(errors="replace"))
        return {"serving_s": served, "replay_s": float(replay.group(1)) if replay else None,
                "spent": int(st.budget_spent), "pairs": int(st.pairs_acquired),
                "model_version": int(st.model_version)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", help="a running broker (default: start the embedded tansu)")
    ap.add_argument("--selections", type=int, default=100_000)
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--decisions", type=int, default=0,
                    help="skip decisions on the decision log, in records of 256 as a worker "
                         "writes them (it replays the last PAIRSIEVE_DECISION_REPLAY records "
                         "per partition)")
    ap.add_argument("--modalities", default="image:512,text:384")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="reports/startup.md")
    a = ap.parse_args(argv)
    dims = parse_modalities(a.modalities)
    suffix = "." + uuid.uuid4().hex[:8]
    with bootstrap_or_embedded(a.bootstrap) as bootstrap:
        specs = {t + suffix: n for t, n in topic_specs(a.partitions).items()}
        configs = {t + suffix: c for t, c in topic_configs().items()}
        create_topics(bootstrap, specs, configs=configs)
        print(f"filling {a.selections} selections, {a.decisions} skip decisions and {a.pairs} "
              f"pairs ({a.modalities}) ...", flush=True)
        version = fill(bootstrap, suffix, dims, a.selections, a.pairs, a.partitions, a.seed,
                       say=lambda m: print(m, flush=True), decisions=a.decisions)
        runs = []
        group = "startup-" + uuid.uuid4().hex[:6]
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(a.restarts):
                res = restart_once(bootstrap, suffix, a.modalities, a.partitions, group,
                                   Path(tmp) / f"worker-{r}.log", a.timeout)
                runs.append(res)
                print(f"restart {r + 1}: serving after {res['serving_s']:.1f}s (replay "
                      f"{res['replay_s']}s), spent {res['spent']}, pairs {res['pairs']}, model "
                      f"v{res['model_version']}", flush=True)
    complete = all(r["spent"] == a.selections and r["pairs"] == a.pairs
                   and r["model_version"] == version for r in runs)
    serving = [r["serving_s"] for r in runs]
    replay = [r["replay_s"] for r in runs if r["replay_s"] is not None]
    lines = [
        "# Start-up at scale",
        "",
        f"Generated by `.venv/bin/python loadtests/startup.py {' '.join(argv or sys.argv[1:])}`"
        f" on {platform.node()} ({os.cpu_count()} cores, {platform.machine()}, "
        f"{a.bootstrap or 'embedded tansu'}).",
        "",
        f"History on the topics: {a.selections} selections (requests topic, {a.partitions} "
        f"partitions), {a.decisions} skip decisions on the decision log (records of 256, as a "
        f"worker writes them; it replays at most the last {Settings().decision_replay:,} records "
        f"per partition), {a.pairs} training pairs, 1 model version; "
        f"modalities {a.modalities}.",
        "",
        "| restart | spawn -> serving (s) | replay (s) | budget spent | pairs | model |",
        "|---:|---:|---:|---:|---:|---:|",
        *[f"| {i + 1} | {r['serving_s']:.1f} | {r['replay_s']} | {r['spent']} | {r['pairs']} | "
          f"v{r['model_version']} |" for i, r in enumerate(runs)],
        "",
        f"Median spawn -> serving **{statistics.median(serving):.1f} s** (min {min(serving):.1f}, "
        f"max {max(serving):.1f}); median replay {statistics.median(replay):.1f} s"
        if replay else f"Median spawn -> serving **{statistics.median(serving):.1f} s**",
        "",
        f"State complete before serving on every restart: **{'yes' if complete else 'NO'}** "
        "(budget spent = selections, pairs acquired = pairs, newest model version).",
        "",
    ]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines))
    print(f"wrote {a.out}")
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
