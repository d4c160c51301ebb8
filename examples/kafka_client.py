"""Produce feature events to pairsieve over Kafka and read the alignment requests back.

    python examples/kafka_client.py --bootstrap localhost:9092 --modality image --dim 512
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from kafka import KafkaConsumer, KafkaProducer

from service.wire.gen.pairsieve.v1 import pairsieve_pb2 as pb

FEATURES = "pairsieve.features.v1"
REQUESTS = "pairsieve.alignment-requests.v1"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default="localhost:9092")
    ap.add_argument("--modality", default="image")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--topic-suffix", default="")
    ap.add_argument("--wait-seconds", type=float, default=10.0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng()
    stamp = time.time_ns()
    batch = pb.FeatureBatch(events=[
        pb.FeatureEvent(event_id=f"kafka-demo-{stamp}-{i}", item_id=f"kitem-{stamp}-{i}",
                        modality=args.modality, dim=args.dim,
                        vector=rng.normal(size=args.dim).astype("<f4").tobytes(),
                        source="examples/kafka_client.py")
        for i in range(args.n)])
    producer = KafkaProducer(bootstrap_servers=args.bootstrap, acks="all")
    # The header tells pairsieve the record is a FeatureBatch (a single FeatureEvent needs none).
    producer.send(FEATURES + args.topic_suffix, batch.SerializeToString(),
                  key=f"{stamp}".encode(), headers=[("pairsieve-message", b"FeatureBatch")])
    producer.flush()
    producer.close()
    print(f"sent {args.n} events; waiting {args.wait_seconds:.0f}s for alignment requests ...")
    consumer = KafkaConsumer(REQUESTS + args.topic_suffix, bootstrap_servers=args.bootstrap,
                             auto_offset_reset="earliest", group_id=None,
                             consumer_timeout_ms=int(args.wait_seconds * 1000))
    mine = 0
    for rec in consumer:
        req = pb.AlignmentRequest.FromString(rec.value)
        if req.request_id.startswith(f"kafka-demo-{stamp}-"):
            mine += 1
            cands = ", ".join(f"{c.item_id} ({c.similarity:.2f})" for c in req.candidates[:3])
            print(f"align {req.item_id} [{req.modality}] utility {req.decision.utility:+.3f}; "
                  f"likely partners: {cands or '-'}")
    consumer.close()
    print(f"{mine} of {args.n} events were selected for alignment")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
