"""Composition root: builds the engine, starts every adapter, owns signals and shutdown.

Startup: settings checks (:meth:`Settings.check_environment`: device, model directory, TLS
files) and the initial model (from ``PAIRSIEVE_MODEL_DIR`` if present; an unreadable checkpoint
fails here), all before any side effect -> broker (embedded tansu when
``PAIRSIEVE_KAFKA_BOOTSTRAP`` is unset) -> topics (explicit partition counts; the training-pairs
and models topics compacted) -> metrics HTTP -> publisher -> engine -> the followers, each read to
its end before anything is decided: selections (budget, caches and decided ids survive a
restart), training pairs (the shared training set), model versions (the newest is swapped in),
the recent decision log (skipped event ids) ->
faust stream processor (the worker holding the labels partition trains) -> gRPC server -> health
SERVING.

Shutdown on SIGTERM/SIGINT, in this order: health NOT_SERVING, stop consuming (no new batch is
taken), drain the in-flight batch (it is published and committed), stop the faust app (offsets of
processed events are committed), stop gRPC with grace, flush and stop the producer, stop the
followers, the metrics server and the embedded broker.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import io
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import CollectorRegistry

from service.alignment import AlignmentModel, AlignmentTrainer
from service.core.selector import StreamingSelector
from service.handlers import SelectionHandler
from service.observability.metrics import PairsieveMetrics, start_metrics_server
from service.rpc.server import GrpcServer, start_grpc_server
from service.settings import Settings
from service.streaming.app import StreamProcessor
from service.streaming.broker import EmbeddedBroker
from service.streaming.budget_reservations import KafkaBudgetLedger
from service.streaming.kafka_io import (
    KafkaPublisher,
    TopicFollower,
    decisions_follower,
    models_follower,
    pairs_follower,
    selection_follower,
)
from service.streaming.security import check_access
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
from service.threads import limit_compute_threads

log = logging.getLogger("pairsieve.runtime")

STACK_DUMP_SIGNAL = signal.SIGUSR1
"""``kill -USR1 <pid>`` makes a serving worker write every thread's stack to stderr."""
HOUSEKEEPING_STOP_S = 5.0
"""How long shutdown waits for the cancelled housekeeping task before going on without it."""


def initial_model(settings: Settings) -> AlignmentModel:
    """The newest checkpoint in ``model_dir`` or, failing that, a seeded random projection.

    Version 0 (random, not aligned) gives meaningful within-modality diversity only; the budget's
    random warm-up covers the cold start until the first trained version arrives. A model
    directory that does not exist yet, or holds no checkpoint, is a cold start (the directory is
    created with the first checkpoint); one whose checkpoint cannot be read raises ``ValueError``
    (one line) rather than silently starting over.
    """
    if settings.model_dir and (Path(settings.model_dir) / "LATEST").exists():
        try:
            model = AlignmentModel.load(settings.model_dir)
        except Exception as exc:  # corrupt, truncated or foreign file: say so, in one line
            raise ValueError(f"{Settings.env_name('model_dir')} = {settings.model_dir!r}: cannot "
                             f"load its LATEST checkpoint ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); move it away "
                             "to start from a cold model") from None
        blocks = settings.trainer_config().blocks
        if (model.dims == settings.dims and model.dim_out == settings.embedding_dim
                and model.blocks == blocks):
            log.info("loaded model version %d from %s", model.version, settings.model_dir)
            return model
        log.warning("checkpoint in %s does not match the configured modalities; ignoring it",
                    settings.model_dir)
    model = AlignmentModel(settings.dims, settings.embedding_dim, version=0,
                           blocks=settings.trainer_config().blocks)
    rng = np.random.default_rng(settings.seed)
    k = settings.embedding_dim
    for m, d in settings.dims.items():
        q, _ = np.linalg.qr(rng.normal(size=(max(d, k), max(d, k))))
        model.set_affine(m, np.zeros(d), q[:d, :k])  # orthonormal rows/columns, zero-free
    return model.eval()


