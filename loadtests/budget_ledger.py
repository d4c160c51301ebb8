"""What the budget ledger costs a worker: the reservation round trip and the idle follower.

``python -m loadtests.budget_ledger [--bootstrap HOST:PORT] [--reservations 200] [--ids 25]
[--idle-seconds 10] [--json out.json]``

* **Round trip**: ``--reservations`` sequential :meth:`KafkaBudgetLedger.reserve` calls of
  ``--ids`` new event ids each (a batch's accepts), on a fresh one-partition topic with units
  left (every call writes and reads back): median, p90 and max in ms. This is what a batch with
  accepts waits for between propose and publish.
* **Idle**: the worker process's CPU while the ledger's follower polls an idle topic for
  ``--idle-seconds``, with the ledger's fetch wait and with the other followers' 50 ms for
  comparison (percent of one core).

Without ``--bootstrap`` it starts the embedded tansu broker. Progress and the table go to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

from service.streaming.broker import bootstrap_or_embedded
from service.streaming.budget_reservations import KafkaBudgetLedger
from service.streaming.kafka_io import KafkaPublisher
from service.streaming.topics import create_topics

REFERENCE_WAIT_MS = 50  # the other followers' fetch wait


async def _ledger(bootstrap: str, topic: str, wait_ms: int | None):
    pub = KafkaPublisher(bootstrap, "unused", idempotence="off")
    await pub.start()
    kw = {} if wait_ms is None else {"fetch_max_wait_ms": wait_ms}
    led = KafkaBudgetLedger(bootstrap, topic, 10**9, pub, worker_id="bench", **kw)
    await led.start()
    await led.follower.wait_caught_up()
    return led, pub


async def round_trips(bootstrap: str, reservations: int, ids: int) -> dict:
    """Sequential reservations of ``ids`` new ids each; their latencies in ms."""
    topic = f"bench-ledger-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(create_topics, bootstrap, {topic: 1})
    led, pub = await _ledger(bootstrap, topic, None)
    try:
        ms = []
        for k in range(reservations):
            t0 = time.perf_counter()
            await led.reserve([f"e{k}-{j}" for j in range(ids)])
            ms.append((time.perf_counter() - t0) * 1e3)
        ms.sort()
        return {"reservations": reservations, "ids": ids, "fetch_max_wait_ms":
                led.follower.fetch_max_wait_ms, "median_ms": statistics.median(ms),
                "p90_ms": ms[int(0.9 * (len(ms) - 1))], "max_ms": ms[-1]}
    finally:
        await led.stop()
        await pub.stop()


async def idle_cpu(bootstrap: str, seconds: float, wait_ms: int | None) -> dict:
    """This process's CPU (percent of one core) while a ledger follows an idle topic."""
    topic = f"bench-ledger-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(create_topics, bootstrap, {topic: 1})
    led, pub = await _ledger(bootstrap, topic, wait_ms)
    try:
        await asyncio.sleep(1.0)  # past the start
        c0 = time.process_time()
        await asyncio.sleep(seconds)
        return {"fetch_max_wait_ms": led.follower.fetch_max_wait_ms,
                "idle_cpu_percent": 100.0 * (time.process_time() - c0) / seconds}
    finally:
        await led.stop()
        await pub.stop()


async def run(bootstrap: str, reservations: int, ids: int, idle_seconds: float) -> dict:
    print(f"round trip: {reservations} reservations of {ids} ids ...", flush=True)
    rt = await round_trips(bootstrap, reservations, ids)
    idle = []
    for wait in (None, REFERENCE_WAIT_MS):
        print(f"idle follower, {idle_seconds:g} s ...", flush=True)
        idle.append(await idle_cpu(bootstrap, idle_seconds, wait))
    return {"round_trip": rt, "idle": idle}


def render(res: dict) -> str:
    rt = res["round_trip"]
    lines = [f"reservation round trip ({rt['reservations']} x {rt['ids']} ids, fetch wait "
             f"{rt['fetch_max_wait_ms']} ms): median {rt['median_ms']:.1f} ms, p90 "
             f"{rt['p90_ms']:.1f} ms, max {rt['max_ms']:.1f} ms"]
    for row in res["idle"]:
        lines.append(f"idle follower, fetch wait {row['fetch_max_wait_ms']} ms: "
                     f"{row['idle_cpu_percent']:.1f} % of a core")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bootstrap", default="", help="Kafka bootstrap (default: embedded tansu)")
    ap.add_argument("--reservations", type=int, default=200)
    ap.add_argument("--ids", type=int, default=25, help="event ids per reservation")
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.reservations < 1 or args.ids < 1 or args.idle_seconds <= 0:
        ap.error("--reservations and --ids must be >= 1 and --idle-seconds > 0, got "
                 f"{args.reservations}, {args.ids}, {args.idle_seconds}")
    with bootstrap_or_embedded(args.bootstrap) as bootstrap:
        res = asyncio.run(run(bootstrap, args.reservations, args.ids, args.idle_seconds))
    print(render(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
