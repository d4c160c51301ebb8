"""Service configuration: the one reader of ``PAIRSIEVE_*`` environment variables.

Every setting has an environment variable (units in the name) and a ``pairsieve serve`` flag;
flags win over the environment, the environment over the defaults. Fixed names from the
contract: ``PAIRSIEVE_KAFKA_BOOTSTRAP`` (unset: start the embedded broker),
``PAIRSIEVE_GRPC_PORT`` (50051), ``PAIRSIEVE_METRICS_PORT`` (9464), ``PAIRSIEVE_AUTH_TOKEN``
(unset: no auth).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

ENV_PREFIX = "PAIRSIEVE_"


def parse_modalities(spec: str) -> dict[str, int]:
    """``"image:512,text:384"`` -> ``{"image": 512, "text": 384}`` (exactly two)."""
    out: dict[str, int] = {}
    for part in spec.split(","):
        name, _, dim = part.strip().partition(":")
        if not name or not dim.isdigit() or int(dim) <= 0:
            raise ValueError(f"bad modality spec {part!r} in {spec!r}; expected NAME:DIM,NAME:DIM")
        if name in out:
            raise ValueError(f"modality {name!r} given twice in {spec!r}")
        out[name] = int(dim)
    if len(out) != 2:
        raise ValueError(f"exactly two modalities are needed, got {list(out)} from {spec!r}")
    return out


@dataclass(frozen=True)
class Settings:
    """All runtime settings. Field ``x`` is read from ``PAIRSIEVE_X`` and ``--x``."""

    kafka_bootstrap: str = ""  # empty: start the embedded tansu broker
    grpc_port: int = 50051
    grpc_host: str = "0.0.0.0"
    metrics_port: int = 9464
    metrics_host: str = "0.0.0.0"
    auth_token: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    modalities: str = "image:512,text:384"
    worker_id: str = ""  # empty: hostname-pid
    group_id: str = "pairsieve"
    topic_suffix: str = ""  # appended to every topic name (tests, isolated demos)
    features_partitions: int = 4
    batch_max_items: int = 256
    max_wait_seconds: float = 0.05
    max_message_bytes: int = 16 * 1024 * 1024
    budget_total: int = -1  # -1: unlimited
    target_rate: float = 0.05
    explore_fraction: float = 0.05
    warmup_accepts: int = 50
    cache_capacity: int = 4096
    index_size: int = 4096
    embedding_dim: int = 64
    uncertainty: str = "least_confidence"
    retrain_every_pairs: int = 25
    candidates_k: int = 5
    follow_selections: int = 1  # 1: fold in every worker's selections (scale-out); 0: only own
    model_dir: str = ""  # empty: no checkpoints
    device: str = ""  # empty: cuda when available, else cpu
    seed: int = 0
    shutdown_grace_seconds: float = 10.0
    rebalance_timeout_seconds: float = 10.0
    # tansu holds a group join for about half the session timeout; 3 s keeps joins ~2 s there
    # and is still safe against short stalls. Raise it for a real Kafka under heavy load.
    session_timeout_seconds: float = 3.0
    # faust hard-codes 1500 ms for its consumer; a broker that holds a fetch until then (tansu
    # holds about half of it) adds that to every decision latency. 50 ms: on a real Kafka a fetch
    # returns as soon as data is there, so this only sets how often an idle consumer re-asks.
    fetch_max_wait_seconds: float = 0.05
    # torch intra-op and BLAS threads of the engine; 1 = one core per worker (scale out with
    # workers and partitions: the engine's small per-batch matmuls gain little from threads)
    compute_threads: int = 1
    log_level: str = "INFO"

    def __post_init__(self):
        parse_modalities(self.modalities)
        for name in ("grpc_port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be a port number, got {getattr(self, name)}")
        if not 0 < self.target_rate <= 1:
            raise ValueError(f"target_rate must be in (0, 1], got {self.target_rate}")
        if self.compute_threads < 1:
            raise ValueError(f"compute_threads must be >= 1, got {self.compute_threads}")
        if not 0 < self.fetch_max_wait_seconds <= 30:
            raise ValueError("fetch_max_wait_seconds must be in (0, 30], got "
                             f"{self.fetch_max_wait_seconds}")
        if self.batch_max_items < 1 or self.max_wait_seconds <= 0:
            raise ValueError("batch_max_items must be >= 1 and max_wait_seconds > 0")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("TLS needs both PAIRSIEVE_TLS_CERT_FILE and PAIRSIEVE_TLS_KEY_FILE")

    @property
    def dims(self) -> dict[str, int]:
        return parse_modalities(self.modalities)

    @property
    def effective_worker_id(self) -> str:
        return self.worker_id or f"{os.uname().nodename}-{os.getpid()}"

    def topic(self, base: str) -> str:
        return base + self.topic_suffix

    @staticmethod
    def env_name(field_name: str) -> str:
        return ENV_PREFIX + field_name.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Defaults <- ``PAIRSIEVE_*`` environment <- ``overrides`` (e.g. parsed flags)."""
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get(cls.env_name(f.name))
            if raw is not None:
                values[f.name] = _convert(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One ``--flag`` per field (default None, so the environment is not overridden)."""
        for f in fields(cls):
            typ = {"int": int, "float": float}.get(f.type, str)
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=typ,
                                default=None, help=f"env {cls.env_name(f.name)} "
                                                   f"(default {f.default!r})")


def _convert(name: str, typ: str, raw: str):
    try:
        if typ == "int":
            return int(raw)
        if typ == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"{Settings.env_name(name)}={raw!r} is not a valid {typ}") from None
    return raw
