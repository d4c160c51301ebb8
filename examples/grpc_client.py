"""Submit feature events to pairsieve over gRPC and print the decisions.

    python examples/grpc_client.py --target localhost:50051 --modality image --dim 512
"""

from __future__ import annotations

import argparse
import time

import grpc
import numpy as np

from service.wire.gen.pairsieve.v1 import pairsieve_pb2 as pb
from service.wire.gen.pairsieve.v1 import pairsieve_pb2_grpc as pb_grpc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="localhost:50051")
    ap.add_argument("--modality", default="image")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--token", default="", help="PAIRSIEVE_AUTH_TOKEN of the server, if set")
    args = ap.parse_args(argv)
    rng = np.random.default_rng()
    events = [pb.FeatureEvent(event_id=f"grpc-demo-{time.time_ns()}-{i}", item_id=f"item-{i}",
                              modality=args.modality, dim=args.dim,
                              vector=rng.normal(size=args.dim).astype("<f4").tobytes(),
                              source="examples/grpc_client.py")
              for i in range(args.n)]
    for e in events:
        e.event_time.GetCurrentTime()
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.SelectorStub(channel)
        resp = stub.Submit(pb.SubmitRequest(events=events), timeout=5.0, metadata=metadata)
        for d in resp.decisions:
            print(f"{d.item_id}: {'ACCEPT' if d.accept else 'skip'} ({d.reason}) utility "
                  f"{d.utility:+.3f} threshold {d.threshold:+.3f} model v{d.model_version}")
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=5.0, metadata=metadata)
        print(f"budget spent {status.budget_spent}, remaining {status.budget_remaining} "
              f"(-1 = unlimited), model v{status.model_version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
