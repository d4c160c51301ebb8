"""``pairsieve demo``: the whole service end to end on the embedded broker.

1. start pairsieve (embedded tansu broker, faust stream processor, gRPC, metrics) in-process;
2. replay a real two-view dataset (default ``bible-en-es``: New Testament verses embedded by two
   different pretrained encoders, English MiniLM and Spanish e5; 3,000 seeded rows) as unaligned
   unimodal feature events on ``pairsieve.features.v1``, both modalities shuffled together, in
   lock step: each batch is decided, answered and any retrain it caused swapped in before the
   next is sent, so the same seed gives the same decisions, curve and figures;
3. a simulated annotator reads ``pairsieve.alignment-requests.v1`` and answers on
   ``pairsieve.alignment-labels.v1`` from the hidden ground truth (MATCH + the partner's vector);
4. labels retrain the alignment model, new versions are hot-swapped into the running stream;
5. after each model swap the service's model is scored (R@1/@5 among the held-out pairs); at the
   end the same learner is trained on random picks from the same stream prefix at the same pair
   counts (knowing, as unpaired data, only the events seen by then; mean of 3 draws), and so is
   issue 13's plain two-map ridge baseline (what a user gets without pairsieve, on the same random
   pairs); the three learning curves are printed and drawn (``demo.png``) with acceptance
   per modality, and the end-to-end saving: how many fewer pairs the service needed to reach the
   R@1 the baseline reaches with all of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from service.alignment import AlignmentTrainer, TrainerConfig, retrieval_recall
from service.evaluation.curves import first_crossing
from service.evaluation.datasets import get_dataset
from service.evaluation.ridge_baseline import RidgeBaseline, recall_from_scores
from service.learning_loop import DEFAULT_RETRAIN_EVERY
from service.messages import IncomingEvent, Label
from service.runtime import start_service
from service.settings import Settings
from service.streaming.topics import FEATURES_TOPIC, LABELS_TOPIC, REQUESTS_TOPIC
from service.wire import codecs

log = logging.getLogger("pairsieve.demo")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _demo_rows(ds, seed: int, max_rows: int, test_size: int):
    """Seeded split of (at most ``max_rows``) rows into held-out test pairs and the pool."""
    rng = np.random.default_rng(seed)
    rows = rng.permutation(ds.n)[:max_rows]
    test, pool = rows[:test_size], np.sort(rows[test_size:])
    return rng, test, pool


def random_curve(ds, stream, test, points, dim: int, seed: int, draws: int = 3,
                 progress: Callable[[str], None] | None = None) -> list[dict]:
    """Held-out recall of random selection on the same stream, at the service's curve points.

    At a point where the service had seen ``seen`` events and held ``pairs`` pairs, the random
    arm picks ``pairs`` items uniformly among those same first ``seen`` events (their rows are the
    pairs: an answer reveals the partner) and its learner knows, as unpaired data, exactly those
    events: what the service knew. Comparing against a learner that saw the whole pool up front
    would flatter the random arm (self-learning feeds on unpaired items).

    Parameters
    ----------
    ds : Dataset
    stream : sequence of (modality, row)
        The events in the order the service got them.
    test : ndarray of int, shape (n_test,)
        Held-out rows.
    points : sequence of (seen, pairs)
        Events seen and pairs held at each of the service's curve points.
    dim : int
        The service's embedding size (its ``TrainerConfig(dim_out=dim)``).
    seed : int
        Draw ``j`` gives every event a priority from ``np.random.default_rng([seed, 7, j])`` and
        picks the lowest-priority events of the prefix, so a draw's picks are consistent along the
        stream.
    draws : int
        Independent random draws averaged at each point.
    progress : callable(str), optional
        Called with a line after each point (a point costs a few seconds with self-learning).

    Returns
    -------
    list of dict
        ``{"pairs", "seen", "r1", "r5", "baseline_r1", "baseline_r5"}`` per point (means over
        the draws): the service's learner and the plain ridge baseline
        (:class:`~service.evaluation.ridge_baseline.RidgeBaseline`) on the same random pairs.
    """
    ma, mb = ds.modality_a, ds.modality_b
    views = {ma: ds.a, mb: ds.b}
    priorities = [np.random.default_rng([seed, 7, j]).random(len(stream)) for j in range(draws)]
    out = []
    for seen, k in points:
        prefix = stream[:seen]
        recs, base = [], []
        for prio in priorities:
            tr = AlignmentTrainer({ma: ds.a.shape[1], mb: ds.b.shape[1]},
                                  TrainerConfig(dim_out=dim), seed=seed)
            unpaired = {m: np.stack([views[m][r] for mm, r in prefix if mm == m] or
                                    [np.zeros(views[m].shape[1])] * 2) for m in (ma, mb)}
            tr.fit_unpaired(unpaired)
            rows: dict[int, None] = {}  # the first k distinct rows in priority order
            for i in np.argsort(prio[:seen], kind="stable"):
                if len(rows) == k:
                    break
                rows.setdefault(prefix[i][1])
            pick = np.array(list(rows), dtype=np.int64)
            model = tr.fit(ds.a[pick], ds.b[pick]) if len(pick) else tr.cold_model()
            recs.append(retrieval_recall(model, ds.a[test], ds.b[test]))
            # fewer than 2 pairs: no baseline map; it ranks at chance like the cold model
            base.append(recall_from_scores(RidgeBaseline(ds.a[pick], ds.b[pick]).scores(
                ds.a[test], ds.b[test])) if len(pick) >= 2 else recs[-1])
        out.append({"pairs": int(k), "seen": int(seen),
                    "r1": float(np.mean([r["r1"] for r in recs])),
                    "r5": float(np.mean([r["r5"] for r in recs])),
                    "baseline_r1": float(np.mean([r["r1"] for r in base])),
                    "baseline_r5": float(np.mean([r["r5"] for r in base]))})
        if progress is not None:
            progress(f"  {k:4d} random pairs among the first {seen:5d} events: R@1 "
                     f"{out[-1]['r1']:.3f} (learner), {out[-1]['baseline_r1']:.3f} (baseline)")
    return out


def end_to_end_saving(curve: list[dict], baseline_curve: list[dict]) -> dict:
    """Pairs the service needed to reach the R@1 the baseline reaches at its last point.

    Parameters
    ----------
    curve : list of dict
        The service's ``{"pairs", "r1"}`` points.
    baseline_curve : list of dict
        The baseline's points (``baseline_r1`` at the same pair counts).

    Returns
    -------
    dict
        ``target_r1``, ``pairs_needed`` (interpolated; None if never reached) and ``saved``
        (``1 - pairs_needed / last pair count``; None if never reached).
    """
    target = float(baseline_curve[-1]["baseline_r1"])
    x = np.array([p["pairs"] for p in curve], dtype=float)
    y = np.array([p["r1"] for p in curve], dtype=float)
    need = first_crossing(x, y, target)
    if not np.isfinite(need) or x[-1] <= 0:
        return {"target_r1": target, "pairs_needed": None, "saved": None}
    return {"target_r1": target, "pairs_needed": round(need, 1),
            "saved": round(1.0 - need / float(baseline_curve[-1]["pairs"]), 4)}


async def _wait_for(cond: Callable[..., bool], what: Callable[..., str],
                    timeout_s: float = 60.0) -> None:
    """Poll ``cond()`` every 2 ms until it holds; TimeoutError naming ``what()`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: service did not settle in {timeout_s:.0f}s: {what()}")
        await asyncio.sleep(0.002)


async def run_demo(dataset: str = "bible-en-es", budget: int = 200, seed: int = 0,
                   out_dir: str = "reports", max_rows: int = 3000, test_size: int = 400,
                   batch: int = 32, embedding_dim: int = TrainerConfig().dim_out) -> dict:
    """Replay ``dataset`` through the running service in lock step; see the module docstring.

    Returns
    -------
    dict
        Final figures, the service's learning curve (``curve``) and the random one measured at
        the same pair counts (``random_curve``); also written to ``OUT_DIR/demo-result.json``.
    """
    ds = get_dataset(dataset, seed=seed)
    ma, mb = ds.modality_a, ds.modality_b
    rng, test, pool = _demo_rows(ds, seed, max_rows, test_size)
    stream = [(m, int(r)) for r in pool for m in (ma, mb)]
    order = rng.permutation(len(stream))
    stream = [stream[i] for i in order]
    ids = {(m, r): (ds.ids[r] if ds.ids is not None else str(r)) + f"/{m}" for m, r in stream}
    partner_of = {ids[(ma, r)]: (ids[(mb, r)], mb, r) for r in pool}
    partner_of.update({ids[(mb, r)]: (ids[(ma, r)], ma, r) for r in pool})
    views = {ma: ds.a, mb: ds.b}
    suffix = f".demo-{uuid.uuid4().hex[:6]}"
    settings = Settings.from_env(
        kafka_bootstrap="", modalities=f"{ma}:{ds.a.shape[1]},{mb}:{ds.b.shape[1]}",
        topic_suffix=suffix, budget_total=budget,
        target_rate=min(1.0, budget / max(1, len(stream) - budget)), warmup_accepts=50,
        embedding_dim=embedding_dim, retrain_every_pairs=DEFAULT_RETRAIN_EVERY, grpc_port=0,
        metrics_port=0,
        index_size=2048, cache_capacity=2048,
        # the demo measures both arms on its own held-out test pairs; the service's validation
        # holdout would train pairsieve's arm on 10 % fewer pairs than the random arm's
        validation_share=0.0,
        worker_id="demo-worker", seed=seed, log_level="WARNING")
    _say(f"pairsieve demo: {dataset} ({len(pool)} pool rows -> {len(stream)} unaligned events, "
         f"{len(test)} held-out pairs), budget {budget} alignments")
    _say("starting the service on the embedded Kafka-protocol broker (tansu) ...")
    t_start = time.perf_counter()
    svc = await start_service(settings)
    _say(f"  up in {time.perf_counter() - t_start:.1f}s: kafka {svc.bootstrap}, "
         f"gRPC :{svc.grpc_port}, "
         f"metrics http://127.0.0.1:{svc.metrics_port}/metrics")
    producer = AIOKafkaProducer(bootstrap_servers=svc.bootstrap, acks="all")
    await producer.start()
    annot = AIOKafkaConsumer(settings.topic(REQUESTS_TOPIC), bootstrap_servers=svc.bootstrap,
                             group_id=None, auto_offset_reset="earliest")
    await annot.start()
    labels_sent = 0
    requested: list[codecs.pb.AlignmentRequest] = []

    async def annotator():  # collects requests; the replay loop answers them in lock step
        async for rec in annot:
            requested.append(codecs.pb.AlignmentRequest.FromString(rec.value))

    position = {ids[key]: i for i, key in enumerate(stream)}

    async def answer_new_requests() -> None:
        """Answer this batch's requests one at a time in stream order (the requests topic has
        several partitions, so arrival order varies), each label taken in and any retrain it
        triggers swapped in before the next: the pair count each model version is trained on,
        and so every later decision, does not depend on timing."""
        nonlocal labels_sent
        spent = svc.handler.status().spent
        await _wait_for(lambda: len(requested) >= spent,
                        lambda: f"{len(requested)} of {spent} requests seen")
        for req in sorted(requested[labels_sent:], key=lambda q: position[q.item_id]):
            pid, pm, row = partner_of[req.item_id]
            label = Label(item_id=req.item_id, modality=req.modality, partner_item_id=pid,
                          status="MATCH", request_id=req.request_id, annotator="simulated",
                          partner_vector=views[pm][row])
            await producer.send_and_wait(settings.topic(LABELS_TOPIC),
                                         codecs.label_to_proto(label).SerializeToString())
            labels_sent += 1
            await _wait_for(
                lambda n=labels_sent: sum(svc.handler.status().labels.values()) >= n,
                lambda n=labels_sent: f"{n} labels sent, fewer taken in")
            await svc.handler.settle()

    ann_task = asyncio.create_task(annotator())
    t0 = time.perf_counter()
    sent = 0
    last = 0.0
    curve = [{"pairs": 0, "version": 0, "seen": 0,
              **retrieval_recall(svc.handler.model, ds.a[test], ds.b[test])}]
    try:
        for i in range(0, len(stream), batch):
            chunk = stream[i:i + batch]
            evs = [IncomingEvent(event_id=f"ev-{ids[(m, r)]}", item_id=ids[(m, r)], modality=m,
                                 vector=views[m][r], event_time=time.time(), source="demo")
                   for m, r in chunk]
            await producer.send_and_wait(settings.topic(FEATURES_TOPIC),
                                         codecs.encode_feature_batch(evs), key=str(i).encode(),
                                         headers=[codecs.FEATURE_HEADER_BATCH])
            sent += len(chunk)
            await _wait_for(lambda n=sent: svc.handler.status().seen >= n,
                            lambda n=sent: f"{svc.handler.status().seen} of {n} events decided")
            await svc.handler.settle()  # the batch's publish + commit are done
            await answer_new_requests()
            st = svc.handler.status()
            if st.model_version != curve[-1]["version"]:
                rec = retrieval_recall(svc.handler.model, ds.a[test], ds.b[test])
                curve.append({"pairs": st.pairs_acquired, "version": st.model_version,
                              "seen": st.seen, **rec})
            if time.perf_counter() - last > 2.0 or sent == len(stream):
                last = time.perf_counter()
                _say(f"  sent {sent:5d}/{len(stream)}  decided {st.seen:5d}  accepted "
                     f"{st.spent:4d}  pairs {st.pairs_acquired:4d}  model "
                     f"v{st.model_version}  R@1 {curve[-1]['r1']:.3f}")
            if st.spent >= budget:
                _say(f"  budget spent after {sent} of {len(stream)} events")
                break
    finally:
        ann_task.cancel()
        await asyncio.gather(ann_task, return_exceptions=True)
    elapsed = time.perf_counter() - t0
    st = svc.handler.status()
    model = svc.handler.model
    ours = retrieval_recall(model, ds.a[test], ds.b[test])
    if curve[-1]["version"] != st.model_version:
        curve.append({"pairs": st.pairs_acquired, "version": st.model_version,
                      "seen": st.seen, **ours})
    dead_letters = svc.processor.dead_letters
    await annot.stop()
    await producer.stop()
    await svc.shutdown()  # before the reference curves: they are CPU-bound (the loop would stall)
    _say("measuring the same learner and the plain ridge baseline on random picks from the same "
         "stream prefixes ...")
    rand = random_curve(ds, stream, test, [(p["seen"], p["pairs"]) for p in curve],
                        embedding_dim, seed, progress=_say)
    result = {
        "dataset": dataset, "seed": seed, "events": sent, "test_pairs": int(len(test)),
        "budget": budget,
        "accepted": st.spent, "pairs_acquired": st.pairs_acquired,
        "model_version": st.model_version,
        "accepted_per_modality": dict(st.accepted_per_modality),
        "r1": ours["r1"], "r5": ours["r5"],
        "random_r1": rand[-1]["r1"], "random_r5": rand[-1]["r5"],
        "baseline_r1": rand[-1]["baseline_r1"],
        "end_to_end": end_to_end_saving(curve, rand),
        "curve": curve, "random_curve": rand,
        "requested": sorted((q.item_id for q in requested), key=position.__getitem__),
        "events_per_s": sent / elapsed, "dead_letters": dead_letters,
    }
    _print_curve(result)
    _print_table(result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo-result.json").write_text(json.dumps(result, indent=2))
    png = _plot(result, out / "demo.png")
    _say(f"wrote {out / 'demo-result.json'} and {png}")
    return result


def _print_curve(r: dict) -> None:
    _say("")
    _say(f"learning curve: held-out R@1 among {r['test_pairs']} test pairs")
    _say("(random: the same learner on random picks from the same stream prefix; baseline: those "
         "random pairs + two plain ridge maps, what you get without pairsieve)")
    _say(f"{'pairs':>6}  {'pairsieve':>9}  {'random':>7}  {'baseline':>8}  "
         "bar (# pairsieve, . baseline)")
    for p, q in zip(r["curve"], r["random_curve"], strict=True):
        bar_p, bar_q = int(round(p["r1"] * 40)), int(round(q["baseline_r1"] * 40))
        bar = "".join("#" if i < bar_p else ("." if i < bar_q else " ")
                      for i in range(max(bar_p, bar_q)))
        _say(f"{p['pairs']:>6}  {p['r1']:>9.3f}  {q['r1']:>7.3f}  {q['baseline_r1']:>8.3f}  "
             f"{bar}")


def _print_table(r: dict) -> None:
    acc = r["accepted_per_modality"]
    rows = [("alignments requested (budget)", f"{r['accepted']} / {r['budget']}"),
            ("pairs acquired", f"{r['pairs_acquired']}"),
            ("model version", f"v{r['model_version']}"),
            ("R@1 held out: pairsieve", f"{r['r1']:.3f}"),
            ("R@1 held out: same budget at random", f"{r['random_r1']:.3f}"),
            ("R@1 held out: plain ridge baseline, random pairs", f"{r['baseline_r1']:.3f}"),
            ("pairs pairsieve needed for the baseline's R@1", _saving_text(r)),
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


def _saving_text(r: dict) -> str:
    e2e = r["end_to_end"]
    if e2e["pairs_needed"] is None:
        return f"not reached ({e2e['target_r1']:.3f})"
    return (f"{e2e['pairs_needed']:.0f} of {r['random_curve'][-1]['pairs']} "
            f"({100 * e2e['saved']:.0f} % fewer)")


def _plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    axes[0].plot([p["pairs"] for p in r["curve"]], [p["r1"] for p in r["curve"]], "k-o", ms=3,
                 label="pairsieve (running service)")
    axes[0].plot([p["pairs"] for p in r["random_curve"]], [p["r1"] for p in r["random_curve"]],
                 "-s", color="0.6", ms=3,
                 label="same learner, random picks from the same stream (mean of 3)")
    axes[0].plot([p["pairs"] for p in r["random_curve"]],
                 [p["baseline_r1"] for p in r["random_curve"]], ":^", color="tab:red", ms=3,
                 label="plain ridge baseline, random pairs (mean of 3)")
    axes[0].set_xlabel("pairs acquired")
    axes[0].set_ylabel("held-out R@1")
    axes[0].set_title("learning curve")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    acc = r["accepted_per_modality"]
    axes[1].bar(list(acc), list(acc.values()), color="0.3")
    axes[1].set_title("alignments requested per modality")
    fig.suptitle(f"pairsieve demo on {r['dataset']} (seed {r['seed']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(**kw) -> int:
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(run_demo(**kw))
    return 0
