"""``pairsieve demo``: the whole service end to end on the embedded broker.

1. start pairsieve (embedded tansu broker, faust stream processor, gRPC, metrics) in-process;
2. replay a real two-view dataset (scikit-learn's digits, top/bottom halves) as unaligned
   unimodal feature events on ``pairsieve.features.v1``, both modalities shuffled together;
3. a simulated annotator reads ``pairsieve.alignment-requests.v1`` and answers on
   ``pairsieve.alignment-labels.v1`` from the hidden ground truth (MATCH + the partner's vector);
4. labels retrain the alignment model, new versions are hot-swapped into the running stream;
5. at the end: recall@1/@5 on held-out pairs of the service's model vs the same number of pairs
   chosen at random (same learner, mean of 5 draws), acceptance per modality, throughput; a PNG.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from service.alignment import AlignmentTrainer, TrainerConfig, retrieval_recall
from service.bench.datasets import get_dataset
from service.handlers import IncomingEvent, Label
from service.runtime import start_service
from service.settings import Settings
from service.streaming.broker import LABELS_TOPIC, REQUESTS_TOPIC, FEATURES_TOPIC
from service.wire import codecs

log = logging.getLogger("pairsieve.demo")


def _say(msg: str) -> None:
    print(msg, flush=True)


async def run_demo(dataset: str = "digits", budget: int = 200, seed: int = 0,
                   out_dir: str = "reports", rate_per_s: float = 400.0, batch: int = 32) -> dict:
    ds = get_dataset(dataset, seed=seed)
    ma, mb = "image_top", "image_bottom"
    rng = np.random.default_rng(seed)
    n = len(ds.a)
    perm = rng.permutation(n)
    test, pool = perm[:400], perm[400:]
    stream = [(m, int(r)) for r in pool for m in (ma, mb)]
    order = rng.permutation(len(stream))
    stream = [stream[i] for i in order]
    ids = {(m, r): f"{m}-{r}" for m, r in stream}
    partner_of = {f"{ma}-{r}": (f"{mb}-{r}", mb, r) for r in pool}
    partner_of.update({f"{mb}-{r}": (f"{ma}-{r}", ma, r) for r in pool})
    views = {ma: ds.a, mb: ds.b}
    suffix = f".demo-{uuid.uuid4().hex[:6]}"
    settings = Settings.from_env(
        kafka_bootstrap="", modalities=f"{ma}:{ds.a.shape[1]},{mb}:{ds.b.shape[1]}",
        topic_suffix=suffix, budget_total=budget,
        target_rate=min(1.0, budget / max(1, len(stream) - budget)), warmup_accepts=50,
        embedding_dim=32, retrain_every_pairs=25, grpc_port=0, metrics_port=0,
        index_size=2048, cache_capacity=2048,
        worker_id="demo-worker", seed=seed, log_level="WARNING")
    _say(f"pairsieve demo: {dataset} ({len(pool)} pool rows -> {len(stream)} unaligned events, "
         f"{len(test)} held-out pairs), budget {budget} alignments")
    _say("starting the service on the embedded Kafka-protocol broker (tansu) ...")
    t_start = time.perf_counter()
    svc = await start_service(settings)
    _say(f"  up in {time.perf_counter() - t_start:.1f}s: kafka {svc.bootstrap}, gRPC :{svc.grpc_port}, "
         f"metrics http://127.0.0.1:{svc.metrics_port}/metrics")
    producer = AIOKafkaProducer(bootstrap_servers=svc.bootstrap, acks="all")
    await producer.start()
    annot = AIOKafkaConsumer(settings.topic(REQUESTS_TOPIC), bootstrap_servers=svc.bootstrap,
                             group_id=None, auto_offset_reset="earliest")
    await annot.start()
    labels_sent = 0
    requests_seen: list[str] = []

    async def annotator():
        nonlocal labels_sent
        async for rec in annot:
            req = codecs.pb.AlignmentRequest.FromString(rec.value)
            requests_seen.append(req.item_id)
            pid, pm, row = partner_of[req.item_id]
            label = Label(item_id=req.item_id, modality=req.modality, partner_item_id=pid,
                          status="MATCH", request_id=req.request_id, annotator="simulated",
                          partner_vector=views[pm][row])
            await producer.send_and_wait(settings.topic(LABELS_TOPIC),
                                         codecs.label_to_proto(label).SerializeToString())
            labels_sent += 1

    ann_task = asyncio.create_task(annotator())
    t0 = time.perf_counter()
    sent = 0
    last = 0.0
    for i in range(0, len(stream), batch):
        chunk = stream[i:i + batch]
        evs = [IncomingEvent(event_id=f"ev-{ids[(m, r)]}", item_id=ids[(m, r)], modality=m,
                             vector=views[m][r], event_time=time.time(), source="demo")
               for m, r in chunk]
        await producer.send_and_wait(settings.topic(FEATURES_TOPIC), codecs.encode_feature_batch(evs),
                                     key=str(i).encode(), headers=[codecs.FEATURE_HEADER_BATCH])
        sent += len(chunk)
        await asyncio.sleep(len(chunk) / rate_per_s)
        if time.perf_counter() - last > 2.0 or sent == len(stream):
            last = time.perf_counter()
            st = svc.handler.status()
            _say(f"  sent {sent:5d}/{len(stream)}  decided {st['seen']:5d}  accepted {st['spent']:4d}"
                 f"  labels {labels_sent:4d}  model v{st['model_version']}"
                 f"  ({sent / (time.perf_counter() - t0):.0f} events/s)")
    # let the stream drain and the last labels train a model
    for _ in range(300):
        st = svc.handler.status()
        if st["seen"] >= len(stream) and labels_sent >= st["spent"] \
                and svc.handler.labels_by_status["MATCH"] >= st["spent"]:
            break
        await asyncio.sleep(0.2)
    await svc.handler.wait_for_training()
    elapsed = time.perf_counter() - t0
    st = svc.handler.status()
    model = svc.handler.selector.model
    ours = retrieval_recall(model, ds.a[test], ds.b[test])
    # same learner, same pair count, random pairs (mean of 5 draws)
    k = max(st["pairs_acquired"], 1)
    rand = []
    for s in range(5):
        tr = AlignmentTrainer({ma: ds.a.shape[1], mb: ds.b.shape[1]}, TrainerConfig(dim_out=32, pca_dim=32))
        tr.fit_unpaired({ma: ds.a[pool], mb: ds.b[pool]})
        pick = np.random.default_rng(1000 + s).choice(pool, k, replace=False)
        rand.append(retrieval_recall(tr.fit(ds.a[pick], ds.b[pick]), ds.a[test], ds.b[test]))
    result = {
        "dataset": dataset, "events": len(stream), "budget": budget,
        "accepted": st["spent"], "pairs_acquired": st["pairs_acquired"],
        "model_version": st["model_version"],
        "accepted_per_modality": st["accepted_per_modality"],
        "r1": ours["r1"], "r5": ours["r5"],
        "random_r1": float(np.mean([r["r1"] for r in rand])),
        "random_r5": float(np.mean([r["r5"] for r in rand])),
        "events_per_s": len(stream) / elapsed, "dead_letters": svc.processor.dead_letters,
    }
    ann_task.cancel()
    await asyncio.gather(ann_task, return_exceptions=True)
    await annot.stop()
    await producer.stop()
    await svc.shutdown()
    _print_table(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo-result.json").write_text(json.dumps(result, indent=2))
    png = _plot(result, out / "demo.png")
    _say(f"wrote {out / 'demo-result.json'} and {png}")
    return result


def _print_table(r: dict) -> None:
    acc = r["accepted_per_modality"]
    rows = [("alignments requested (budget)", f"{r['accepted']} / {r['budget']}"),
            ("pairs acquired", f"{r['pairs_acquired']}"),
            ("model version", f"v{r['model_version']}"),
            ("R@1 held out: pairsieve", f"{r['r1']:.3f}"),
            ("R@1 held out: same budget at random", f"{r['random_r1']:.3f}"),
            ("R@5 held out: pairsieve / random", f"{r['r5']:.3f} / {r['random_r5']:.3f}"),
            ("acceptance per modality", ", ".join(f"{m} {v}" for m, v in acc.items())),
            ("throughput (replay-paced)", f"{r['events_per_s']:.0f} events/s"),
            ("dead letters", f"{r['dead_letters']}")]
    w = max(len(a) for a, _ in rows)
    _say("")
    _say("=" * (w + 20))
    for a, b in rows:
        _say(f"{a:<{w}}  {b}")
    _say("=" * (w + 20))


def _plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].bar(["pairsieve", "random"], [r["r1"], r["random_r1"]], color=["k", "0.6"])
    axes[0].set_title(f"held-out R@1 after {r['pairs_acquired']} pairs")
    acc = r["accepted_per_modality"]
    axes[1].bar(list(acc), list(acc.values()), color="0.3")
    axes[1].set_title("alignments requested per modality")
    fig.suptitle(f"pairsieve demo on {r['dataset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(**kw) -> int:
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(run_demo(**kw))
    return 0
