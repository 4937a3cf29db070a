"""The PostgreSQL listener: a planted `.pgpass` or database URL, used, delivers its secret here.

It speaks the protocol as far as authentication (`listeners/pgwire.py`) and
never further. An SSLRequest gets TLS with the node's certificate (and the
name the client asked for in it, SNI, is evidence); a GSSENCRequest gets `N`.
From the StartupMessage, a token in the user, the database, the application
name or the TLS server name identifies a canary: that hit is committed before
the server asks for a password. Then it asks for one in cleartext (or, with
`auth = "scram-sha-256"`, starts SCRAM, for clients that insist on it, and
sees as far as the client's first message), and a token in the password
identifies the canary whose secret was presented: committed before the
answer, which is always `FATAL 28P01 password authentication failed`. The
password itself is never stored (its length is), and nothing a client sends
is echoed back.

Bounds: the guard's connection caps; each step (a packet, the TLS handshake,
the password) within `timeout`; packets within pgwire's sizes. A refused
connection gets PostgreSQL's own `53300 too many connections`; a packet that
is not the protocol gets `08P01` and the connection is closed.
"""

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import Field

from canaries.find import locate, scan, split_name
from canaries.index import Unknowable
from listeners import pgwire
from listeners.base import Context, NotDurable, Peer, Port, format_peer, printable
from listeners.guard import BACKLOG, ConnectionGuard, StreamOptions, listening_socket

log = logging.getLogger(__name__)

# Tokens looked up per connection: more plausible ones than this is not a real client.
MAX_CANDIDATES = 8
MAX_VALUE_KEPT = 256
_REFUSED = pgwire.error("53300", "sorry, too many clients already")
_FAILED = pgwire.error("28P01", "password authentication failed")
_NOT_NOW = pgwire.error("57P03", "the database system is starting up")
_VIOLATION = pgwire.error("08P01", "invalid frontend message")


class PostgresOptions(StreamOptions):
    """`[postgres]`: where it binds (5432 in production) and how it asks for a password."""

    enabled: bool = False
    port: Port = 15432
    auth: Literal["cleartext", "scram-sha-256"] = "cleartext"
    max_connections: Annotated[int, Field(ge=1, le=65536)] = 256


