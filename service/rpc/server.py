"""The gRPC service ``pairsieve.v1.Selector`` over ``grpc.aio``, plus health and reflection.

The servicer is thin: decode (``service.wire.codecs``), delegate to the shared
:class:`~service.handlers.SelectionHandler`, encode, map errors to status codes:

* ``WireError`` / ``ValueError`` (bad input: wrong dimension, NaN, unknown modality, empty batch,
  unknown strategy...) -> ``INVALID_ARGUMENT`` with the message naming the problem; so do bytes
  that are not the method's protobuf message at all (the deserializers are lenient: a
  ``DecodeError`` becomes an :class:`UndecodableRequest`, refused by the method, instead of
  gRPC's ``UNKNOWN`` with a traceback in the log);
* the call's deadline passes while the handler works -> ``DEADLINE_EXCEEDED``; a deadline that
  has already passed, or leaves less than ``min_deadline_s``, is refused before any work starts;
* anything else -> ``INTERNAL`` (logged with its traceback; the client sees only the type).

Deadlines and cancellation never interrupt the handler halfway. The handler publishes accepted
items before committing engine state; cancelling it between the two would leave published
selections uncommitted and its dedup memory without them. So the handler call runs as its own
task: when the deadline passes (or the client cancels) the caller gets its status at once and
the batch still completes; a retry with the same event ids is answered from the dedup memory
(``duplicate=True``) and spends nothing. :meth:`GrpcServer.stop` waits for such work.

Batching: the ``Submit`` and ``SubmitStream`` calls that arrive while the engine decides a batch
are decided together as the next one (:class:`~service.rpc.coalesce.SubmitCoalescer`, at most
``coalesce_max_items`` events; each call still gets exactly its own outcomes and its own input
errors). A call that finds the engine idle is decided at once.

Flow control of ``SubmitStream``: requests are processed one at a time, in order; the next
request message is read only after the previous response was handed to gRPC. Unread messages
stay in gRPC's HTTP/2 flow-control window, so a client that sends faster than the engine decides
is slowed down by the transport (its writes wait) instead of growing a queue in the server.

Other features: standard health checking (``grpc_health.v1.health.aio.HealthServicer``), server
reflection (``grpc_reflection.v1alpha.reflection``), max message sizes (a larger request ends in
``RESOURCE_EXHAUSTED``), optional bearer-token auth (:mod:`service.rpc.auth`), optional TLS and an
optional ``metrics`` object with ``grpc_request(method, code, seconds)`` (and, if it has one,
``grpc_submit_batch(calls)``: the calls of each engine batch).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from service.handlers import SelectionHandler
from service.messages import PartialPublish
from service.rpc.auth import TokenAuthInterceptor
from service.rpc.coalesce import DEFAULT_MAX_ITEMS, SubmitCoalescer
from service.wire import codecs
from service.wire.gen.pairsieve.v1 import pairsieve_pb2 as pb
from service.wire.gen.pairsieve.v1 import pairsieve_pb2_grpc as pb_grpc

log = logging.getLogger("pairsieve.grpc")

# pairsieve.v1.Selector
SELECTOR_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Selector"].full_name
T = TypeVar("T")


class GrpcMetrics(Protocol):
    def grpc_request(self, method: str, code: str, seconds: float) -> None: ...


# --------------------------------------------------------------------------- servicer
class SelectorServicer(pb_grpc.SelectorServicer):
    """``pairsieve.v1.Selector`` over one :class:`SelectionHandler` (see module docstring)."""

    def __init__(self, handler: SelectionHandler, *, min_deadline_s: float = 0.01,
                 coalesce_max_items: int = DEFAULT_MAX_ITEMS,
                 on_batch: Callable[[int], None] | None = None):
        self.handler = handler
        self.coalescer = SubmitCoalescer(handler.submit, max_items=coalesce_max_items,
                                         on_batch=on_batch)
        self.dims = dict(handler.dims)
        self.min_deadline_s = float(min_deadline_s)
        self.serving = False
        self.broker_down_since: float | None = None  # set while the Kafka broker is unreachable
        self._inflight: set[asyncio.Task] = set()

    async def Submit(self, request: pb.SubmitRequest, context) -> pb.SubmitResponse:
        await self._need_broker(context)
        return await self._call(context, lambda: self._submit(request))

    async def SubmitStream(self, request_iterator, context):
        async for request in request_iterator:  # one at a time: see "Flow control" above
            await self._need_broker(context)
            yield await self._call(context, lambda r=request: self._submit(r))

    async def _need_broker(self, context) -> None:
        """``UNAVAILABLE`` at once while the broker is unreachable: accepted items could not be
        published, so the call would only wait for its deadline."""
        if self.broker_down_since is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"the Kafka broker has been unreachable for "
                                f"{time.time() - self.broker_down_since:.0f}s; retry later")

    async def SelectPool(self, request: pb.SelectPoolRequest, context) -> pb.SelectPoolResponse:
        async def work():
            decoded(request)
            ids, mods, vecs = codecs.pool_request_from_proto(request, self.dims)
            picked = await self.handler.select_pool(ids, mods, vecs, request.budget,
                                                    request.strategy or "default", request.seed)
            return pb.SelectPoolResponse(selected_item_ids=picked,
                                         model_version=self.handler.model_version)
        return await self._call(context, work)

    async def ReportAlignment(self, request: pb.ReportAlignmentRequest,
                              context) -> pb.ReportAlignmentResponse:
        await self._need_broker(context)
        async def work():
            decoded(request)
            labels = [codecs.label_from_proto(m, self.dims) for m in request.labels]
            return codecs.label_result_to_proto(await self.handler.report_alignment(labels))
        return await self._call(context, work)

    async def GetStatus(self, request: pb.GetStatusRequest, context) -> pb.ServiceStatus:
        async def work():
            decoded(request)
            return codecs.status_to_proto(self.handler.status(), serving=self.serving)
        return await self._call(context, work)

    # ------------------------------------------------------------------ plumbing
    async def _submit(self, request: pb.SubmitRequest) -> pb.SubmitResponse:
        # decoded = checked (ids, modality, dimension, values): a call that joins a merged batch
        # cannot make it fail for the others
        events = codecs.submit_request_from_proto(decoded(request), self.dims)
        return codecs.submit_response_to_proto(await self.coalescer.submit(events))

    async def _call(self, context, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run ``work`` as its own task within the call's deadline; map its errors."""
        remaining = context.time_remaining()
        if remaining is not None and remaining < self.min_deadline_s:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"deadline too short: {remaining * 1e3:.1f} ms left, at least "
                                f"{self.min_deadline_s * 1e3:.1f} ms needed")
        task = asyncio.get_running_loop().create_task(work())
        self._inflight.add(task)
        task.add_done_callback(self._finished)
        done, _ = await asyncio.wait({task}, timeout=context.time_remaining())
        if not done:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"deadline exceeded after {remaining:.3f}s; the work still "
                                f"completes (a retry with the same event ids is answered as "
                                f"duplicates)")
        exc = task.exception()
        if exc is None:
            return task.result()
        if isinstance(exc, ValueError):  # codecs.WireError included
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if isinstance(exc, PartialPublish):  # the broker failed a publish: retryable
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"publishing to Kafka failed ({exc.cause!r}); retry: the same "
                                "event ids are answered with the verdicts already kept")
        log.error("gRPC call failed", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL,
                            f"internal error ({type(exc).__name__}); see the server log")
        raise AssertionError("unreachable: context.abort raises")  # grpc is untyped: no NoReturn

    def _finished(self, task: asyncio.Task) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and task.exception() is not None:  # marks it retrieved
            log.debug("call work ended with %r", task.exception())

    async def drain(self, timeout_s: float | None) -> None:
        """Wait for work whose callers already gave up (deadline, cancellation)."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout_s)


# --------------------------------------------------------------------------- lenient decoding
class UndecodableRequest:
    """What a lenient deserializer returns for bytes that are not its message (see
    :func:`decoded`)."""

    def __init__(self, message: str, error: str, size: int):
        self.message, self.error, self.size = message, error, size


def _lenient(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return UndecodableRequest(cls.__name__, str(exc), len(data))
    return parse


def decoded(request: T) -> T:
    """``request`` itself, or ``WireError("undecodable")`` naming the message it is not."""
    if isinstance(request, UndecodableRequest):
        raise codecs.WireError("undecodable", f"{request.size} bytes are not a "
                                              f"{request.message} ({request.error})")
    return request


def add_selector_servicer(servicer: SelectorServicer, server) -> None:
    """``pb_grpc.add_SelectorServicer_to_server`` with lenient request deserializers: garbage
    bytes reach the method as an :class:`UndecodableRequest` and get ``INVALID_ARGUMENT``."""
    unary, stream = grpc.unary_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler
    handlers = {
        "Submit": unary(servicer.Submit, request_deserializer=_lenient(pb.SubmitRequest),
                        response_serializer=pb.SubmitResponse.SerializeToString),
        "SubmitStream": stream(servicer.SubmitStream,
                               request_deserializer=_lenient(pb.SubmitRequest),
                               response_serializer=pb.SubmitResponse.SerializeToString),
        "SelectPool": unary(servicer.SelectPool,
                            request_deserializer=_lenient(pb.SelectPoolRequest),
                            response_serializer=pb.SelectPoolResponse.SerializeToString),
        "ReportAlignment": unary(servicer.ReportAlignment,
                                 request_deserializer=_lenient(pb.ReportAlignmentRequest),
                                 response_serializer=pb.ReportAlignmentResponse.SerializeToString),
        "GetStatus": unary(servicer.GetStatus, request_deserializer=_lenient(pb.GetStatusRequest),
                           response_serializer=pb.ServiceStatus.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SELECTOR_SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SELECTOR_SERVICE_NAME, handlers)


# --------------------------------------------------------------------------- metrics interceptor
def _short_method(full: str) -> str:
    return full.rsplit("/", 1)[-1]


def _deadline_passed(context) -> bool:
    left = context.time_remaining()
    return left is not None and left <= 0


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Calls ``metrics.grpc_request(method, code, seconds)`` once per call (``method`` is the
    short RPC name, ``code`` a ``grpc.StatusCode`` name)."""

    def __init__(self, metrics: GrpcMetrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = _short_method(handler_call_details.method)
        kind = ("stream_stream" if handler.request_streaming and handler.response_streaming else
                "stream_unary" if handler.request_streaming else
                "unary_stream" if handler.response_streaming else "unary_unary")
        behavior = getattr(handler, kind)
        wrapped = self._wrap_gen(behavior, method) if inspect.isasyncgenfunction(behavior) \
            else self._wrap_coro(behavior, method)
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(wrapped, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    def _record(self, method: str, context, t0: float, exc: BaseException | None) -> None:
        if exc is None or isinstance(exc, grpc.aio.AbortError):
            code = context.code() or grpc.StatusCode.OK
        elif _deadline_passed(context):
            # The core ends a call whose deadline passed by itself; the handler then sees either
            # a cancellation or, when its own abort races the core's, the failed status write
            # (cygrpc ExecuteBatchError). Either way the client got DEADLINE_EXCEEDED.
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        elif isinstance(exc, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.UNKNOWN
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        try:
            self.metrics.grpc_request(method, name, time.perf_counter() - t0)
        except Exception:  # metrics must never fail a call
            log.exception("metrics.grpc_request failed")

    def _wrap_coro(self, behavior, method):
        async def wrapped(request, context):
            t0, exc = time.perf_counter(), None
            try:
                return await behavior(request, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                self._record(method, context, t0, exc)
        return wrapped

    def _wrap_gen(self, behavior, method):
        async def wrapped(request, context):
            t0, exc = time.perf_counter(), None
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as e:
                exc = e
                raise
            finally:
                self._record(method, context, t0, exc)
        return wrapped


# --------------------------------------------------------------------------- server
@dataclass
class GrpcServer:
    """A started server: ``port`` is the bound port (useful with ``port=0``)."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    servicer: SelectorServicer
    _stopped: bool = field(default=False, repr=False)

    async def set_serving(self, serving: bool) -> None:
        """Health SERVING / NOT_SERVING for the whole server ("") and ``pairsieve.v1.Selector``."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        self.servicer.serving = bool(serving)
        for name in ("", SELECTOR_SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """NOT_SERVING for good, finish calls in flight within ``grace_s``, then close."""
        if self._stopped:
            return
        self._stopped = True
        self.servicer.serving = False
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await self.servicer.drain(grace_s)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_grpc_server(handler: SelectionHandler, *, host: str = "0.0.0.0", port: int = 50051,
                            auth_token: str | None = None, tls_cert: str | None = None,
                            tls_key: str | None = None,
                            max_message_bytes: int = 16 * 1024 * 1024,
                            metrics: GrpcMetrics | Any | None = None,
                            min_deadline_s: float = 0.01,
                            max_concurrent_rpcs: int | None = None,
                            reflection_without_token: bool = False,
                            coalesce_max_items: int = DEFAULT_MAX_ITEMS) -> GrpcServer:
    """Start ``pairsieve.v1.Selector`` (+ health, reflection) and return the running server.

    Health is SERVING once this returns (start the server last, when the engine is ready);
    ``await server.set_serving(False)`` is the first step of a shutdown.
    ``tls_cert`` and ``tls_key`` are PEM file paths (both or neither). ``port=0`` binds a free
    port (see ``GrpcServer.port``). ``max_concurrent_rpcs`` caps the calls in progress (health
    and reflection included); a call beyond it is refused at once with ``RESOURCE_EXHAUSTED``
    (gRPC's own admission control), so overload is answered instead of queued.
    ``coalesce_max_items`` bounds the events of concurrent ``Submit`` calls decided as one engine
    batch (:mod:`service.rpc.coalesce`; 1 = every call alone).
    """
    if bool(tls_cert) != bool(tls_key):
        raise ValueError(f"TLS needs both a certificate and a key, got tls_cert={tls_cert!r}, "
                         f"tls_key={tls_key!r}")
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be > 0, got {max_message_bytes}")
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if metrics is not None:
        interceptors.append(MetricsInterceptor(metrics))  # outermost: also counts auth failures
    if auth_token:
        interceptors.append(TokenAuthInterceptor(auth_token,
                                                 open_reflection=reflection_without_token))
    if max_concurrent_rpcs is not None and max_concurrent_rpcs < 1:
        raise ValueError(f"max_concurrent_rpcs must be >= 1, got {max_concurrent_rpcs}")
    server = grpc.aio.server(interceptors=interceptors,
                             maximum_concurrent_rpcs=max_concurrent_rpcs, options=[
        ("grpc.max_receive_message_length", int(max_message_bytes)),
        ("grpc.max_send_message_length", int(max_message_bytes)),
        ("grpc.so_reuseport", 0),  # a port already taken is an error, not a silent share
    ])
    servicer = SelectorServicer(handler, min_deadline_s=min_deadline_s,
                                coalesce_max_items=coalesce_max_items,
                                on_batch=getattr(metrics, "grpc_submit_batch", None))
    add_selector_servicer(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SELECTOR_SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    try:
        if tls_cert and tls_key:  # both or neither (checked above)
            creds = grpc.ssl_server_credentials(
                [(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot bind gRPC server to {address}: {exc}") from None
    if not bound:
        raise OSError(f"cannot bind gRPC server to {address}")
    await server.start()
    grpc_server = GrpcServer(server, bound, health, servicer)
    await grpc_server.set_serving(True)
    log.info("gRPC %s listening on %s:%d (tls=%s, auth=%s)", SELECTOR_SERVICE_NAME, host, bound,
             bool(tls_cert), bool(auth_token))
    return grpc_server
