"""Service configuration: the one reader of ``PAIRSIEVE_*`` environment variables.

Every setting has an environment variable (units in the name) and a ``pairsieve serve`` flag;
flags win over the environment, the environment over the defaults. Fixed names from the
contract: ``PAIRSIEVE_KAFKA_BOOTSTRAP`` (unset: start the embedded broker),
``PAIRSIEVE_GRPC_PORT`` (50051), ``PAIRSIEVE_METRICS_PORT`` (9464), ``PAIRSIEVE_AUTH_TOKEN``
(unset: no auth).

**One source for every default.** The engine's knobs take their defaults from the core
dataclasses (:class:`~service.core.selector.SelectorConfig`,
:class:`~service.core.budget.BudgetConfig`, :class:`~service.core.acquisition.AcquisitionConfig`,
:class:`~service.alignment.TrainerConfig`), read with :func:`dataclasses.fields`, never copied
as literals; :meth:`Settings.selector_config` and :meth:`Settings.trainer_config` build the
engine's configs from the settings, so what the benchmark measures as the stream ``default``
(``SelectorConfig()`` and ``TrainerConfig()`` defaults) is what a deployment runs. Only the
deployment's own values are set here: the budget (``budget_total``, ``target_rate``), the
cold-start warm-up (:data:`~service.core.budget.TUNED_WARMUP_ACCEPTS`) and the random tail's
share (:data:`~service.core.budget.TUNED_RANDOM_AFTER`), both shared with the simulator.

**Validated before anything starts.** :class:`Settings` checks every value when it is built
(one line per bad value, naming the variable and flag, echoing the value and saying what is
allowed: :class:`SettingsError`); :meth:`Settings.check_environment` checks what needs the
machine (the torch device exists, the model directory and TLS files are usable). The runtime
calls both before the embedded broker starts, topics are created or ports open.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, cast

from service.alignment.quality_gate import GateConfig
from service.alignment.trainer import TrainerConfig
from service.core.acquisition import AcquisitionConfig
from service.core.budget import TUNED_RANDOM_AFTER, TUNED_WARMUP_ACCEPTS, BudgetConfig
from service.core.selector import SelectorConfig
from service.learning_loop import (
    DEFAULT_GAIN_HORIZON,
    DEFAULT_RETRAIN_EVERY,
    DEFAULT_VALIDATION_SHARE,
)
from service.rpc.coalesce import DEFAULT_MAX_ITEMS
from service.streaming.security import MECHANISMS, PROTOCOLS, KafkaSecurity

ENV_PREFIX = "PAIRSIEVE_"
UNCERTAINTIES = ("least_confidence", "margin", "entropy")
LEARNERS = ("cca", "ridge", "auto")
NORMALIZATIONS = ("zscore", "rank")
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
IDEMPOTENCE_MODES = ("auto", "on", "off")
_DEVICE_RE = re.compile(r"^(|auto|cpu|cuda|cuda:\d+)$")
# Settings whose value is one field of AcquisitionConfig (same name), in its order.
ACQUISITION_FIELDS = tuple(f.name for f in fields(AcquisitionConfig))


class SettingsError(ValueError):
    """One or more bad settings; ``errors`` holds one line per bad value."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


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


