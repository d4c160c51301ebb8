"""gRPC load generator for pairsieve (``pairsieve.v1.Selector``): asyncio, closed loop.

    .venv/bin/python loadtests/grpc_load.py --target 127.0.0.1:50051 --concurrency 16 \\
        --deadline-ms 2000 --ramp-seconds 2 --duration 10 --batch 1,32,256 --modes unary,stream \\
        --token "$PAIRSIEVE_AUTH_TOKEN" --out-dir reports/loadtest

Phases: one per (mode, batch size), in that order, each ``--duration`` seconds. In a phase,
``--concurrency`` clients run on ``--channels`` shared channels; client ``i`` starts
``i * ramp / concurrency`` seconds into the phase (linear ramp-up) and then sends back to back
(closed loop: a client waits for its answer before sending the next request):

* ``unary``: ``Submit(SubmitRequest)`` with ``timeout = --deadline-ms``;
* ``stream``: one ``SubmitStream`` per client for the whole phase, one request message, then its
  response, and so on (the per-message latency is measured; the call's own deadline is the rest of
  the phase plus ``--deadline-ms``; a message slower than ``--deadline-ms`` counts as ``late``).

Every request carries ``--batch`` events with unique event ids (``<run>-<phase>-<client>-<n>-<i>``)
so the service decides each one afresh (no duplicates), modalities drawn with ``--mix``,
pre-packed clustered vectors, ``event_time`` = send time. Refused calls back off
``--error-backoff-ms`` before the next one.

Reported per phase, over the steady window (after the ramp) unless noted: OK requests/s and
**items/s** (events decided per second), request latency p50/p90/p99/max of OK requests (client
side, from just before the call to its answer), and errors by gRPC status code (whole phase, e.g.
``DEADLINE_EXCEEDED``, ``UNAUTHENTICATED``, ``UNAVAILABLE``, ``RESOURCE_EXHAUSTED``).

Output in ``--out-dir``: ``grpc_result.json``, ``grpc_phases.csv`` (one row per phase),
``grpc_timeseries.csv`` (one row per phase and second) and ``grpc_load.png``.
Only ``--target`` is contacted; the run ends after the phases (``--max-requests`` bounds it too).
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
    grpc_phases_table,
    parse_ints,
    parse_mix,
    parse_modalities,
    pb,
    percentiles,
    pyplot,
    save_figure,
    set_timestamp,
    write_csv,
    write_json,
)

MODES = ("unary", "stream")


@dataclass
class GrpcLoadConfig:
    """Everything that shapes one run (also written to the JSON)."""

    target: str = "127.0.0.1:50051"
    concurrency: int = 8
    channels: int = 1
    deadline_ms: float = 2000.0
    ramp_seconds: float = 0.0
    duration: float = 10.0          # seconds per phase
    batches: list[int] = field(default_factory=lambda: [1, 32, 256])
    modes: list[str] = field(default_factory=lambda: ["unary", "stream"])
    token: str = ""
    tls: bool = False
    ca_file: str = ""
    modalities: str = "image:512,text:384"
    mix: str = ""
    out_dir: str = "loadtest-out"
    seed: int = 0
    bank_size: int = 1024
    error_backoff_ms: float = 10.0
    connect_timeout: float = 15.0
    max_requests: int = 2_000_000
    plot: bool = True
    label: str = "grpc"

    def validate(self) -> None:
        if self.concurrency < 1 or self.channels < 1:
            raise ValueError("concurrency and channels must be >= 1")
        if self.deadline_ms <= 0 or self.duration <= 0 or self.ramp_seconds < 0:
            raise ValueError("deadline_ms and duration must be > 0, ramp_seconds >= 0")
        if self.ramp_seconds >= self.duration:
            raise ValueError("ramp_seconds must be shorter than duration (per phase)")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"batch sizes must be >= 1, got {self.batches}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"modes must be among {MODES}, got {self.modes}")
        mods = parse_modalities(self.modalities)
        parse_mix(self.mix, len(mods))


@dataclass
class PhaseSpec:
    index: int
    mode: str
    batch: int

    @property
    def name(self) -> str:
        return f"{self.mode}-b{self.batch}"


class GrpcLoad:
    """One run (see module docstring). ``await GrpcLoad(cfg).run()`` -> result dict."""

    def __init__(self, cfg: GrpcLoadConfig, log=print):
        cfg.validate()
        self.cfg = cfg
        self.log = log
        self.run_id = "gl" + uuid.uuid4().hex[:8]
        self.mods = parse_modalities(cfg.modalities)
        self.mix = parse_mix(cfg.mix, len(self.mods))
        self.bank = VectorBank(self.mods, cfg.bank_size, cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.phases = [PhaseSpec(i, m, b) for i, (m, b) in
                       enumerate((m, b) for m in cfg.modes for b in cfg.batches)]
        self.metadata = (("authorization", f"Bearer {cfg.token}"),) if cfg.token else ()
        # (phase, client, t_start, latency_s, code, items)
        self.records: list[tuple[int, int, float, float, str, int]] = []
        self.late = [0] * len(self.phases)
        self.phase_t: list[tuple[float, float]] = []
        self._templates: dict[int, list] = {}

    # ------------------------------------------------------------------ requests
    def _template(self, batch: int) -> list:
        """A few pre-built SubmitRequests of ``batch`` events (vectors and modalities fixed)."""
        if batch not in self._templates:
            reqs = []
            for k in range(4):
                mods = self.rng.choice(len(self.mods), size=batch, p=self.mix)
                req = pb.SubmitRequest()
                for j, mi in enumerate(mods):
                    name, dim = self.mods[int(mi)]
                    req.events.add(modality=name, dim=dim,
                                           vector=self.bank.vector(name, k * batch + j),
                                           source="loadtests/grpc_load.py")
                reqs.append(req)
            self._templates[batch] = reqs
        return self._templates[batch]

    def _request(self, batch: int, ph: int, client: int, n: int):
        req = pb.SubmitRequest()
        req.CopyFrom(self._template(batch)[n % 4])
        t = time.time()
        base = f"{self.run_id}-{ph}-{client}-{n}-"
        for j, ev in enumerate(req.events):
            ev.event_id = base + str(j)
            ev.item_id = base + "i" + str(j)
            set_timestamp(ev.event_time, t)
        return req

    # ------------------------------------------------------------------ clients
    def _channel(self):
        import grpc

        opts = [("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if self.cfg.tls:
            ca = open(self.cfg.ca_file, "rb").read() if self.cfg.ca_file else None
            return grpc.aio.secure_channel(self.cfg.target, grpc.ssl_channel_credentials(ca), opts)
        return grpc.aio.insecure_channel(self.cfg.target, options=opts)

    async def _unary(self, stub, ph: PhaseSpec, client: int, t_end: float) -> None:
        import grpc

        timeout = self.cfg.deadline_ms / 1000.0
        backoff = self.cfg.error_backoff_ms / 1000.0
        n = 0
        while time.time() < t_end and len(self.records) < self.cfg.max_requests:
            req = self._request(ph.batch, ph.index, client, n)
            n += 1
            t0 = time.time()
            p0 = time.perf_counter()
            try:
                resp = await stub.Submit(req, timeout=timeout, metadata=self.metadata)
                code, items = "OK", len(resp.decisions)
            except grpc.aio.AioRpcError as exc:
                code, items = exc.code().name, 0
            self.records.append((ph.index, client, t0, time.perf_counter() - p0, code, items))
            if code != "OK":
                await asyncio.sleep(backoff)

    async def _stream(self, stub, ph: PhaseSpec, client: int, t_end: float) -> None:
        import grpc

        backoff = self.cfg.error_backoff_ms / 1000.0
        deadline_s = self.cfg.deadline_ms / 1000.0
        n = 0
        while time.time() < t_end and len(self.records) < self.cfg.max_requests:
            call = stub.SubmitStream(metadata=self.metadata,
                                             timeout=max(0.001, t_end - time.time()) + deadline_s)
            try:
                while time.time() < t_end and len(self.records) < self.cfg.max_requests:
                    req = self._request(ph.batch, ph.index, client, n)
                    n += 1
                    t0 = time.time()
                    p0 = time.perf_counter()
                    await call.write(req)
                    resp = await call.read()
                    if resp is grpc.aio.EOF:
                        raise RuntimeError("server closed the stream")
                    lat = time.perf_counter() - p0
                    if lat > deadline_s:
                        self.late[ph.index] += 1
                    self.records.append((ph.index, client, t0, lat, "OK", len(resp.decisions)))
                await call.done_writing()
                code = await call.code()  # final status
                if code != grpc.StatusCode.OK:
                    self.records.append((ph.index, client, time.time(), math.nan, code.name, 0))
            except grpc.aio.AioRpcError as exc:
                self.records.append((ph.index, client, time.time(), math.nan, exc.code().name, 0))
                await asyncio.sleep(backoff)
            except (RuntimeError, asyncio.InvalidStateError) as exc:
                self.records.append((ph.index, client, time.time(), math.nan,
                                             f"STREAM_ERROR:{type(exc).__name__}", 0))
                call.cancel()
                await asyncio.sleep(backoff)

    async def _client(self, stub, ph: PhaseSpec, client: int, t_start: float,
                      t_end: float) -> None:
        delay = t_start + self.cfg.ramp_seconds * client / self.cfg.concurrency - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if ph.mode == "unary":
            await self._unary(stub, ph, client, t_end)
        else:
            await self._stream(stub, ph, client, t_end)

    # ------------------------------------------------------------------ run
    async def run(self) -> dict:
        from service.wire.gen.pairsieve.v1 import pairsieve_pb2_grpc as pb_grpc

        cfg = self.cfg
        os.makedirs(cfg.out_dir, exist_ok=True)
        channels = [self._channel() for _ in range(cfg.channels)]
        try:
            try:
                await asyncio.wait_for(channels[0].channel_ready(), cfg.connect_timeout)
            except TimeoutError:
                raise RuntimeError(f"no gRPC server answered at {cfg.target} within "
                                           f"{cfg.connect_timeout:g}s") from None
            stubs = [pb_grpc.SelectorStub(c) for c in channels]
            for ph in self.phases:
                for b in set(cfg.batches):
                    self._template(b)
                self.log(f"[{cfg.label}] phase {ph.name}: {cfg.concurrency} clients, "
                         f"{cfg.duration:g}s (ramp {cfg.ramp_seconds:g}s), deadline "
                         f"{cfg.deadline_ms:g} ms")
                t_start = time.time()
                t_end = t_start + cfg.duration
                await asyncio.gather(*[self._client(stubs[i % len(stubs)], ph, i, t_start, t_end)
                                               for i in range(cfg.concurrency)])
                self.phase_t.append((t_start, time.time()))
                s = self._phase_summary(ph)
                self.log(f"[{cfg.label}]   {s['items_per_s']:.0f} items/s, {s['requests_ok']} OK, "
                         f"p50 {_f(s['latency_ms']['p50'])} ms, p99 {_f(s['latency_ms']['p99'])} "
                         f"ms, errors {s['errors']}")
        finally:
            await asyncio.gather(*[c.close() for c in channels], return_exceptions=True)
        result = self.analyse()
        self.write(result)
        return result

    # ------------------------------------------------------------------ analysis
    def _phase_records(self, ph: PhaseSpec):
        return [r for r in self.records if r[0] == ph.index]

    def _phase_summary(self, ph: PhaseSpec) -> dict:
        cfg = self.cfg
        t_start, t_stop = self.phase_t[ph.index]
        steady_from = t_start + cfg.ramp_seconds
        recs = self._phase_records(ph)
        ok = [r for r in recs if r[4] == "OK"]
        steady = [r for r in ok if r[2] >= steady_from]
        window = max(1e-9, t_stop - steady_from)
        errors: dict[str, int] = {}
        for r in recs:
            if r[4] != "OK":
                errors[r[4]] = errors.get(r[4], 0) + 1
        lat = percentiles([r[3] * 1e3 for r in steady])
        return {"phase": ph.name, "mode": ph.mode, "batch": ph.batch,
                "concurrency": cfg.concurrency, "deadline_ms": cfg.deadline_ms,
                "seconds": t_stop - t_start, "steady_seconds": window,
                "requests": len(recs), "requests_ok": len(ok),
                "items_ok": sum(r[5] for r in ok),
                "requests_per_s": len(steady) / window,
                "items_per_s": sum(r[5] for r in steady) / window,
                "latency_ms": lat, "latency_ms_all_ok": percentiles([r[3] * 1e3 for r in ok]),
                "errors": errors, "error_total": sum(errors.values()),
                "late": self.late[ph.index]}

    def _timeseries(self) -> list[dict]:
        rows = []
        for ph in self.phases:
            t_start, t_stop = self.phase_t[ph.index]
            recs = self._phase_records(ph)
            n = max(1, int(math.ceil(t_stop - t_start)))
            bins = [[] for _ in range(n)]
            for r in recs:
                bins[min(n - 1, max(0, int(r[2] - t_start)))].append(r)
            for i, rs in enumerate(bins):
                ok = [r for r in rs if r[4] == "OK"]
                lat = percentiles([r[3] * 1e3 for r in ok])
                width = min(1.0, t_stop - t_start - i)  # the last second may be partial
                if width < 0.2:  # a sliver after the phase end: only stragglers, not a rate
                    continue
                rows.append({"phase": ph.name, "t_s": i,
                             "t_run_s": t_start - self.phase_t[0][0] + i,
                             "requests_per_s": len(ok) / width,
                             "items_per_s": sum(r[5] for r in ok) / width,
                             "errors_per_s": (len(rs) - len(ok)) / width, "p50_ms": lat["p50"],
                             "p90_ms": lat["p90"], "p99_ms": lat["p99"]})
        return rows

    def analyse(self) -> dict:
        phases = [self._phase_summary(ph) for ph in self.phases]
        errors: dict[str, int] = {}
        for p in phases:
            for k, v in p["errors"].items():
                errors[k] = errors.get(k, 0) + v
        summary = {"run_id": self.run_id, "target": self.cfg.target,
                   "requests": len(self.records),
                   "items_ok": sum(p["items_ok"] for p in phases),
                   "best_items_per_s": max((p["items_per_s"] for p in phases), default=0.0),
                   "errors": errors}
        return {"kind": "grpc_load", "config": asdict(self.cfg),
                "machine": machine_info(torch_info=False),
                "summary": summary, "phases": phases, "timeseries": self._timeseries()}

    # ------------------------------------------------------------------ output
    def write(self, result: dict) -> None:
        d = self.cfg.out_dir
        rows = []
        for p in result["phases"]:
            lat = p["latency_ms"]
            rows.append({**{k: p[k] for k in ("phase", "mode", "batch", "concurrency",
                                          "deadline_ms", "seconds", "requests", "requests_ok",
                                          "items_ok", "requests_per_s", "items_per_s",
                                          "error_total", "late")},
                         "p50_ms": lat["p50"], "p90_ms": lat["p90"], "p99_ms": lat["p99"],
                         "max_ms": lat["max"],
                         "errors": ";".join(f"{k}={v}" for k, v in sorted(p["errors"].items()))})
        write_csv(os.path.join(d, "grpc_phases.csv"), rows)
        write_csv(os.path.join(d, "grpc_timeseries.csv"), result["timeseries"],
                  ["phase", "t_s", "t_run_s", "requests_per_s", "items_per_s", "errors_per_s",
                   "p50_ms", "p90_ms", "p99_ms"])
        write_json(os.path.join(d, "grpc_result.json"), result)
        if self.cfg.plot:
            try:
                plot(result, os.path.join(d, "grpc_load.png"))
            except Exception as exc:  # noqa: BLE001
                self.log(f"plot failed: {exc!r}")


def plot(result: dict, path: str) -> str:
    plt = pyplot()
    ts = result["timeseries"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for k, name in enumerate(dict.fromkeys(r["phase"] for r in ts)):
        rs = [r for r in ts if r["phase"] == name]
        t = [r["t_run_s"] + 0.5 for r in rs]
        c = f"C{k % 10}"
        axes[0].plot(t, [r["items_per_s"] for r in rs], color=c, marker=".", label=name)
        axes[1].plot(t, [r["p50_ms"] if r["p50_ms"] is not None else float("nan") for r in rs],
                     "--", color=c, label=f"{name} p50")
        axes[1].plot(t, [r["p99_ms"] if r["p99_ms"] is not None else float("nan") for r in rs],
                     color=c, label=f"{name} p99")
        axes[2].plot(t, [r["errors_per_s"] for r in rs], color=c, marker=".", label=name)
    axes[0].set_ylabel("items/s (OK)")
    axes[0].legend(fontsize=8, loc="upper left")
    axes[0].set_title(f"pairsieve gRPC load ({result['summary']['run_id']}, "
                      f"concurrency {result['config']['concurrency']})")
    axes[1].set_ylabel("request latency (ms)")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7, loc="upper left", ncol=2)
    axes[2].set_ylabel("errors/s")
    axes[2].set_xlabel("seconds since start")
    return save_figure(fig, path)


phases_table = grpc_phases_table  # the result table (also used by service.perfbench.e2e)


def run(cfg: GrpcLoadConfig, log=print) -> dict:
    """Run one load test synchronously (its own event loop); returns the result dict."""
    return asyncio.run(GrpcLoad(cfg, log).run())


def config_from_args(argv=None) -> GrpcLoadConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="127.0.0.1:50051", help="gRPC host:port")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    ap.add_argument("--channels", type=int, default=1, help="gRPC channels shared by the clients")
    ap.add_argument("--deadline-ms", type=float, default=2000.0, help="per-call deadline")
    ap.add_argument("--ramp-seconds", type=float, default=0.0, help="ramp-up within each phase")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per phase")
    ap.add_argument("--batch", default="1,32,256", help="events per request, one phase each")
    ap.add_argument("--modes", default="unary,stream", help="unary (Submit), stream (SubmitStream)")
    ap.add_argument("--token", default="", help="PAIRSIEVE_AUTH_TOKEN of the service")
    ap.add_argument("--tls", action="store_true", help="TLS channel")
    ap.add_argument("--ca-file", default="", help="PEM root certificate for --tls")
    ap.add_argument("--modalities", default="image:512,text:384")
    ap.add_argument("--mix", default="", help="share of each modality, e.g. 0.7,0.3")
    ap.add_argument("--out-dir", default="loadtest-out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--error-backoff-ms", type=float, default=10.0)
    ap.add_argument("--max-requests", type=int, default=2_000_000)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--label", default="grpc")
    a = ap.parse_args(argv)
    return GrpcLoadConfig(
        target=a.target, concurrency=a.concurrency, channels=a.channels,
        deadline_ms=a.deadline_ms, ramp_seconds=a.ramp_seconds, duration=a.duration,
        batches=parse_ints(a.batch), modes=[m.strip() for m in a.modes.split(",") if m.strip()],
        token=a.token, tls=a.tls, ca_file=a.ca_file, modalities=a.modalities, mix=a.mix,
        out_dir=a.out_dir, seed=a.seed, error_backoff_ms=a.error_backoff_ms,
        max_requests=a.max_requests, plot=not a.no_plot, label=a.label)


def main(argv=None) -> int:
    cfg = config_from_args(argv)
    try:
        result = run(cfg)
    except (RuntimeError, ValueError) as exc:
        print(f"grpc_load: {exc}", file=sys.stderr)
        return 2
    print(phases_table(result))
    print(f"results in {cfg.out_dir}")
    return 0


def _f(x):
    return "-" if x is None else f"{x:.1f}"


if __name__ == "__main__":
    raise SystemExit(main())
