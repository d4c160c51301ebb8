"""A TLS + SASL front for the embedded tansu broker: a broker that requires authentication.

Why it exists: the bundled tansu 0.6.0 cannot be that broker itself (checked; see
``docs``/README "Kafka security"): ``--authentication`` offers SCRAM-SHA-256/512 but its storage
keeps no credential (``tansu user create`` answers success, every login then ends in
``e=unknown-user``), PLAIN is not offered, and ``--cert``/``--key`` are refused together and,
given alone, leave the listener in plaintext. So the tests put this front before it:

- TLS on the listening socket (a throw-away CA from ``trustme``; clients must verify it);
- SASL ``PLAIN``, ``SCRAM-SHA-256`` and ``SCRAM-SHA-512`` checked for real (SCRAM by ``scramp``,
  the server side of RFC 5802/7677: salted proofs, not a password comparison);
- before a connection has authenticated, only ``ApiVersions`` is forwarded (as a Kafka SASL
  listener allows); any other request closes the connection, a failed login is answered with
  ``SASL_AUTHENTICATION_FAILED`` (58) and closes it;
- after it, bytes are relayed both ways unchanged. tansu advertises the front's address, so
  every connection a client opens (metadata, coordinator, fetch) comes through the front.

Protocol coverage: ``SaslHandshake`` v1 (clients then send ``SaslAuthenticate``) and
``SaslAuthenticate`` v0-v2 (v2 is the flexible encoding), which is what kafka-python, aiokafka
and faust send.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import scramp
import trustme

from service.streaming.broker import _broker_bin, _free_port

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
UNSUPPORTED_SASL_MECHANISM, ILLEGAL_SASL_STATE, SASL_AUTHENTICATION_FAILED = 33, 34, 58
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _put_uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _skip_tags(data: bytes, pos: int) -> int:
    count, pos = _uvarint(data, pos)
    for _ in range(count):
        _, pos = _uvarint(data, pos)
        size, pos = _uvarint(data, pos)
        pos += size
    return pos


def _header(frame: bytes) -> tuple[int, int, int, str, int]:
    """(api_key, api_version, correlation_id, client_id, offset of the body) of a request
    frame (header v1; v2 for the flexible SaslAuthenticate v2, whose tags are skipped)."""
    api_key, version, corr = struct.unpack_from(">hhi", frame, 0)
    (n,) = struct.unpack_from(">h", frame, 8)
    client_id = frame[10:10 + max(n, 0)].decode(errors="replace")
    pos = 10 + max(n, 0)
    if api_key == SASL_AUTHENTICATE and version >= 2:
        pos = _skip_tags(frame, pos)
    return api_key, version, corr, client_id, pos


def _string(s: str | None) -> bytes:
    if s is None:
        return struct.pack(">h", -1)
    raw = s.encode()
    return struct.pack(">h", len(raw)) + raw


def handshake_response(corr: int, error: int) -> bytes:
    body = struct.pack(">ih", corr, error) + struct.pack(">i", len(MECHANISMS))
    return body + b"".join(_string(m) for m in MECHANISMS)


def authenticate_response(corr: int, version: int, error: int, message: str | None,
                          auth_bytes: bytes) -> bytes:
    if version >= 2:  # flexible: header v1 (tagged fields), compact types
        msg = b"\x00" if message is None else (_put_uvarint(len(message.encode()) + 1)
                                              + message.encode())
        return (struct.pack(">i", corr) + b"\x00" + struct.pack(">h", error) + msg
                + _put_uvarint(len(auth_bytes) + 1) + auth_bytes + struct.pack(">q", 0) + b"\x00")
    out = struct.pack(">ih", corr, error) + _string(message)
    out += struct.pack(">i", len(auth_bytes)) + auth_bytes
    return out + (struct.pack(">q", 0) if version >= 1 else b"")


def authenticate_bytes(frame: bytes, version: int, pos: int) -> bytes:
    if version >= 2:
        n, pos = _uvarint(frame, pos)
        return frame[pos:pos + n - 1]
    (n,) = struct.unpack_from(">i", frame, pos)
    return frame[pos + 4:pos + 4 + n]


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (n,) = struct.unpack(">i", await reader.readexactly(4))
    return await reader.readexactly(n)


def _send(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(struct.pack(">i", len(payload)) + payload)


@dataclass
class SecureFront:
    """tansu behind a TLS + SASL front (see the module docstring); a context manager.

    ``users`` maps user name -> password (checked with every mechanism). ``tls=False`` gives a
    SASL_PLAINTEXT listener. After ``start()``: ``bootstrap`` (the front), ``cafile`` (the CA
    to trust), the counters ``logins_ok``, ``logins_failed``, ``refused_unauthenticated`` and the
    sets ``mechanisms_used`` and ``client_ids`` (of the connections that logged in).
    """

    users: dict[str, str]
    tls: bool = True
    bootstrap: str = ""
    cafile: str = ""
    logins_ok: int = 0
    logins_failed: int = 0
    refused_unauthenticated: int = 0
    mechanisms_used: set = field(default_factory=set)
    client_ids: set = field(default_factory=set)

    def start(self) -> SecureFront:
        self._dir = tempfile.mkdtemp(prefix="pairsieve-front-")
        self.port = _free_port("127.0.0.1")
        self.upstream = _free_port("127.0.0.1")
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._ssl = None
        if self.tls:
            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost")
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(self._ssl)
            self.cafile = str(Path(self._dir) / "ca.pem")
            ca.cert_pem.write_to_path(self.cafile)
        self._scram = {m: scramp.ScramMechanism(m) for m in MECHANISMS if m.startswith("SCRAM")}
        self._auth_info = {(m, u): self._scram[m].make_auth_info(pw, iteration_count=4096)
                           for m in self._scram for u, pw in self.users.items()}
        log = open(Path(self._dir) / "tansu.log", "ab")
        self._broker = subprocess.Popen(
            [_broker_bin(), "broker", "--listener-url", f"tcp://127.0.0.1:{self.upstream}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.port}",
             "--storage-engine", "memory://tansu/"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.upstream), timeout=0.5):
                break
            if time.monotonic() > deadline or self._broker.poll() is not None:
                raise RuntimeError("tansu behind the secure front did not start")
            time.sleep(0.05)
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(asyncio.start_server(
                self._client, "127.0.0.1", self.port, ssl=self._ssl))
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="secure-front", daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def stop(self) -> None:
        if getattr(self, "_loop", None) is not None:
            async def close() -> None:
                self._server.close()
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if getattr(self, "_broker", None) is not None and self._broker.poll() is None:
            self._broker.kill()
            self._broker.wait(5)

    def __enter__(self) -> SecureFront:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ per connection
    def _scram_auth_info(self, mechanism: str, user: str):
        """scramp's ``auth_fn``: the stored (salt, stored key, server key, iterations);
        ``KeyError`` for an unknown user."""
        return self._auth_info[(mechanism, user)]

    def _check_plain(self, token: bytes) -> bool:
        parts = token.split(b"\x00")
        if len(parts) != 3:
            return False
        user, password = parts[1].decode(errors="replace"), parts[2].decode(errors="replace")
        return user in self.users and self.users[user] == password

    async def _authenticate(self, reader, writer) -> bool:
        """Run the SASL exchange; True once the client is authenticated."""
        up_r = up_w = None
        mechanism, scram_server = None, None
        try:
            while True:
                frame = await _read_frame(reader)
                api_key, version, corr, client_id, pos = _header(frame)
                if api_key == API_VERSIONS:  # allowed before authentication: ask tansu
                    if up_w is None:
                        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
                    _send(up_w, frame)
                    _send(writer, await _read_frame(up_r))
                elif api_key == SASL_HANDSHAKE:
                    (n,) = struct.unpack_from(">h", frame, pos)
                    mechanism = frame[pos + 2:pos + 2 + n].decode()
                    ok = mechanism in MECHANISMS and version >= 1
                    _send(writer, handshake_response(
                        corr, 0 if ok else UNSUPPORTED_SASL_MECHANISM))
                    if not ok:
                        return False
                elif api_key == SASL_AUTHENTICATE and mechanism is not None:
                    token = authenticate_bytes(frame, version, pos)
                    if mechanism == "PLAIN":
                        if self._check_plain(token):
                            _send(writer, authenticate_response(corr, version, 0, None, b""))
                            self.mechanisms_used.add(mechanism)
                            self.client_ids.add(client_id)
                            return True
                        self.logins_failed += 1
                        _send(writer, authenticate_response(
                            corr, version, SASL_AUTHENTICATION_FAILED,
                            "Authentication failed: invalid credentials", b""))
                        return False
                    try:
                        if scram_server is None:
                            scram_server = self._scram[mechanism].make_server(
                                functools.partial(self._scram_auth_info, mechanism))
                            scram_server.set_client_first(token.decode())
                            reply = scram_server.get_server_first().encode()
                            _send(writer, authenticate_response(corr, version, 0, None, reply))
                            continue
                        scram_server.set_client_final(token.decode())
                        reply = scram_server.get_server_final().encode()
                    except (scramp.ScramException, KeyError, UnicodeDecodeError):
                        self.logins_failed += 1
                        _send(writer, authenticate_response(
                            corr, version, SASL_AUTHENTICATION_FAILED,
                            "Authentication failed during authentication due to invalid "
                            "credentials with SASL mechanism " + mechanism, b""))
                        return False
                    _send(writer, authenticate_response(corr, version, 0, None, reply))
                    self.mechanisms_used.add(mechanism)
                    self.client_ids.add(client_id)
                    return True
                else:  # a real SASL listener closes: nothing else before authentication
                    self.refused_unauthenticated += 1
                    return False
        finally:
            if up_w is not None:
                up_w.close()
            await writer.drain()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not await self._authenticate(reader, writer):
                return
            self.logins_ok += 1
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)

            async def pipe(src, dst):
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                finally:
                    dst.close()

            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer), return_exceptions=True)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            writer.close()