def core_default(cls, name: str):
    """The default of field ``name`` of the dataclass ``cls`` (the one source of that value)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            break
    raise LookupError(f"{cls.__name__} has no field {name!r} with a default")


def _s(default, help: str, *, allowed: str = "", check=None, secret: bool = False):
    """A setting: its default, its meaning (``--help``, README), and an optional check
    (``check(value) -> bool``; ``allowed`` says in words what passes). A ``secret`` is left out
    of ``repr`` (and has no check, so no error message ever echoes it)."""
    return field(default=default, repr=not secret,
                 metadata={"help": help, "allowed": allowed, "check": check})


def _from(cls, name: str, help: str, **kw):
    """A setting whose default is ``cls``'s field ``name``'s default."""
    return _s(core_default(cls, name), help, **kw)


def _port(v) -> bool:
    return isinstance(v, int) and 0 <= v <= 65535


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _non_negative_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _non_negative(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v >= 0


def _fraction(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1


def _rate(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1


def _modalities(v) -> bool:
    try:
        parse_modalities(v)
    except ValueError:
        return False
    return True


PORT = "0 (pick a free port) or 1-65535"
POS_INT = "an integer >= 1"
NONNEG_INT = "an integer >= 0"
POS = "a number > 0"
NONNEG = "a number >= 0"
FRACTION = "a number in [0, 1]"
RATE = "a number in (0, 1]"
_A = AcquisitionConfig


@dataclass(frozen=True)
class Settings:
    """All runtime settings. Field ``x`` is read from ``PAIRSIEVE_X`` and ``--x``.

    Raises :class:`SettingsError` (a ``ValueError``) naming every bad value.
    """

    kafka_bootstrap: str = _s("", "Kafka bootstrap servers; unset = start the embedded tansu "
                                  "broker (demos/tests)")
    kafka_security_protocol: str = _s("PLAINTEXT", "how every Kafka client connects: PLAINTEXT, "
                                                   "SSL (TLS), SASL_PLAINTEXT or SASL_SSL (user "
                                                   "name and password, over TLS)",
                                      allowed=", ".join(PROTOCOLS),
                                      check=lambda v: v in PROTOCOLS)
    kafka_sasl_mechanism: str = _s("", "SASL mechanism (SASL protocols): PLAIN, SCRAM-SHA-256 "
                                       "or SCRAM-SHA-512",
                                   allowed=", ".join(MECHANISMS) + " (or unset)",
                                   check=lambda v: v in ("", *MECHANISMS))
    kafka_sasl_username: str = _s("", "SASL user name")
    kafka_sasl_password: str = _s("", "SASL password (from a secret; never logged)",
                                  secret=True)
    kafka_ssl_cafile: str = _s("", "PEM CA file the broker's certificate is checked against "
                                   "(TLS protocols; unset = the system trust store); must exist")
    kafka_ssl_certfile: str = _s("", "PEM client certificate for mutual TLS (with "
                                     "KAFKA_SSL_KEYFILE); must exist")
    kafka_ssl_keyfile: str = _s("", "PEM client key for mutual TLS; must exist")
    kafka_ssl_check_hostname: int = _s(1, "1: the broker's certificate must name the host "
                                          "connected to; 0: any host (testing only)",
                                       allowed="0 or 1", check=lambda v: v in (0, 1))
    kafka_idempotence: str = _s("auto", "idempotent publisher (a request, pair or decision the "
                                        "broker wrote is never written twice by the producer's "
                                        "own retry after a lost acknowledgement): auto = on "
                                        "where the broker supports it, else off with a warning; "
                                        "on = refuse to start without it; off",
                                allowed="auto, on, off", check=lambda v: v in IDEMPOTENCE_MODES)
    grpc_port: int = _s(50051, "gRPC port (0 = pick a free one)", allowed=PORT, check=_port)
    grpc_host: str = _s("0.0.0.0", "gRPC bind address")
    grpc_max_concurrent_rpcs: int = _s(64, "gRPC calls handled at once; more are refused with "
                                           "RESOURCE_EXHAUSTED (back-pressure: retry later)",
                                       allowed=POS_INT, check=_positive_int)
    grpc_coalesce_max_items: int = _s(DEFAULT_MAX_ITEMS,
                                      "events of concurrent gRPC Submit calls decided as one "
                                      "engine batch, at most (calls are never split; 1 = every "
                                      "call alone)",
                                      allowed=POS_INT, check=_positive_int)
    metrics_port: int = _s(9464, "Prometheus `/metrics` port (0 = pick a free one)",
                           allowed=PORT, check=_port)
    metrics_host: str = _s("0.0.0.0", "metrics bind address")
    auth_token: str = _s("", "unset = no auth; else clients send `authorization: Bearer <token>`")
    grpc_reflection_without_token: int = _s(0, "with an auth token set: 1 leaves gRPC server "
                                               "reflection open (it describes the public "
                                               "schema only), 0 requires the token for it too",
                                            allowed="0 or 1", check=lambda v: v in (0, 1))
    tls_cert_file: str = _s("", "PEM certificate (with TLS_KEY_FILE: gRPC over TLS); must exist")
    tls_key_file: str = _s("", "PEM private key; must exist")
    modalities: str = _s("image:512,text:384", "the two modalities and their feature dimensions, "
                                               "`NAME:DIM,NAME:DIM`",
                         allowed="two distinct NAME:DIM (DIM >= 1), e.g. image:512,text:384",
                         check=_modalities)
    worker_id: str = _s("", "this worker's name (default hostname-pid); tags its requests")
    group_id: str = _s("pairsieve", "Kafka consumer group of the workers",
                       allowed="a non-empty name", check=bool)
    topic_suffix: str = _s("", "appended to every topic name (isolated test/demo topics)")
    features_partitions: int = _s(4, "partitions of the features (and requests) topic when "
                                     "pairsieve creates it", allowed=POS_INT, check=_positive_int)
    batch_max_items: int = _s(256, "micro-batch size bound", allowed=POS_INT, check=_positive_int)
    # A micro-batch closes when full, when nothing came in for batch_idle_seconds, or
    # max_wait_seconds after its first event (service/streaming/take.py): full batches under
    # load, ~2 ms added at low load (a fixed wait of 50 ms put the p99 at half load at ~200 ms)
    max_wait_seconds: float = _s(0.05, "micro-batch time bound: longest a micro-batch stays "
                                       "open after its first event",
                                 allowed=POS, check=_positive)
    batch_idle_seconds: float = _s(0.002, "a micro-batch to which nothing was added for this "
                                          "long is decided (<= the time bound)",
                                   allowed=POS, check=_positive)
    max_message_bytes: int = _s(16 * 1024 * 1024, "largest gRPC message / Kafka record accepted "
                                                  "(bigger -> dead letter / RESOURCE_EXHAUSTED)",
                                allowed=POS_INT, check=_positive_int)
    # The deployment's budget: not engine defaults (the benchmark sets both from its budget and
    # stream length), so they live here.
    budget_total: int = _s(-1, "alignments to request in total (budget unit cost: cost units to "
                               "spend); -1 = unlimited",
                           allowed="-1 (unlimited) or an integer >= 0",
                           check=lambda v: isinstance(v, int) and v >= -1)
    budget_unit: str = _s("items", "what budget_total counts: items (alignment requests) or "
                                   "cost (the AlignmentLabel.cost of the answers: each request "
                                   "spends its modality's expected cost, and a modality is chosen "
                                   "by utility per unit of cost)", allowed="items or cost",
                          check=lambda v: v in ("items", "cost"))
    target_rate: float = _s(0.05, "target acceptance rate (share of the stream sent for "
                                  "alignment)", allowed=RATE, check=_rate)
    explore_fraction: float = _from(BudgetConfig, "explore", "share of the target rate spent on "
                                    "random exploration", allowed=FRACTION, check=_fraction)
    warmup_accepts: int = _s(TUNED_WARMUP_ACCEPTS, "random accepts before utilities are trusted "
                             "(cold start)", allowed=NONNEG_INT, check=_non_negative_int)
    random_after: float = _s(TUNED_RANDOM_AFTER,
                             "share of budget_total spent by utility; the rest is accepted at "
                             "random (the random tail: coverage pays early, costs late); 1: "
                             "utility to the end; of the cost budget with budget unit cost; "
                             "no effect without a budget",
                             allowed=RATE, check=_rate)
    threshold_window: int = _from(BudgetConfig, "window", "recent utilities the acceptance "
                                  "threshold (a quantile) is taken over", allowed=POS_INT,
                                  check=_positive_int)
    cache_capacity: int = _from(SelectorConfig, "cache_capacity", "C: selected vectors kept per "
                                "modality (diversity)", allowed=POS_INT, check=_positive_int)
    cache_half_life: float = _s(0.0 if core_default(SelectorConfig, "cache_half_life") is None
                                else core_default(SelectorConfig, "cache_half_life"),
                                "drift: items offered after which a selected vector's distance "
                                "counts double (its region re-opens with age); 0: no decay",
                                allowed=NONNEG, check=_non_negative)
    index_size: int = _from(SelectorConfig, "index_size", "K: recent items per modality scored "
                            "against", allowed=POS_INT, check=_positive_int)
    embedding_dim: int = _from(TrainerConfig, "dim_out", "k: dimension of the shared embedding "
                               "space (even unless the learner is cca: half per ridge map)",
                               allowed=POS_INT, check=_positive_int)
    learner: str = _from(TrainerConfig, "method", "alignment learner: cca (whitened ridge CCA), "
                         "ridge (two ridge maps, a->b and b->a, lambda by leave-one-out; a pair "
                         "scores the mean of both cosines) or auto (the better of both by "
                         "cross-validation on the acquired pairs)",
                         allowed="cca, ridge or auto", check=lambda v: v in LEARNERS)
    self_learning: str = _from(TrainerConfig, "self_learning", "grow the training set with "
                               "mutual-nearest pseudo-pairs among the unpaired items: auto (kept "
                               "when cross-validation on the acquired pairs prefers it), on, off",
                               allowed="auto, on or off",
                               check=lambda v: v in ("auto", "on", "off"))
    uncertainty: str = _from(SelectorConfig, "uncertainty", "uncertainty measure: " +
                             ", ".join(UNCERTAINTIES), allowed=", ".join(UNCERTAINTIES),
                             check=lambda v: v in UNCERTAINTIES)
    # Acquisition (utility = w_u * norm(u) + w_d * norm(div) + w_t * norm(typ) + w_c * coverage)
    uncertainty_weight: float = _from(_A, "uncertainty_weight", "w_u: weight of the normalised "
                                      "uncertainty in the utility", allowed=NONNEG,
                                      check=_non_negative)
    diversity_weight: float = _from(_A, "diversity_weight", "w_d: weight of the normalised "
                                    "diversity (distance to the selected set)", allowed=NONNEG,
                                    check=_non_negative)
    coverage_weight: float = _from(_A, "coverage_weight", "w_c: weight of the bonus of the "
                                   "under-covered modality", allowed=NONNEG, check=_non_negative)
    typicality_weight: float = _from(_A, "typicality_weight", "w_t: weight of the normalised "
                                     "typicality (mean cosine to the k nearest recent items of "
                                     "the same modality; prefers dense regions over outliers)",
                                     allowed=NONNEG, check=_non_negative)
    typicality_k: int = _from(_A, "typicality_k", "neighbours averaged by typicality",
                              allowed=POS_INT, check=_positive_int)
    normalization: str = _from(_A, "normalization", "per-modality score normalisation: zscore "
                               "(EW mean/variance) or rank (empirical CDF over a window)",
                               allowed=" or ".join(NORMALIZATIONS),
                               check=lambda v: v in NORMALIZATIONS)
    zscore_alpha: float = _from(_A, "zscore_alpha", "EW factor per item of the zscore "
                                "normalisation", allowed=RATE, check=_rate)
    rank_window: int = _from(_A, "rank_window", "values the rank normalisation's CDF is taken "
                             "over", allowed=POS_INT, check=_positive_int)
    coverage_alpha: float = _from(_A, "coverage_alpha", "EW factor per item of the coverage "
                                  "signal (mean distance to the selected set)", allowed=RATE,
                                  check=_rate)
    quotas: bool = _from(_A, "quotas", "1: per-modality acquisition quotas from the modality "
                         "discrepancy (an accept above its share is vetoed); 0: none",
                         allowed="0 or 1", check=lambda v: v in (0, 1))
    quota_gamma: float = _from(_A, "quota_gamma", "quotas: how strongly the discrepancy moves "
                               "the shares", allowed=NONNEG, check=_non_negative)
    quota_min_share: float = _from(_A, "quota_min_share", "quotas: smallest share a modality "
                                   "keeps", allowed="a number in [0, 0.5]",
                                   check=lambda v: _fraction(v) and v <= 0.5)
    quota_tolerance: float = _from(_A, "quota_tolerance", "quotas: share a modality may exceed "
                                   "its quota by", allowed=FRACTION, check=_fraction)
    quota_min_accepts: int = _from(_A, "quota_min_accepts", "quotas: accepts before quotas apply",
                                   allowed=NONNEG_INT, check=_non_negative_int)
    retrain_every_pairs: int = _s(DEFAULT_RETRAIN_EVERY, "new MATCH pairs between two retrains",
                                  allowed=POS_INT, check=_positive_int)
    validation_share: float = _s(DEFAULT_VALIDATION_SHARE, "share of the acquired pairs held out "
                                 "(by a hash of the pair) to gate and measure model versions; "
                                 "never trained on", allowed="a number in [0, 0.5]",
                                 check=lambda v: _fraction(v) and v <= 0.5)
    gate_tolerance: float = _from(GateConfig, "tolerance", "quality gate: largest validation R@1 "
                                  "drop a new model version may show and still be swapped in",
                                  allowed=FRACTION, check=_fraction)
    gate_min_pairs: int = _from(GateConfig, "min_pairs", "quality gate: validation pairs needed "
                                "before it rejects a version", allowed=NONNEG_INT,
                                check=_non_negative_int)
    gain_horizon_pairs: int = _s(DEFAULT_GAIN_HORIZON, "stopping signal: N of the expected "
                                 "validation R@1 gain of the next N pairs (GetStatus, "
                                 "pairsieve_expected_recall_gain)", allowed=POS_INT,
                                 check=_positive_int)
    candidates_k: int = _s(5, "partner candidates attached to each request", allowed=NONNEG_INT,
                           check=_non_negative_int)
    follow_selections: int = _s(1, "1: fold in every worker's selections (scale-out); 0: own "
                                   "only", allowed="0 or 1", check=lambda v: v in (0, 1))
    budget_ledger: int = _s(1, "1: with a budget total in items, every accept is reserved on "
                               "the one-partition budget ledger before it is requested (an "
                               "exact total shared by all workers; one round trip per batch "
                               "with accepts); 0: each worker counts the selections it has "
                               "seen (two workers can overshoot by the accepts in flight)",
                            allowed="0 or 1", check=lambda v: v in (0, 1))
    decision_log: int = _s(1, "1: publish every decision (accept and skip, components, "
                              "threshold, model version, reason, worker) to "
                              "pairsieve.decisions.v1 (`pairsieve explain`); 0: off",
                           allowed="0 or 1", check=lambda v: v in (0, 1))
    decision_replay: int = _s(2_000, "decision-log records per partition replayed at start-up "
                                     "(a redelivered skipped event gets its earlier verdict); "
                                     "a record holds one engine batch, up to "
                                     "PAIRSIEVE_BATCH_MAX_ITEMS decisions (one in logs written "
                                     "before 2026-12-07); 0: none",
                              allowed=NONNEG_INT, check=_non_negative_int)
    model_dir: str = _s("", "checkpoint directory (loaded at start, written on every new "
                            "version; created with the first checkpoint); unset = none")
    device: str = _s("", "torch device: cpu, cuda, cuda:N, or auto (unset = auto: cuda when "
                         "available, else cpu); cuda on a machine without CUDA scores on the "
                         "CPU with a warning and pairsieve_scorer_gpu_fallback = 1",
                     allowed="cpu, cuda, cuda:N or auto (or unset)",
                     check=lambda v: bool(_DEVICE_RE.match(v)))
    seed: int = _s(0, "seed of every random choice", allowed=NONNEG_INT,
                   check=_non_negative_int)
    shutdown_grace_seconds: float = _s(10.0, "time allowed to drain the in-flight batch and "
                                             "finish gRPC calls", allowed=NONNEG,
                                       check=_non_negative)
    broker_down_after_seconds: float = _s(10.0, "the Kafka broker unanswered this long -> health "
                                                "NOT_SERVING and gRPC calls that publish get "
                                                "UNAVAILABLE, until it answers again",
                                          allowed=POS, check=_positive)
    rebalance_timeout_seconds: float = _s(10.0, "Kafka consumer-group rebalance timeout",
                                          allowed=POS, check=_positive)
    # tansu holds a group join for about half the session timeout; 3 s keeps joins ~2 s there
    # and is still safe against short stalls. Raise it for a real Kafka under heavy load.
    session_timeout_seconds: float = _s(3.0, "Kafka consumer session timeout (tansu holds a "
                                             "join ~half of it)", allowed=POS, check=_positive)
    # faust hard-codes 1500 ms for its consumer; a broker that holds a fetch until then (tansu
    # holds about half of it) adds that to every decision latency. 50 ms: on a real Kafka a fetch
    # returns as soon as data is there, so this only sets how often an idle consumer re-asks.
    fetch_max_wait_seconds: float = _s(0.05, "longest a Kafka fetch of the features consumer may "
                                             "wait for data (faust's fixed 1.5 s is overridden: "
                                             "tansu holds a fetch ~half of it, which every "
                                             "decision latency would include)",
                                       allowed="a number in (0, 30]",
                                       check=lambda v: _positive(v) and v <= 30)
    # Kafka's default (1 MiB) returns few events per fetch once large records are mixed in (an
    # oversized poison record of 2 x 64 KiB takes the room of ~600 events). On the chaos suite's
    # poison mix the difference between 1, 4 and 16 MiB was within this machine's noise (a
    # one-off exploration, 3 interleaved pairs each; `make chaos` reports the 4 MiB figure).
    # 4 MiB stays (it cannot hurt: a broker response is capped at 50 MB in all). A record larger
    # than this is still returned whole (Kafka's rule).
    fetch_max_partition_bytes: int = _s(4 << 20, "most bytes one fetch of the features "
                                                 "consumer takes from one partition (a record "
                                                 "larger than this still arrives)",
                                        allowed=POS_INT, check=_positive_int)
    # torch intra-op and BLAS threads of the engine; 1 = one core per worker (scale out with
    # workers and partitions: the engine's small per-batch matmuls gain little from threads)
    compute_threads: int = _s(1, "torch intra-op and BLAS (numpy) threads of the engine; scale "
                                 "out with workers instead", allowed=POS_INT,
                              check=_positive_int)
    log_level: str = _s("INFO", "Python log level", allowed=", ".join(LOG_LEVELS),
                        check=lambda v: v in LOG_LEVELS)

    def __post_init__(self):
        errors = self.problems()
        if errors:
            raise SettingsError(errors)

    # ------------------------------------------------------------------ validation
    def problems(self) -> list[str]:
        """One line per bad value (empty when every value is allowed)."""
        errors = []
        for f in fields(self):
            check = f.metadata.get("check")
            value = getattr(self, f.name)
            if check is not None and not check(value):
                errors.append(self.describe_bad(f.name, value, f.metadata["allowed"]))
        if self.grpc_port == self.metrics_port != 0 and _port(self.grpc_port):
            errors.append(f"{self.env_name('grpc_port')} (--grpc-port) and "
                          f"{self.env_name('metrics_port')} (--metrics-port) are both "
                          f"{self.grpc_port!r}: expected two different ports (or 0 = pick a "
                          "free one)")
        if (_positive(self.batch_idle_seconds) and _positive(self.max_wait_seconds)
                and self.batch_idle_seconds > self.max_wait_seconds):
            errors.append(f"{self.env_name('batch_idle_seconds')} (--batch-idle-seconds) = "
                          f"{self.batch_idle_seconds!r} is longer than "
                          f"{self.env_name('max_wait_seconds')} (--max-wait-seconds) = "
                          f"{self.max_wait_seconds!r}: expected idle <= the time bound")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            errors.append("TLS needs both PAIRSIEVE_TLS_CERT_FILE (--tls-cert-file) and "
                          "PAIRSIEVE_TLS_KEY_FILE (--tls-key-file); got only "
                          + ("the certificate" if self.tls_cert_file else "the key"))
        if (self.learner != "cca" and isinstance(self.embedding_dim, int)
                and self.embedding_dim % 2):
            errors.append(f"{self.env_name('embedding_dim')} (--embedding-dim) = "
                          f"{self.embedding_dim!r}: expected an even number with learner "
                          f"{self.learner!r} (half of the space per ridge map), or learner cca")
        if not any(e.startswith("PAIRSIEVE_KAFKA_S") for e in errors):
            try:
                security = self.kafka_security()
            except ValueError as exc:
                errors.append(f"Kafka security settings (PAIRSIEVE_KAFKA_SECURITY_PROTOCOL, "
                              f"_SASL_*, _SSL_*): {exc}")
            else:
                if security != KafkaSecurity() and not self.kafka_bootstrap:
                    errors.append("Kafka security settings need PAIRSIEVE_KAFKA_BOOTSTRAP "
                                  "(--kafka-bootstrap): the embedded broker is plaintext only")
        if not errors:  # the core's own checks (a backstop: the rules above cover them)
            try:
                self.selector_config()
                self.trainer_config()
            except ValueError as exc:
                errors.append(f"settings make no valid engine config: {exc}")
        return errors

    @classmethod
    def describe_bad(cls, name: str, value, allowed: str) -> str:
        return (f"{cls.env_name(name)} ({cls.flag_name(name)}) = {value!r}: expected {allowed}")

    def check_environment(self) -> None:
        """Check what needs the machine: the torch device exists, the model directory is usable
        (or can be created), the TLS files are readable. Raises :class:`SettingsError`.

        No side effect (nothing is created, no device memory allocated).
        """
        errors = []
        dev = self.device
        if dev.startswith("cuda"):
            import torch

            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(dev.partition(":")[2] or 0)
            # n == 0: no GPU at all (a node that lost its driver, a CPU-only image) is not a
            # settings error: the worker scores on the CPU and says so (resolve_device)
            if 0 < n <= index:
                errors.append(f"{self.env_name('device')} (--device) = {dev!r}: only {n} CUDA "
                              f"device(s) here (cuda:0..cuda:{n - 1})")
        if self.model_dir:
            problem = _dir_problem(Path(self.model_dir))
            if problem:
                errors.append(f"{self.env_name('model_dir')} (--model-dir) = "
                              f"{self.model_dir!r}: {problem}")
        for name in ("tls_cert_file", "tls_key_file", "kafka_ssl_cafile", "kafka_ssl_certfile",
                     "kafka_ssl_keyfile"):
            path = getattr(self, name)
            if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                errors.append(f"{self.env_name(name)} ({self.flag_name(name)}) = {path!r}: "
                              "no such readable file")
        if errors:
            raise SettingsError(errors)

    def kafka_security(self) -> KafkaSecurity:
        """The security of every Kafka client (raises ``ValueError`` when inconsistent)."""
        return KafkaSecurity(protocol=self.kafka_security_protocol,
                             sasl_mechanism=self.kafka_sasl_mechanism,
                             username=self.kafka_sasl_username,
                             password=self.kafka_sasl_password,
                             ssl_cafile=self.kafka_ssl_cafile,
                             ssl_certfile=self.kafka_ssl_certfile,
                             ssl_keyfile=self.kafka_ssl_keyfile,
                             ssl_check_hostname=bool(self.kafka_ssl_check_hostname))

    # ------------------------------------------------------------------ engine configs
    @property
    def torch_device(self) -> str | None:
        """The device for torch; None = auto (cuda when available, else cpu)."""
        return None if self.device in ("", "auto") else self.device

    @property
    def gpu_expected(self) -> bool:
        """Whether the deployment asked for a GPU (``cuda`` or ``cuda:N``)."""
        return self.device.startswith("cuda")

    def resolve_device(self) -> tuple[str | None, bool]:
        """(the device for torch, fell back): ``cuda``/``cuda:N`` on a machine without any
        CUDA device scores on the CPU instead of failing (``pairsieve_scorer_gpu_fallback``
        and the alert ``ScorerFellBackToCPU`` say so); everything else as set."""
        if self.gpu_expected:
            import torch

            if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
                return "cpu", True
        return self.torch_device, False

    def budget_config(self) -> BudgetConfig:
        """The budget controller's config: this deployment's budget (in items; with budget unit
        ``cost`` the item count is unlimited and the selector's cost ledger holds the budget),
        core defaults otherwise."""
        items = self.budget_unit == "items" and self.budget_total >= 0
        return BudgetConfig(total=self.budget_total if items else None,
                            target_rate=self.target_rate, explore=self.explore_fraction,
                            warmup_accepts=self.warmup_accepts, window=self.threshold_window,
                            random_after=self.random_after)

    def acquisition_config(self) -> AcquisitionConfig:
        values = {name: getattr(self, name) for name in ACQUISITION_FIELDS}
        return AcquisitionConfig(**{**values, "quotas": bool(self.quotas)})

    def selector_config(self) -> SelectorConfig:
        """The stream selector's config (fields without a setting keep SelectorConfig's)."""
        return SelectorConfig(uncertainty=self.uncertainty, index_size=self.index_size,
                              cache_capacity=self.cache_capacity, budget=self.budget_config(),
                              acquisition=self.acquisition_config(),
                              cache_half_life=self.cache_half_life or None,
                              budget_unit=self.budget_unit,
                              cost_total=(float(self.budget_total) if self.budget_unit == "cost"
                                          and self.budget_total >= 0 else None))

    def gate_config(self) -> GateConfig:
        """The quality gate of new model versions."""
        return GateConfig(tolerance=self.gate_tolerance, min_pairs=self.gate_min_pairs)

    def trainer_config(self) -> TrainerConfig:
        """The alignment trainer's config: ``embedding_dim`` outputs, ``learner``,
        ``self_learning``; the rest are
        :class:`TrainerConfig`'s defaults."""
        return TrainerConfig(dim_out=self.embedding_dim, method=self.learner,
                             self_learning=self.self_learning)

    # ------------------------------------------------------------------ misc
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

    @staticmethod
    def flag_name(field_name: str) -> str:
        return "--" + field_name.replace("_", "-")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Defaults <- ``PAIRSIEVE_*`` environment <- ``overrides`` (e.g. parsed flags).

        String overrides of non-string settings (flags) are converted like the environment.
        Raises :class:`SettingsError` naming every value that cannot be read or is not allowed.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        errors: list[str] = []
        for f in fields(cls):
            raw, source = env.get(cls.env_name(f.name)), cls.env_name(f.name)
            over = overrides.get(f.name)
            if over is not None:
                raw, source = over, cls.flag_name(f.name)
            if raw is None:
                continue
            ftype = _field_type(f)
            if isinstance(raw, str) and ftype != "str":
                try:
                    raw = _convert(ftype, raw)
                except ValueError:
                    errors.append(f"{source} = {raw!r}: expected {_TYPE_WORDS[ftype]}")
                    continue
            values[f.name] = raw
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown settings: {sorted(unknown)}")
        if errors:
            raise SettingsError(errors)
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One ``--flag`` per field (default None, so the environment is not overridden).

        Values are read as text and converted by :meth:`from_env`, so a bad flag gets the same
        one-line error as a bad environment variable.
        """
        for f in fields(cls):
            parser.add_argument(cls.flag_name(f.name), dest=f.name, default=None,
                                metavar=_METAVARS[_field_type(f)], help=cls.help_text(f.name))

    @classmethod
    def help_text(cls, name: str) -> str:
        f = cls.__dataclass_fields__[name]
        text = f"{f.metadata['help']} (env {cls.env_name(name)}, default {_show(f.default)})"
        return text.replace("%", "%%")

    @classmethod
    def markdown_table(cls) -> str:
        """The README's settings table (one row per setting)."""
        rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
        for f in fields(cls):
            rows.append(f"| `{cls.env_name(f.name)}` | `{cls.flag_name(f.name)}` | "
                        f"`{_show(f.default)}` | {f.metadata['help']} |")
        return "\n".join(rows)


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "0 or 1 (or true/false)"}
_METAVARS = {"int": "N", "float": "X", "bool": "0|1", "str": "TEXT"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _show(default) -> str:
    if isinstance(default, bool):
        return str(int(default))
    return repr(default)


def _field_type(f: Field) -> str:
    """A field's type name: ``from __future__ import annotations`` keeps annotations as text."""
    return cast(str, f.type)


def _convert(typ: str, raw: str):
    if typ == "int":
        return int(raw)
    if typ == "float":
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(raw)
        return value
    if typ == "bool":
        low = raw.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise ValueError(raw)
    return raw


def _dir_problem(path: Path) -> str:
    """Why ``path`` cannot serve as the checkpoint directory ('' when it can)."""
    if path.exists():
        if not path.is_dir():
            return "exists but is not a directory"
        if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
            return "directory is not readable and writable"
        return ""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"does not exist and cannot be created ({str(parent)!r} is not a writable directory)"
    return ""