def build_engine(settings: Settings, metrics=None, publisher=None,
                 model: AlignmentModel | None = None, is_trainer=None) -> SelectionHandler:
    """The selector, trainer and handler for ``settings`` (no I/O besides checkpoints).

    Every engine config comes from ``settings`` (:meth:`Settings.selector_config`,
    :meth:`Settings.trainer_config`, :meth:`Settings.gate_config`); ``model`` defaults to
    :func:`initial_model`; ``is_trainer`` (default: always) says whether this worker trains.
    """
    model = initial_model(settings) if model is None else model
    device, fell_back = settings.resolve_device()
    if fell_back:
        log.warning("PAIRSIEVE_DEVICE=%s but no CUDA device is available here: scoring on the "
                    "CPU (pairsieve_scorer_gpu_fallback = 1; alert ScorerFellBackToCPU)",
                    settings.device)
    selector = StreamingSelector(model, settings.selector_config(), seed=settings.seed,
                                 device=device)
    trainer = AlignmentTrainer(settings.dims, settings.trainer_config(), seed=settings.seed)
    on_model = (lambda m: m.save(settings.model_dir)) if settings.model_dir else None
    return SelectionHandler(selector, trainer, publisher, metrics,
                            worker_id=settings.effective_worker_id,
                            retrain_every=settings.retrain_every_pairs,
                            candidates_k=settings.candidates_k, on_model=on_model,
                            validation_share=settings.validation_share,
                            gate=settings.gate_config(), is_trainer=is_trainer,
                            gain_horizon=settings.gain_horizon_pairs)


@dataclass
class Service:
    """A running pairsieve (see module docstring). Create with :func:`start_service`."""

    settings: Settings
    bootstrap: str
    handler: SelectionHandler
    metrics: PairsieveMetrics
    registry: CollectorRegistry
    publisher: KafkaPublisher
    followers: list[TopicFollower]
    processor: StreamProcessor
    grpc: GrpcServer
    metrics_server: tuple[WSGIServer, threading.Thread]
    broker: EmbeddedBroker | None = None
    housekeeping: asyncio.Task | None = None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def grpc_port(self) -> int:
        return self.grpc.port

    @property
    def metrics_port(self) -> int:
        return self.metrics_server[0].server_port

    async def shutdown(self) -> None:
        """Ordered graceful shutdown; idempotent."""
        if self.stopped.is_set():
            return
        s = self.settings
        if self.housekeeping is not None:  # first: its broker watch could set SERVING again
            self.housekeeping.cancel()
            done, _ = await asyncio.wait({self.housekeeping}, timeout=HOUSEKEEPING_STOP_S)
            if not done:
                log.warning("housekeeping did not stop within %.0fs; shutting down without it",
                            HOUSEKEEPING_STOP_S)
        log.info("shutting down: health NOT_SERVING")
        await self.grpc.set_serving(False)
        log.info("stop consuming; draining the in-flight batch")
        await self.processor.drain(s.shutdown_grace_seconds)
        await self.processor.stop()
        log.info("stopping gRPC (grace %.1fs)", s.shutdown_grace_seconds)
        await self.grpc.stop(s.shutdown_grace_seconds)
        await self.handler.wait_for_training()
        log.info("flushing the producer")
        await self.publisher.stop()
        for follower in self.followers:
            await follower.stop()
        self.metrics.set_serving(False)
        server, _thread = self.metrics_server
        server.shutdown()
        self.handler.close()
        if self.broker is not None:
            log.info("stopping the embedded broker")
            self.broker.stop()
        gc.unfreeze()  # an embedding process (the tests) gets the collector's reach back
        self.stopped.set()
        log.info("stopped")


