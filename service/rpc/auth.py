"""Bearer-token authentication for the gRPC server (``PAIRSIEVE_AUTH_TOKEN``).

Every call must carry the metadata ``authorization: Bearer <token>``; a call without it, or with
another token, ends with ``UNAUTHENTICATED`` before the servicer runs.

The standard health service and server reflection stay open on purpose:

* health is what load balancers and Kubernetes' native gRPC probes call, and those cannot attach
  credentials; a probe that fails on auth would take a healthy pod out of rotation;
* reflection only describes the schema, which is public anyway (``protos/``); keeping it open lets
  ``grpcurl`` list and describe the service before a token is configured on the client.

Neither reveals or changes engine state. Without TLS the token travels in clear text: configure
``tls_cert``/``tls_key`` (or terminate TLS in front of the service) when the network is not trusted.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

HEALTH_PREFIXES = ("/grpc.health.v1.Health/",)
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def rejecting_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode,
                      details: str) -> grpc.RpcMethodHandler:
    """A method handler of the same kind as ``handler`` that ends every call with ``code``."""

    async def reject(_request_or_iterator, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject, **kw)
    return grpc.unary_unary_rpc_method_handler(reject, **kw)


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry of ``metadata``, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the configured bearer token (health excepted, and reflection when
    ``open_reflection``)."""

    def __init__(self, token: str, open_reflection: bool = False):
        if not token:
            raise ValueError("TokenAuthInterceptor needs a non-empty token")
        self._token = token.encode()
        self._open = HEALTH_PREFIXES + (REFLECTION_PREFIXES if open_reflection else ())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._open):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is not None and hmac.compare_digest(token.encode(), self._token):
            return handler
        why = "missing" if token is None else "invalid"
        return rejecting_handler(
            handler, grpc.StatusCode.UNAUTHENTICATED,
            f"{why} bearer token: send metadata 'authorization: Bearer <token>'")
