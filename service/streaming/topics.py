"""The topic contract: pairsieve's Kafka topic names, their partition counts, topic creation.

Every worker, the deployment manifests and the tests agree on these names (each deployment may
add a suffix, ``Settings.topic``) and partition counts. :func:`create_topics` creates them on any
Kafka-protocol cluster (a real Kafka or the embedded broker of
:mod:`service.streaming.broker`) before a producer or consumer touches them.
"""

from __future__ import annotations

import logging
import re
import time

from service.streaming.security import PLAINTEXT, KafkaSecurity

log = logging.getLogger("pairsieve.broker")

__all__ = ["FEATURES_TOPIC", "REQUESTS_TOPIC", "LABELS_TOPIC", "DEAD_LETTER_TOPIC",
           "TRAINING_PAIRS_TOPIC", "MODELS_TOPIC", "DECISIONS_TOPIC", "BUDGET_LEDGER_TOPIC",
           "TOPICS", "topic_specs",
           "topic_configs", "create_topics", "admin_client", "check_bootstrap"]

FEATURES_TOPIC = "pairsieve.features.v1"
REQUESTS_TOPIC = "pairsieve.alignment-requests.v1"
LABELS_TOPIC = "pairsieve.alignment-labels.v1"
DEAD_LETTER_TOPIC = "pairsieve.dead-letter.v1"
TRAINING_PAIRS_TOPIC = "pairsieve.training-pairs.v1"
MODELS_TOPIC = "pairsieve.models.v1"
DECISIONS_TOPIC = "pairsieve.decisions.v1"
BUDGET_LEDGER_TOPIC = "pairsieve.budget-ledger.v1"
TOPICS = (FEATURES_TOPIC, REQUESTS_TOPIC, LABELS_TOPIC, DEAD_LETTER_TOPIC, TRAINING_PAIRS_TOPIC,
          MODELS_TOPIC, DECISIONS_TOPIC, BUDGET_LEDGER_TOPIC)

_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def topic_specs(partitions: int = 4) -> dict[str, int]:
    """Partition count of each pairsieve topic.

    Parameters
    ----------
    partitions : int
        Partitions of the features, alignment-requests and decisions topics (the parallelism of
        the stream processor). Labels, dead letters, training pairs and models are low volume: one
        partition each (one labels partition = one trainer at a time). The budget ledger has one
        partition by contract: its order is what every worker agrees on.

    Returns
    -------
    dict[str, int]
        Topic name -> partition count.

    Raises
    ------
    ValueError
        If ``partitions`` is not a positive integer.
    """
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions must be a positive integer, got {partitions!r}")
    return {FEATURES_TOPIC: partitions, REQUESTS_TOPIC: partitions, LABELS_TOPIC: 1,
            DEAD_LETTER_TOPIC: 1, TRAINING_PAIRS_TOPIC: 1, MODELS_TOPIC: 1,
            DECISIONS_TOPIC: partitions, BUDGET_LEDGER_TOPIC: 1}


def topic_configs(max_message_bytes: int = 16 * 1024 * 1024) -> dict[str, dict[str, str]]:
    """Topic-level configs pairsieve sets when it creates a topic.

    The training pairs are the most expensive data of the system and every worker rebuilds its
    training set from them: compacted (one record per pair key survives) and never deleted by
    time. The models topic keeps the newest version (one key) and must carry a checkpoint of up
    to ``max_message_bytes``. The decision log (one record per decided event) is kept for a week,
    like the features it explains. The budget ledger is never deleted (its reservations decide
    which event ids hold a unit; a worker replays them all). On a broker without compaction (the
    embedded tansu keeps everything) pairsieve stays correct: readers deduplicate pairs by key
    and take the newest model version.

    Returns
    -------
    dict[str, dict[str, str]]
        Canonical topic name -> config name -> value (topics without configs are left out).
    """
    size = str(int(max_message_bytes))
    return {TRAINING_PAIRS_TOPIC: {"cleanup.policy": "compact", "retention.ms": "-1"},
            MODELS_TOPIC: {"cleanup.policy": "compact", "retention.ms": "-1",
                           "max.message.bytes": size},
            DECISIONS_TOPIC: {"cleanup.policy": "delete", "retention.ms": "604800000"},
            BUDGET_LEDGER_TOPIC: {"cleanup.policy": "delete", "retention.ms": "-1"}}


def admin_client(bootstrap: str, timeout_s: float, security: KafkaSecurity = PLAINTEXT):
    """A kafka-python ``KafkaAdminClient`` for ``bootstrap`` whose requests time out after
    ``timeout_s`` seconds (at least 0.2 s), connecting as ``security`` says. The caller closes
    it."""
    from kafka.admin import KafkaAdminClient

    ms = max(200, int(timeout_s * 1000))
    return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="pairsieve-admin",
                            request_timeout_ms=ms, bootstrap_timeout_ms=ms,
                            **security.kafka_python())