async def start_service(settings: Settings) -> Service:
    """Start everything (see module docstring) and return the running :class:`Service`."""
    # Everything that can be wrong with the settings fails here, before any side effect (no
    # broker, topic, port or checkpoint write yet): one line per bad value.
    settings.check_environment()
    limit_compute_threads(settings.compute_threads)
    model = initial_model(settings)
    broker = None
    bootstrap = settings.kafka_bootstrap
    if not bootstrap:
        broker = EmbeddedBroker()
        broker.start()
        bootstrap = broker.bootstrap
        log.warning("PAIRSIEVE_KAFKA_BOOTSTRAP is not set: started the embedded tansu broker at %s "
                    "(in-memory, for demos and tests; point it at a real Kafka in production)",
                    bootstrap)
    specs = {settings.topic(t): n for t, n in topic_specs(settings.features_partitions).items()}
    configs = {settings.topic(t): c
               for t, c in topic_configs(settings.max_message_bytes).items()}
    security = settings.kafka_security()  # plaintext for the embedded broker (settings check)
    if settings.kafka_bootstrap:  # a wrong password or CA fails here, by name, before any write
        answered = await check_access(bootstrap, security)
        log.info("Kafka at %s answers (%s)", answered, security.describe())
    await asyncio.to_thread(create_topics, bootstrap, specs, configs=configs, security=security)
    registry = CollectorRegistry()
    metrics = PairsieveMetrics(registry)
    metrics_server = start_metrics_server(registry, settings.metrics_port, settings.metrics_host)
    publisher = KafkaPublisher(bootstrap, settings.topic(REQUESTS_TOPIC),
                               pairs_topic=settings.topic(TRAINING_PAIRS_TOPIC),
                               models_topic=settings.topic(MODELS_TOPIC),
                               decisions_topic=(settings.topic(DECISIONS_TOPIC)
                                                if settings.decision_log else None),
                               modalities=list(settings.dims),
                               max_request_bytes=settings.max_message_bytes,
                               security=security, idempotence=settings.kafka_idempotence)
    await publisher.start()
    roles: dict[str, StreamProcessor] = {}  # the processor exists only after the engine

    def is_trainer() -> bool:
        return "processor" in roles and roles["processor"].owns_labels()

    handler = build_engine(settings, metrics, publisher, model, is_trainer=is_trainer)
    metrics.scorer_device(handler.scorer_device, gpu_expected=settings.gpu_expected)
    metrics.publisher_idempotent(publisher.idempotent)
    followers: list[TopicFollower] = [
        models_follower(bootstrap, settings.topic(MODELS_TOPIC), handler, security),
        pairs_follower(bootstrap, settings.topic(TRAINING_PAIRS_TOPIC), handler, security)]
    if settings.follow_selections:
        followers.insert(0, selection_follower(bootstrap, settings.topic(REQUESTS_TOPIC), handler,
                                               security))
        # after a publish that failed part-way, read the requests back before deciding again
        handler.publish_fence = followers[0].read_to_end
    else:
        log.warning("PAIRSIEVE_FOLLOW_SELECTIONS=0: other workers' selections are ignored "
                    "(near-duplicates may be accepted twice; for measurements only)")
    if settings.decision_log and settings.decision_replay:
        followers.append(decisions_follower(bootstrap, settings.topic(DECISIONS_TOPIC), handler,
                                            settings.decision_replay, security))
    # Nothing is decided before the state is complete: every follower reads its topic to the
    # end first (the newest model, all pairs, every earlier selection and its spend).
    t_replay = time.perf_counter()
    for follower in followers:
        await follower.start()
    if settings.budget_ledger and settings.budget_unit == "items" and settings.budget_total >= 0:
        # one total shared exactly by every worker (README, Scale-out)
        ledger = KafkaBudgetLedger(bootstrap, settings.topic(BUDGET_LEDGER_TOPIC),
                                   settings.budget_total, publisher, worker_id=handler.worker_id,
                                   security=security)
        await ledger.start()
        followers.append(ledger.follower)
        handler.shared_budget = ledger
    for follower in followers:
        await follower.wait_caught_up()
    log.info("state replayed in %.1fs: %d selections, %d training pairs, model version %d",
             time.perf_counter() - t_replay, handler.status().spent,
             handler.learning.pairs_acquired, handler.model_version)
    processor = StreamProcessor(settings, bootstrap, handler, publisher, metrics)
    roles["processor"] = processor
    await processor.start()
    grpc = await start_grpc_server(
        handler, host=settings.grpc_host, port=settings.grpc_port,
        auth_token=settings.auth_token or None, tls_cert=settings.tls_cert_file or None,
        tls_key=settings.tls_key_file or None, max_message_bytes=settings.max_message_bytes,
        metrics=metrics, max_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
        coalesce_max_items=settings.grpc_coalesce_max_items,
        reflection_without_token=bool(settings.grpc_reflection_without_token))
    freeze_startup_objects()
    await grpc.set_serving(True)
    metrics.set_serving(True)
    metrics.engine_state(handler.status())
    log.info("pairsieve serving: gRPC :%d, metrics :%d, kafka %s, worker %s",
             grpc.port, metrics_server[0].server_port, bootstrap, handler.worker_id)
    return Service(settings, bootstrap, handler, metrics, registry, publisher, followers,
                   processor, grpc, metrics_server, broker,
                   housekeeping=asyncio.get_running_loop().create_task(
                       housekeeping(handler, metrics, BrokerWatch(
                           publisher, grpc, metrics, settings.broker_down_after_seconds)),
                       name="housekeeping"))


