"""How pairsieve's Kafka clients authenticate and encrypt: one value, three client libraries.

pairsieve opens Kafka clients through three libraries: faust (the stream processor's consumer
and producer), aiokafka (the publisher and the topic followers) and kafka-python (the admin
client that creates topics and probes the broker, and the reading CLIs ``export-pairs`` and
``explain``). :class:`KafkaSecurity` holds the deployment's security settings once and renders
them for each, so no client can be left on plaintext by accident.

Supported: ``PLAINTEXT``, ``SSL`` (server verified against a CA file, optional client
certificate for mutual TLS), ``SASL_PLAINTEXT`` and ``SASL_SSL`` with the mechanisms ``PLAIN``,
``SCRAM-SHA-256`` and ``SCRAM-SHA-512`` (what managed Kafka services offer with a user name and
password; GSSAPI and OAUTHBEARER need per-site code and are not offered).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from typing import Any

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """Security of every Kafka connection pairsieve opens.

    Parameters
    ----------
    protocol : str
        One of :data:`PROTOCOLS`.
    sasl_mechanism : str
        One of :data:`MECHANISMS` (SASL protocols only).
    username, password : str
        SASL credentials (SASL protocols only; both required there). The password never
        appears in ``repr`` or error messages.
    ssl_cafile : str
        PEM file of the CA(s) that signed the broker's certificate; empty = the system's
        trust store (TLS protocols only).
    ssl_certfile, ssl_keyfile : str
        Client certificate and key for mutual TLS (both or neither).
    ssl_check_hostname : bool
        Verify that the broker's certificate names the host connected to.

    Raises
    ------
    ValueError
        Naming every inconsistent value (see :meth:`problems`).
    """

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_check_hostname: bool = True

    def __post_init__(self):
        errors = self.problems()
        if errors:
            raise ValueError("; ".join(errors))

    # ------------------------------------------------------------------ checks
    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    def problems(self) -> list[str]:
        """One line per inconsistency (empty when the combination is usable). Names the
        setting's meaning, never the password."""
        if self.protocol not in PROTOCOLS:
            return [f"security protocol {self.protocol!r}: expected one of {', '.join(PROTOCOLS)}"]
        errors = []
        if self.uses_sasl:
            if self.sasl_mechanism not in MECHANISMS:
                errors.append(f"SASL mechanism {self.sasl_mechanism!r} with protocol "
                              f"{self.protocol}: expected one of {', '.join(MECHANISMS)}")
            if not self.username or not self.password:
                errors.append(f"protocol {self.protocol} needs a SASL user name and password "
                              f"(got {'a user name' if self.username else 'no user name'} and "
                              f"{'a password' if self.password else 'no password'})")
        elif self.sasl_mechanism or self.username or self.password:
            errors.append(f"SASL mechanism, user name or password set with protocol "
                          f"{self.protocol}: they are used only with SASL_PLAINTEXT or SASL_SSL")
        if not self.uses_tls and (self.ssl_cafile or self.ssl_certfile or self.ssl_keyfile):
            errors.append(f"TLS files set with protocol {self.protocol}: they are used only "
                          "with SSL or SASL_SSL")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            errors.append("mutual TLS needs both a client certificate and its key; got only "
                          + ("the certificate" if self.ssl_certfile else "the key"))
        return errors

    # ------------------------------------------------------------------ renderings
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of the aiokafka and faust clients (None without TLS). Reads the
        files: raises ``OSError``/``ssl.SSLError`` on a missing or bad one."""
        if not self.uses_tls:
            return None
        from aiokafka.helpers import create_ssl_context

        ctx = create_ssl_context(cafile=self.ssl_cafile or None,
                                 certfile=self.ssl_certfile or None,
                                 keyfile=self.ssl_keyfile or None)
        ctx.check_hostname = self.ssl_check_hostname
        return ctx

    def aiokafka(self) -> dict[str, Any]:
        """Keyword arguments for ``AIOKafkaProducer`` / ``AIOKafkaConsumer``."""
        kw: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_tls:
            kw["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.username,
                      sasl_plain_password=self.password)
        return kw

    def kafka_python(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python's ``KafkaAdminClient`` / ``KafkaConsumer``."""
        kw: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_tls:
            kw.update(ssl_check_hostname=self.ssl_check_hostname,
                      ssl_cafile=self.ssl_cafile or None,
                      ssl_certfile=self.ssl_certfile or None,
                      ssl_keyfile=self.ssl_keyfile or None)
        if self.uses_sasl:
            kw.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.username,
                      sasl_plain_password=self.password)
        return kw

    def faust_credentials(self):
        """``broker_credentials`` for ``faust.App`` (None for plaintext)."""
        if self.uses_sasl:
            from faust import SASLCredentials

            return SASLCredentials(username=self.username, password=self.password,
                                   ssl_context=self.ssl_context(),
                                   mechanism=self.sasl_mechanism)
        if self.uses_tls:
            from faust import SSLCredentials

            return SSLCredentials(self.ssl_context())
        return None

    def describe(self) -> str:
        """One line for the start-up log (no secret)."""
        parts = [self.protocol]
        if self.uses_sasl:
            parts.append(f"{self.sasl_mechanism} as {self.username!r}")
        if self.uses_tls:
            parts.append(f"CA {self.ssl_cafile or 'system'}"
                         + (", client certificate" if self.ssl_certfile else ""))
        return ", ".join(parts)


PLAINTEXT = KafkaSecurity()


class KafkaAccessError(ValueError):
    """The broker cannot be reached, or refused the TLS handshake or the login; the message
    names the broker, how pairsieve connected and the reason (never the password). A
    ``ValueError`` so that ``pairsieve`` reports it in one line and exits 2, like a bad
    setting."""


async def check_access(bootstrap: str, security: KafkaSecurity, timeout_s: float = 10.0) -> str:
    """Open one connection to a bootstrap broker as ``security`` says (TCP, TLS handshake, SASL
    login), ask it for metadata and close it: a wrong password, an untrusted certificate or a
    plaintext client on a TLS port fail here, at once and by name, instead of as a retry loop
    in every client.

    Returns the ``host:port`` that answered; raises :class:`KafkaAccessError` when none did
    (the reason of each attempt in the message).
    """
    from aiokafka.conn import create_conn
    from aiokafka.protocol.metadata import MetadataRequest

    reasons = []
    for part in bootstrap.split(","):
        host, _, port = part.strip().rpartition(":")
        try:
            conn = await asyncio.wait_for(create_conn(
                host, int(port), request_timeout_ms=int(timeout_s * 1000),
                ssl_context=security.ssl_context(), security_protocol=security.protocol,
                sasl_mechanism=security.sasl_mechanism or None,
                sasl_plain_username=security.username or None,
                sasl_plain_password=security.password or None), timeout_s)
            try:  # one metadata round trip: a broker that wants a login refuses it otherwise
                await asyncio.wait_for(conn.send(MetadataRequest([])), timeout_s)
            finally:
                conn.close()
        except Exception as exc:  # every reason is reported; nothing is retried here
            reason = str(exc)
            if type(exc).__name__ not in reason:
                reason = f"{type(exc).__name__}: {reason}"
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {timeout_s:g}s"
            reasons.append(f"{host}:{port}: {reason}")
            continue
        return f"{host}:{port}"
    raise KafkaAccessError(f"cannot connect to Kafka at {bootstrap} as {security.describe()} "
                           f"(PAIRSIEVE_KAFKA_BOOTSTRAP, PAIRSIEVE_KAFKA_SECURITY_PROTOCOL, "
                           f"_SASL_*, _SSL_*): " + "; ".join(reasons))
