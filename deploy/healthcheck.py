#!/usr/bin/env python3
"""Container health probe: exit 0 when pairsieve's gRPC health service says SERVING.

Used by the Dockerfile ``HEALTHCHECK`` and the compose healthchecks (Kubernetes uses its native
``grpc:`` probe instead). It asks the standard ``grpc.health.v1.Health/Check`` on
``localhost:$PAIRSIEVE_GRPC_PORT`` (default 50051) for the whole server (service ``""``).
Health stays open when ``PAIRSIEVE_AUTH_TOKEN`` is set, so no token is needed. With
``PAIRSIEVE_TLS_CERT_FILE`` set the probe speaks TLS and trusts that certificate; set
``HEALTHCHECK_TLS_SERVER_NAME`` when the certificate is not issued for ``localhost``.

Exit codes: 0 SERVING, 1 any other status (NOT_SERVING during start-up and shutdown), 2 the
server could not be reached or the call failed.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING, NOT_SERVING, UNREACHABLE = 0, 1, 2


def probe(host: str = "localhost", port: int | None = None, *, service: str = "",
          timeout_s: float = 3.0, tls_cert_file: str | None = None,
          tls_server_name: str | None = None) -> int:
    """One ``Health/Check`` call; returns the exit code (see module docstring)."""
    if port is None:
        port = int(os.environ.get("PAIRSIEVE_GRPC_PORT") or 50051)
    target = f"{host}:{port}"
    if tls_cert_file:
        with open(tls_cert_file, "rb") as fh:
            creds = grpc.ssl_channel_credentials(root_certificates=fh.read())
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target)
    try:
        resp = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        print(f"unhealthy: {target} {code}", file=sys.stderr)
        return UNREACHABLE
    finally:
        channel.close()
    if resp.status == health_pb2.HealthCheckResponse.SERVING:
        return SERVING
    print(f"unhealthy: {target} status "
          f"{health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}", file=sys.stderr)
    return NOT_SERVING


def main() -> int:
    return probe(os.environ.get("HEALTHCHECK_HOST", "localhost"),
                 tls_cert_file=os.environ.get("PAIRSIEVE_TLS_CERT_FILE") or None,
                 tls_server_name=os.environ.get("HEALTHCHECK_TLS_SERVER_NAME") or None)


if __name__ == "__main__":
    sys.exit(main())