class BrokerWatch:
    """Health follows the broker: when it has not answered a metadata request for
    ``down_after_s``, gRPC health and ``pairsieve_up`` go NOT_SERVING and ``Submit`` /
    ``ReportAlignment`` answer ``UNAVAILABLE`` at once (nothing could be published); the first
    answer after that restores both. Nothing is lost meanwhile: the stream processor retries
    its publishes and commits no offset it did not decide."""

    def __init__(self, publisher: KafkaPublisher, grpc_server: GrpcServer,
                 metrics: PairsieveMetrics, down_after_s: float, probe_timeout_s: float = 2.0):
        self.publisher, self.grpc, self.metrics = publisher, grpc_server, metrics
        self.down_after_s, self.probe_timeout_s = down_after_s, probe_timeout_s
        self.last_ok = time.monotonic()
        self.down = False

    async def probe(self) -> None:
        if await self.publisher.broker_reachable(self.probe_timeout_s):
            self.last_ok = time.monotonic()
            if self.down:
                self.down = False
                self.grpc.servicer.broker_down_since = None
                await self.grpc.set_serving(True)
                self.metrics.set_serving(True)
                log.warning("the Kafka broker answers again: serving")
        elif not self.down and time.monotonic() - self.last_ok >= self.down_after_s:
            self.down = True
            self.grpc.servicer.broker_down_since = time.time() - self.down_after_s
            await self.grpc.set_serving(False)
            self.metrics.set_serving(False)
            log.error("the Kafka broker has not answered for %.0fs: NOT_SERVING (gRPC calls "
                      "that publish get UNAVAILABLE) until it does", self.down_after_s)


async def housekeeping(handler: SelectionHandler, metrics: PairsieveMetrics,
                       watch: BrokerWatch | None = None, every_s: float = 1.0) -> None:
    """Once a second: start a retrain the trainer role now allows (a worker that just took the
    role over, with pairs no version was trained on yet, trains without waiting for a label),
    refresh the engine gauges (budget spend folded in from other workers, trainer role) and
    probe the broker (:class:`BrokerWatch`)."""
    while True:
        await asyncio.sleep(every_s)
        try:
            handler.learning.maybe_retrain()
            metrics.engine_state(handler.status())
            if watch is not None:
                await watch.probe()
        except Exception:  # never let a gauge refresh take the worker down
            log.exception("housekeeping failed")


def freeze_startup_objects() -> int:
    """Collect once, then move every object alive now (imported modules, the state replayed
    from the topics) out of the cyclic garbage collector's reach (:func:`gc.freeze`), so a full
    collection while serving walks only what was created since: ~300,000 start-up objects made
    one take ~160 ms, in series with every decision waiting meanwhile. Frozen objects are still
    freed by reference counting; only cycles among them stay (none are left: collected first).
    Returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    n = gc.get_freeze_count()
    log.info("froze %d start-up objects out of the garbage collector", n)
    return n


def dump_stacks_on(sig: signal.Signals) -> bool:
    """Make ``sig`` write every thread's Python stack to stderr (:mod:`faulthandler`, at C
    level: it answers even when the event loop or the main thread is stuck). Returns whether it
    could be registered (not where stderr has no file descriptor)."""
    try:
        faulthandler.register(sig, all_threads=True)
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return False
    return True


async def serve_forever(settings: Settings) -> int:
    """``pairsieve serve``: run until SIGTERM/SIGINT, then shut down in order."""
    svc = await start_service(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s received: shutting down", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    dump_stacks_on(STACK_DUMP_SIGNAL)
    await stop.wait()
    t0 = time.perf_counter()
    await svc.shutdown()
    log.info("shutdown took %.2fs", time.perf_counter() - t0)
    return 0
