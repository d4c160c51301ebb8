"""Helpers shared by the load drivers (``loadtests/kafka_load.py``, ``loadtests/grpc_load.py``)
and :mod:`service.perfbench.e2e`: parsing, percentiles and histogram quantiles, ``/metrics``
scraping, CSV/JSON/Markdown/PNG output. Their vectors
(:class:`~service.perfbench.fixtures.VectorBank`)
and machine facts (:func:`~service.perfbench.fixtures.machine_info`) come from the fixtures.

Nothing here imports torch or the service's engine: a driver only needs the generated protobuf
module, numpy, the Kafka/gRPC clients, prometheus_client's text parser and (for the PNG)
matplotlib.
"""

from __future__ import annotations

import csv
import json
import math
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from service.wire.gen.pairsieve.v1 import pairsieve_pb2 as pb  # noqa: F401 (re-exported)

FEATURE_HEADER = "pairsieve-message"
HEADER_BATCH = (FEATURE_HEADER, b"FeatureBatch")
HEADER_EVENT = (FEATURE_HEADER, b"FeatureEvent")


# --------------------------------------------------------------------------- parsing
def parse_modalities(spec: str) -> list[tuple[str, int]]:
    """``"image:512,text:384[,audio:128]"`` -> ``[("image", 512), ("text", 384), ...]``."""
    out: list[tuple[str, int]] = []
    for part in spec.split(","):
        name, _, dim = part.strip().partition(":")
        if not name or not dim.isdigit() or int(dim) <= 0:
            raise ValueError(f"bad modality {part!r} in {spec!r}; expected NAME:DIM[,NAME:DIM...]")
        if name in {n for n, _ in out}:
            raise ValueError(f"modality {name!r} given twice in {spec!r}")
        out.append((name, int(dim)))
    if not out:
        raise ValueError(f"no modality in {spec!r}")
    return out


def parse_mix(spec: str | None, n: int) -> np.ndarray:
    """``"0.7,0.3"`` -> normalised probabilities for ``n`` modalities (``None``/"" -> uniform)."""
    if not spec:
        return np.full(n, 1.0 / n)
    vals = [float(x) for x in spec.split(",")]
    if len(vals) != n:
        raise ValueError(f"--mix has {len(vals)} values but there are {n} modalities")
    if any(v < 0 or not math.isfinite(v) for v in vals) or sum(vals) <= 0:
        raise ValueError(f"--mix values must be >= 0 with a positive sum, got {spec!r}")
    arr = np.asarray(vals, dtype=float)
    return arr / arr.sum()


def parse_floats(spec: str | Sequence[float]) -> list[float]:
    if isinstance(spec, str):
        return [float(x) for x in spec.split(",") if x.strip()]
    return [float(x) for x in spec]


def parse_ints(spec: str | Sequence[int]) -> list[int]:
    if isinstance(spec, str):
        return [int(x) for x in spec.split(",") if x.strip()]
    return [int(x) for x in spec]


# --------------------------------------------------------------------------- data
def set_timestamp(ts_msg, t: float) -> None:
    """Set a ``google.protobuf.Timestamp`` field from float seconds since the epoch."""
    sec = int(t)
    ts_msg.seconds = sec
    ts_msg.nanos = int((t - sec) * 1e9)


def ts_seconds(ts_msg) -> float:
    return ts_msg.seconds + ts_msg.nanos * 1e-9


# --------------------------------------------------------------------------- statistics
def percentiles(values, qs: Iterable[float] = (50, 90, 99)) -> dict[str, float | None]:
    """``{"p50": .., "p90": .., "p99": .., "max": .., "n": ..}`` of ``values`` (None when empty)."""
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    arr = arr[np.isfinite(arr)]
    out: dict[str, float | None] = {f"p{int(q) if float(q).is_integer() else q}": None for q in qs}
    out["max"] = None
    out["n"] = int(arr.size)
    if arr.size:
        for q in qs:
            out[f"p{int(q) if float(q).is_integer() else q}"] = float(np.percentile(arr, q))
        out["max"] = float(arr.max())
    return out


def hist_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Prometheus ``histogram_quantile``: ``buckets`` are (upper bound, cumulative count) sorted
    by bound, the last one +Inf; linear interpolation inside the bucket. None when empty; the
    largest finite bound when the quantile falls in the +Inf bucket."""
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def hist_fraction_le(buckets: Sequence[tuple[float, float]], bound: float) -> float | None:
    """Fraction of observations <= ``bound`` (``bound`` should be a bucket edge to be exact)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    below = 0.0
    for le, c in buckets:
        if le <= bound + 1e-12:
            below = c
    return below / buckets[-1][1]


def hist_delta(b1: Sequence[tuple[float, float]], b0: Sequence[tuple[float, float]] | None):
    """Per-bucket difference of two cumulative histograms with the same bounds."""
    if not b0:
        return list(b1)
    prev = dict(b0)
    return [(le, c - prev.get(le, 0.0)) for le, c in b1]


