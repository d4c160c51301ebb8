"""``pairsieve export-pairs``: the acquired training pairs from their topic to an ``.npz`` file.

The file is in the benchmark's dataset format (:func:`service.evaluation.datasets.load_npz`
reads it: ``pairsieve simulate --data FILE`` works on it), one row per pair key (a pair labelled
again appears once, as its latest version), plus the provenance of every pair: ``item_id_a``,
``item_id_b``, ``request_id``, ``annotator``, ``cost``, ``labeled_at`` (seconds since the epoch,
NaN when unknown), ``worker_id`` and ``validation`` (True for the pairs the service holds out to
measure its models; train elsewhere on the others to compare like with like).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from service.alignment.quality_gate import is_validation
from service.messages import TrainingPair
from service.wire import codecs

__all__ = ["read_pairs", "write_pairs"]


def read_pairs(bootstrap: str, topic: str, dims: Mapping[str, int], *, timeout_s: float = 60.0,
               progress: Callable[[str], None] | None = None
               ) -> dict[tuple[str, str], TrainingPair]:
    """Read ``topic`` from the start to its end; the latest pair per key.

    Parameters
    ----------
    bootstrap, topic : str
    dims : Mapping[str, int]
        The service's modalities and dimensions, in order (records of other shapes are refused).
    timeout_s : float
        Longest the whole read may take.
    progress : callable(str) or None

    Raises
    ------
    ValueError
        A record that is not a training pair of these modalities (the message names its offset).
    TimeoutError
        The topic could not be read to its end within ``timeout_s``.
    """
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                      auto_offset_reset="earliest", request_timeout_ms=30_000,
                      client_id="pairsieve-export")
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
        pairs: dict[tuple[str, str], TrainingPair] = {}
        read = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic!r}: not read to its end within {timeout_s}s "
                                   f"({read} records so far)")
            batch = c.poll(timeout_ms=1000, max_records=1000)
            if not batch:  # a poll that found nothing more: the end
                break
            for tp_records in batch.values():
                for rec in tp_records:
                    try:
                        p = codecs.pair_from_proto(codecs.pb.TrainingPair.FromString(rec.value),
                                                   dims)
                    except Exception as exc:
                        raise ValueError(f"{topic!r} offset {rec.offset}: not a training pair "
                                         f"of {dict(dims)} ({exc})") from None
                    pairs[p.key] = p
                    read += 1
            if progress is not None:
                progress(f"read {read} records, {len(pairs)} distinct pairs")
        return pairs
    finally:
        c.close()


def write_pairs(pairs: Mapping[tuple[str, str], TrainingPair], path: str | Path,
                modalities: tuple[str, str], validation_share: float) -> Path:
    """Write the pairs (see the module docstring) and return the path.

    Raises
    ------
    ValueError
        No pairs (an empty dataset is not a file anyone can train on).
    """
    if not pairs:
        raise ValueError("no training pairs to export (nothing acquired yet?)")
    rows = sorted(pairs.values(), key=lambda p: (p.labeled_at or 0.0, p.key))
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
