"""Reading a deployment's topics: ``pairsieve export-pairs`` and ``pairsieve explain``.

``export-pairs`` writes the acquired training pairs from their topic to an ``.npz`` file.

The file is in the benchmark's dataset format (:func:`service.evaluation.datasets.load_npz`
reads it: ``pairsieve simulate --data FILE`` works on it), one row per pair key (a pair labelled
again appears once, as its latest version), plus the provenance of every pair: ``item_id_a``,
``item_id_b``, ``request_id``, ``annotator``, ``cost``, ``labeled_at`` (seconds since the epoch,
NaN when unknown), ``worker_id`` and ``validation`` (True for the pairs the service holds out to
measure its models; train elsewhere on the others to compare like with like).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np

from service.alignment.quality_gate import is_validation
from service.messages import TrainingPair
from service.streaming.security import PLAINTEXT, KafkaSecurity
from service.wire import codecs

__all__ = ["read_topic", "read_pairs", "write_pairs", "explain"]

T = TypeVar("T")


def read_topic(bootstrap: str, topic: str, decode: Callable[[bytes], T], *,
               timeout_s: float = 60.0, progress: Callable[[str], None] | None = None,
               security: KafkaSecurity = PLAINTEXT) -> Iterator[T]:
    """Every record of ``topic`` (all partitions, from the start, to its end), decoded.

    Raises
    ------
    ValueError
        The topic does not exist, or a record ``decode`` refuses (the message names its
        partition and offset).
    TimeoutError
        The topic could not be read to its end within ``timeout_s``.
    """
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                      auto_offset_reset="earliest", request_timeout_ms=30_000,
                      client_id="pairsieve-reader", **security.kafka_python())
    try:
        deadline = time.monotonic() + timeout_s
        parts = c.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = c.partitions_for_topic(topic)
        if not parts:
            raise ValueError(f"topic {topic!r} does not exist at {bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        read = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic!r}: not read to its end within {timeout_s}s "
                                   f"({read} records so far)")
            batch = c.poll(timeout_ms=1000, max_records=5000)
            if not batch:  # a poll that found nothing more: the end
                break
            for tp, records in batch.items():
                for rec in records:
                    try:
                        yield decode(rec.value)
                    except Exception as exc:
                        raise ValueError(f"{topic!r} partition {tp.partition} offset "
                                         f"{rec.offset}: {exc}") from None
                    read += 1
            if progress is not None:
                progress(f"read {read} records")
    finally:
        c.close()


def read_pairs(bootstrap: str, topic: str, dims: Mapping[str, int], *, timeout_s: float = 60.0,
               progress: Callable[[str], None] | None = None,
               security: KafkaSecurity = PLAINTEXT) -> dict[tuple[str, str], TrainingPair]:
    """The latest pair per key on the training-pairs ``topic`` (read to its end), partnerless
    records (NO_MATCH answers) included: filter on ``TrainingPair.partnerless``.

    ``dims``: the service's modalities and dimensions, in order; a record of other shapes raises
    ``ValueError`` naming its offset (see :func:`read_topic`).
    """
    pairs: dict[tuple[str, str], TrainingPair] = {}

    def decode(value: bytes) -> TrainingPair:
        return codecs.pair_from_proto(codecs.pb.TrainingPair.FromString(value), dims)

    for p in read_topic(bootstrap, topic, decode, timeout_s=timeout_s, progress=progress,
                        security=security):
        pairs[p.key] = p
    return pairs


def write_pairs(pairs: Mapping[tuple[str, str], TrainingPair], path: str | Path,
                modalities: tuple[str, str], validation_share: float) -> Path:
    """Write the pairs (see the module docstring) and return the path.

    Raises
    ------
    ValueError
        No pairs (an empty dataset is not a file anyone can train on).
    """
    rows = sorted((p for p in pairs.values() if not p.partnerless),
                  key=lambda p: (p.labeled_at or 0.0, p.key))
    if not rows:
        raise ValueError("no training pairs to export (nothing acquired yet?)")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        a=np.stack([p.vector_a for p in rows]).astype(np.float32),
        b=np.stack([p.vector_b for p in rows]).astype(np.float32),
        ids=np.array([codecs.pair_key_bytes(p.key).decode() for p in rows]),
        modality_a=np.array(modalities[0]), modality_b=np.array(modalities[1]),
        item_id_a=np.array([p.item_id_a for p in rows]),
        item_id_b=np.array([p.item_id_b for p in rows]),
        request_id=np.array([p.request_id for p in rows]),
        annotator=np.array([p.annotator for p in rows]),
        cost=np.array([p.cost for p in rows], dtype=np.float64),
        labeled_at=np.array([np.nan if p.labeled_at is None else p.labeled_at for p in rows]),
        worker_id=np.array([p.worker_id for p in rows]),
        validation=np.array([is_validation(p.key, validation_share) for p in rows], dtype=bool))
    return out


def explain(bootstrap: str, decisions_topic: str, pairs_topic: str, dims: Mapping[str, int],
            key: str, *, timeout_s: float = 120.0,
            security: KafkaSecurity = PLAINTEXT) -> list[str]:
    """What pairsieve decided about an event or item id, and why: lines for a terminal.

    Every decision-log record whose event id or item id is ``key`` (oldest first: a redelivery
    answered as a duplicate is not logged again, a batch decided afresh after a failed publish
    is, and so is a selection whose worker stopped before logging it, when its event comes
    again), with its reason, utility against the threshold, score components, model version and
    worker; then the training pair the item is part of, if any.
    """
    found = []
    for outcomes, at in read_topic(
            bootstrap, decisions_topic,
            lambda v: codecs.decision_records_from_proto(codecs.pb.DecisionRecord.FromString(v)),
            timeout_s=timeout_s, security=security):
        found += [(o, at) for o in outcomes if o.event_id == key or o.decision.item_id == key]
    lines = []
    for outcome, at in found:
        d = outcome.decision
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)) if at else "?"
        verdict, why = str(d.reason).split(":", 1) if ":" in str(d.reason) else (d.reason, "")
        lines += [
            f"event {outcome.event_id!r} (item {d.item_id!r}, {d.modality}): {verdict.upper()} "
            f"({why}) at {when} by worker {outcome.worker_id!r}, model version {d.model_version}",
            f"  utility {d.utility:.4f} vs threshold {d.threshold:.4f}; components: uncertainty "
            f"{d.uncertainty:.4f}, diversity {d.diversity:.4f}, typicality {d.typicality:.4f}, "
            f"coverage bonus {d.coverage_bonus:.4f} (margin {d.margin:.4f}, entropy "
            f"{d.entropy:.4f}, least confidence {d.least_confidence:.4f})"]
    items = {o.decision.item_id for o, _ in found} | {key}
    for p in read_pairs(bootstrap, pairs_topic, dims, timeout_s=timeout_s,
                        security=security).values():
        if p.labeled_item_id in items and p.partnerless:
            lines.append(f"{p.labeled_item_id!r} answered NO_MATCH (request {p.request_id!r}, "
                         f"annotator {p.annotator!r}): items like it lose utility")
        elif p.item_id_a in items or p.item_id_b in items:
            lines.append(f"pair ({p.item_id_a!r}, {p.item_id_b!r}) acquired: request "
                         f"{p.request_id!r}, annotator {p.annotator!r}, cost {p.cost:g}")
    if not lines:
        lines.append(f"{key!r}: no decision and no pair with this event or item id (the decision "
                     "log keeps 7 days; PAIRSIEVE_DECISION_LOG=0 turns it off)")
    return lines