# --------------------------------------------------------------------------- metrics endpoint
def scrape_pairsieve(url: str, timeout_s: float = 2.0) -> dict:
    """Read a pairsieve ``/metrics`` endpoint.

    Returns ``{"t", "events": {outcome: n}, "decided", "latency_buckets": [(le, cum)],
    "latency_count", "lag", "grpc": {(method, code): n}, "batch_sum", "batch_count"}`` summed
    over label values. ``decided`` = accepted + skipped + duplicate events; ``batch_*`` are the
    micro-batch size histogram's sum and count.
    """
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        text = resp.read().decode("utf-8", "replace")
    t = time.time()
    events: dict[str, float] = {}
    buckets: dict[float, float] = {}
    lat_count = 0.0
    lag = 0.0
    grpc_req: dict[str, float] = {}
    batch = {"_sum": 0.0, "_count": 0.0}
    for fam in text_string_to_metric_families(text):
        if fam.name == "pairsieve_events_received":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    o = s.labels.get("outcome", "")
                    events[o] = events.get(o, 0.0) + s.value
        elif fam.name == "pairsieve_decision_latency_seconds":
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    le = float(s.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + s.value
                elif s.name.endswith("_count"):
                    lat_count += s.value
        elif fam.name == "pairsieve_consumer_lag":
            for s in fam.samples:
                if math.isfinite(s.value):
                    lag += s.value
        elif fam.name == "pairsieve_micro_batch_size":
            for s in fam.samples:
                for end in batch:
                    if s.name.endswith(end):
                        batch[end] += s.value
        elif fam.name == "pairsieve_grpc_requests":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    k = f"{s.labels.get('method', '')}:{s.labels.get('code', '')}"
                    grpc_req[k] = grpc_req.get(k, 0.0) + s.value
    decided = sum(events.get(k, 0.0) for k in ("accepted", "skipped", "duplicate"))
    return {"t": t, "events": events, "decided": decided,
            "latency_buckets": sorted(buckets.items()), "latency_count": lat_count, "lag": lag,
            "grpc": grpc_req, "batch_sum": batch["_sum"], "batch_count": batch["_count"]}


def sum_scrapes(scrapes: Sequence[dict]) -> dict:
    """Add the scrapes of several workers (taken at about the same time) into one."""
    if len(scrapes) == 1:
        return scrapes[0]
    events: dict[str, float] = {}
    buckets: dict[float, float] = {}
    grpc_req: dict[str, float] = {}
    for s in scrapes:
        for k, v in s["events"].items():
            events[k] = events.get(k, 0.0) + v
        for le, c in s["latency_buckets"]:
            buckets[le] = buckets.get(le, 0.0) + c
        for k, v in s["grpc"].items():
            grpc_req[k] = grpc_req.get(k, 0.0) + v
    return {"t": max(s["t"] for s in scrapes), "events": events,
            "decided": sum(s["decided"] for s in scrapes),
            "latency_buckets": sorted(buckets.items()),
            "latency_count": sum(s["latency_count"] for s in scrapes),
            "lag": sum(s["lag"] for s in scrapes), "grpc": grpc_req}


# --------------------------------------------------------------------------- output
def drain_rate(scrapes: Sequence[Mapping], t_from: float, min_seconds: float = 1.0
               ) -> dict | None:
    """Events decided per second while a backlog was worked off, the producer stopped.

    From the first scrape at or after ``t_from`` (when the producer stopped) to the last scrape
    whose ``decided`` count is still below the final one, so the worker was busy over the whole
    window. This is the worker's own throughput with nothing else producing: on a machine that
    also runs the load driver, a rate read while producing shares the cores with it.

    Returns ``{"events", "seconds", "events_per_s", "backlog_events"}``, or None when the window
    is shorter than ``min_seconds`` (no backlog worth measuring) or there are too few scrapes.
    ``scrapes``: :func:`sum_scrapes`-shaped dicts in time order (``t``, ``decided``).
    """
    if not scrapes:
        return None
    after = [s for s in scrapes if s["t"] >= t_from]
    final = scrapes[-1]["decided"]
    busy = [s for s in after if s["decided"] < final]
    if not after or not busy or busy[-1]["t"] - after[0]["t"] < min_seconds:
        return None
    a, b = after[0], busy[-1]
    seconds = b["t"] - a["t"]
    return {"events": b["decided"] - a["decided"], "seconds": seconds,
            "events_per_s": (b["decided"] - a["decided"]) / seconds,
            "backlog_events": final - a["decided"]}


def write_csv(path: str, rows: Sequence[Mapping], fields: Sequence[str] | None = None) -> str:
    fields = list(fields or (rows[0].keys() if rows else []))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in fields})
    return path


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else ""
    return v


def _json_safe(o):
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.integer):
        return int(o)
    return o


def write_json(path: str, obj) -> str:
    with open(path, "w") as f:
        json.dump(_json_safe(obj), f, indent=2, sort_keys=False)
        f.write("\n")
    return path


def md_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_md(v) for v in r) + " |")
    return "\n".join(lines)


def grpc_phases_table(result: dict) -> str:
    """The gRPC driver's phases (``grpc_result.json``'s ``phases``) as a Markdown table."""
    rows = []
    for p in result["phases"]:
        lat = p["latency_ms"]
        rows.append([p["mode"], p["batch"], p["concurrency"], p["items_per_s"],
                     p["requests_per_s"], lat["p50"], lat["p90"], lat["p99"],
                     ", ".join(f"{k} {v}" for k, v in sorted(p["errors"].items())) or "-"])
    return md_table(["mode", "batch", "clients", "items/s", "requests/s", "p50 ms", "p90 ms",
                     "p99 ms", "errors"], rows)


def _md(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> str:
    """Lay out, write (PNG, 90 dpi) and close ``fig``; return ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)
    return path