def check_bootstrap(bootstrap: str) -> None:
    """Raise ``ValueError`` (echoing the value) unless ``bootstrap`` is
    ``host:port[,host:port...]``."""
    if not isinstance(bootstrap, str) or not bootstrap.strip():
        raise ValueError(f"bootstrap must be 'host:port[,host:port...]', got {bootstrap!r}")
    for part in bootstrap.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"bootstrap must be 'host:port[,host:port...]', got {bootstrap!r}")


def _partition_counts(admin, names: list[str]) -> dict[str, int]:
    """Partition count of each of ``names`` that exists (missing ones are left out)."""
    present = set(admin.list_topics())
    wanted = [n for n in names if n in present]
    if not wanted:
        return {}
    out = {}
    for t in admin.describe_topics(wanted):
        if t.get("error_code", 0) == 0:
            out[t["name"]] = len(t["partitions"])
    return out


def create_topics(bootstrap: str, specs: dict[str, int], timeout_s: float = 20,
                  *, replication_factor: int = 1,
                  configs: dict[str, dict[str, str]] | None = None,
                  security: KafkaSecurity = PLAINTEXT) -> None:
    """Create topics with explicit partition counts; idempotent.

    Existing topics with the requested partition count are left alone. Returns only once
    metadata shows every topic with its partition count.

    Parameters
    ----------
    bootstrap : str
        ``host:port`` of the cluster.
    specs : dict[str, int]
        Topic name -> partition count (see :func:`topic_specs`).
    timeout_s : float
        Overall deadline, seconds.
    replication_factor : int
        Replicas per partition (1 for the single-node embedded broker).
    configs : dict[str, dict[str, str]], optional
        Topic name -> topic configs set at creation (see :func:`topic_configs`); an existing
        topic's configs are not changed.
    security : KafkaSecurity
        How the admin client connects (default plaintext).

    Raises
    ------
    ValueError
        If a name or count is invalid, or a topic already exists with a different partition
        count (the message names the topic and both counts).
    TimeoutError
        If the topics do not all show up in metadata within ``timeout_s``.
    RuntimeError
        If the broker rejects a creation for another reason.
    """
    from kafka.admin import NewTopic

    check_bootstrap(bootstrap)
    if not isinstance(specs, dict) or not specs:
        raise ValueError(f"specs must be a non-empty dict of topic -> partitions, got {specs!r}")
    for name, n in specs.items():
        if not isinstance(name, str) or not _TOPIC_NAME.match(name) or name in (".", ".."):
            raise ValueError(f"invalid topic name {name!r} (allowed: [A-Za-z0-9._-], 1-249 chars)")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"partition count for topic {name!r} must be a positive integer, "
                             f"got {n!r}")
    if isinstance(replication_factor, bool) or not isinstance(replication_factor, int) \
            or replication_factor < 1:
        raise ValueError(f"replication_factor must be a positive integer, "
                         f"got {replication_factor!r}")

    deadline = time.monotonic() + timeout_s
    admin = admin_client(bootstrap, min(10.0, timeout_s), security)
    try:
        def check(counts: dict[str, int]) -> None:
            for name, have in counts.items():
                if have != specs[name]:
                    raise ValueError(f"topic {name!r} exists with {have} partitions, "
                                     f"requested {specs[name]}")

        counts = _partition_counts(admin, list(specs))
        check(counts)
        missing = [n for n in specs if n not in counts]
        if missing:
            res = admin.create_topics(
                [NewTopic(n, specs[n], replication_factor,
                          topic_configs=dict((configs or {}).get(n, {})))
                 for n in missing],
                timeout_ms=int(min(10.0, timeout_s) * 1000), raise_errors=False)
            for t in res.get("topics", []) if isinstance(res, dict) else []:
                code = t.get("error_code", 0)
                if code not in (0, 36):  # 36: TopicAlreadyExists (a concurrent creator won)
                    raise RuntimeError(f"creating topic {t.get('name')!r} "
                                       f"({specs.get(t.get('name'))} partitions) failed: "
                                       f"error {code} {t.get('error_message')!r}")
            log.info("created topics %s on %s", {n: specs[n] for n in missing}, bootstrap)
        while True:
            counts = _partition_counts(admin, list(specs))
            check(counts)
            missing = [n for n in specs if n not in counts]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topics {missing} not visible in metadata at {bootstrap} "
                                   f"after {timeout_s}s")
            time.sleep(0.1)
    finally:
        admin.close()