class PostgresListener:
    """Takes PostgreSQL connections as far as the password, and refuses every one."""

    name = "postgres"

    def __init__(self, context: Context, options: PostgresOptions) -> None:
        self._context = context
        self._options = options
        self._zone = split_name(context.zone)
        context.connections = self._guard = ConnectionGuard.of(options)
        self._tls = None if context.tls is None else context.tls.contexts(names=True)
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        host, port = self._server.sockets[0].getsockname()[:2]
        return [(host, port)]

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._client, sock=listening_socket(self._options), backlog=BACKLOG
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for session in list(self._sessions):
            session.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer: Peer = writer.get_extra_info("peername")
        # The TCP transport: after TLS, `writer.transport` is the TLS one above it.
        raw = writer.transport
        slot = self._guard.admit(str(peer[0]), raw.abort)
        counters = self._context.counters
        if slot is None:
            counters.dropped += 1
            writer.write(_REFUSED)
            _close(writer, raw)
            return
        session = asyncio.current_task()
        if session is not None:
            self._sessions.add(session)
        try:
            answer = await self._answer(reader, writer, peer, slot.touch)
            if answer is not None:
                writer.write(answer)
                async with asyncio.timeout(self._options.timeout):
                    await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception:
            # Whatever else a hostile client sets off ends its connection, not the listener.
            log.debug("%s postgres session failed", format_peer(peer), exc_info=True)
        finally:
            slot.release()
            if session is not None:
                self._sessions.discard(session)
            _close(writer, raw)

    async def _answer(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Peer,
        touch: Callable[[], None],
    ) -> bytes | None:
        """The session, and the answer it ends with (None: just close)."""
        counters = self._context.counters
        try:
            return await self._session(reader, writer, peer, touch)
        except pgwire.Malformed as error:
            counters.malformed += 1
            log.debug("%s postgres: %s", format_peer(peer), error)
            return _VIOLATION
        except (NotDurable, Unknowable):
            # Not recorded, or not known whether it is a canary: a refusal the client retries.
            return _NOT_NOW
        except (TimeoutError, ConnectionAbortedError):
            # asyncio ends a TLS handshake that takes too long with ConnectionAbortedError.
            self._guard.timeouts["step"] += 1
            return None
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return None

    async def _session(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Peer,
        touch: Callable[[], None],
    ) -> bytes | None:
        """One connection as far as its password; the answer to end it with."""
        startup = await self._opening(reader, writer, touch)
        if startup is None:
            return None
        counters = self._context.counters
        counters.received += 1
        tls = self._tls_facts(writer)
        facts: dict[str, Any] = {
            "user": printable(startup.user, MAX_VALUE_KEPT),
            "database": printable(startup.database, MAX_VALUE_KEPT),
            "application_name": printable(
                startup.parameters.get("application_name", ""), MAX_VALUE_KEPT
            ),
            "protocol_version": f"{startup.major}.{startup.minor}",
            "auth": self._options.auth,
            **tls,
        }
        found = self._in_startup(startup, tls.get("sni"))
        hits = await self._context.index.among(found, str(peer[0]), MAX_CANDIDATES)
        recorded = await self._context.record(
            *[
                self._context.hit(
                    canary, "postgres", peer, {**facts, "trigger": "startup", "found_in": where}
                )
                for canary, where in hits
            ]
        )
        if startup.minor != 0:
            writer.write(pgwire.negotiate_version(0))
        scram = self._options.auth == "scram-sha-256"
        writer.write(pgwire.auth_sasl("SCRAM-SHA-256") if scram else pgwire.auth_cleartext())
        async with asyncio.timeout(self._options.timeout):
            await writer.drain()
            kind, size = pgwire.message_header(await reader.readexactly(5))
            payload = await reader.readexactly(size)
        touch()
        if kind != b"p":
            raise pgwire.Malformed(f"expected a password, got message {kind!r}")
        secret: dict[str, Any]
        words: dict[str, list[str]]
        if scram:
            first = pgwire.sasl_initial(payload)
            secret = {
                "sasl_mechanism": printable(first.mechanism, MAX_VALUE_KEPT),
                "sasl_username": printable(first.username or "", MAX_VALUE_KEPT),
            }
            words = {}
        else:
            text = pgwire.password(payload)
            # Only its length: a hash of a real password someone mistakenly sent could be
            # guessed back by whoever reads the ledger.
            secret = {"password_length": len(text)}
            words = {token: ["password"] for token in scan(text)}
        known = {canary.token: entry for (canary, _), entry in zip(hits, recorded, strict=True)}
        presented = await self._context.index.among(words, str(peer[0]), MAX_CANDIDATES)
        tokens = {canary.token for canary, _ in presented}
        # What the password step brought, for each canary its startup named; a new hit for
        # each canary only the password named.
        await self._context.record(
            *[
                self._context.observation(
                    "evidence",
                    canary,
                    "postgres",
                    peer,
                    {"hit_seq": entry.seq, **secret, "secret_presented": canary.token in tokens},
                )
                for (canary, _), entry in zip(hits, recorded, strict=True)
            ],
            *[
                self._context.hit(
                    canary,
                    "postgres",
                    peer,
                    {**facts, **secret, "trigger": "password", "found_in": where},
                )
                for canary, where in presented
                if canary.token not in known
            ],
        )
        if not hits and not presented:
            counters.junk += 1
        return _FAILED

    async def _opening(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, touch: Callable[[], None]
    ) -> pgwire.Startup | None:
        raw = writer.transport
        """Through SSLRequest and GSSENCRequest (once each) to the StartupMessage."""
        asked_tls = asked_gss = False
        while True:
            async with asyncio.timeout(self._options.timeout):
                length = pgwire.packet_length(await reader.readexactly(4))
                packet = pgwire.opening(await reader.readexactly(length))
            touch()
            if isinstance(packet, pgwire.Startup):
                return packet
            if isinstance(packet, pgwire.CancelRequest):
                return None
            if isinstance(packet, pgwire.SslRequest) and not asked_tls:
                asked_tls = True
                if self._tls is None:
                    writer.write(pgwire.NO_ENCRYPTION)
                    continue
                if len(reader._buffer):  # type: ignore[attr-defined]
                    # Bytes sent before the handshake would pass as sent inside TLS
                    # (PostgreSQL refuses them too, since CVE-2021-23214).
                    raise pgwire.Malformed("data after an SSLRequest, before the handshake")
                writer.write(pgwire.WILL_TLS)
                await writer.drain()
                try:
                    await writer.start_tls(
                        self._tls.current, ssl_handshake_timeout=self._options.timeout
                    )
                except AttributeError:
                    # Closed under the handshake (evicted): asyncio 3.11 then leaves the writer
                    # with no transport, and its __del__ fails on that; it gets the closed one.
                    writer._transport = raw  # type: ignore[attr-defined]
                    raise ConnectionResetError("closed during the TLS handshake") from None
                continue
            if isinstance(packet, pgwire.GssRequest) and not asked_gss:
                asked_gss = True
                writer.write(pgwire.NO_ENCRYPTION)
                continue
            raise pgwire.Malformed("an encryption request repeated")

    def _tls_facts(self, writer: asyncio.StreamWriter) -> dict[str, Any]:
        ssl_object = writer.get_extra_info("ssl_object")
        if self._tls is None or ssl_object is None:
            return {"tls": False}
        return self._tls.facts(ssl_object)

    def _in_startup(self, startup: pgwire.Startup, sni: str | None) -> dict[str, list[str]]:
        """Tokens in the server name asked for (by position) and in the startup parameters."""
        found: dict[str, list[str]] = {}
        if sni:
            match = locate(split_name(sni), self._zone)
            if match is not None and match.candidate:
                found.setdefault(match.candidate, []).append("sni")
        for name in ("user", "database", "application_name", "options"):
            for token in scan(startup.parameters.get(name, "")):
                found.setdefault(token, []).append(name)
        return found


def _close(writer: asyncio.StreamWriter, raw: asyncio.BaseTransport) -> None:
    """Close at once: closing waits for the rest to be written, however long a client that
    does not read takes, and a TLS close for the client's close_notify (30 s), both after
    the connection's slot was given back."""
    assert isinstance(raw, asyncio.Transport)
    # After TLS (or a handshake cut off under it) the writer's transport is another, or none.
    if writer.transport is not raw or raw.get_write_buffer_size():
        raw.abort()
    else:
        writer.close()
