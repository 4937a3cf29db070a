"""The TLS listener: a ClientHello naming a canary is a hit, recorded before the handshake.

Clients leave over HTTPS; before any certificate is seen they name the host
they want (SNI) in the clear. Each connection's first bytes are peeked, not
read, until they hold a whole ClientHello (`listeners/tlswire.py`); an SNI
of `<token>.<zone>` (or any name under it) of a known canary is committed
as a `tls` hit with the offered ALPN, versions and JA4, and only then does
the handshake go on, with the node's certificate. How it ended follows as
an `evidence` event: `completed`; `rejected` (the client's alert said it
refused the certificate); `reset` (the client cut the connection mid-way,
which is how most clients that refuse a certificate leave); `failed`
(another TLS error); `gone` (it closed); `timeout`. Junk SNI is counted,
not stored. A completed handshake is handed on, with its admission, to the
protocol the port serves: on `[https]`, uvicorn's h11 with the same request
catcher as plaintext HTTP, so a token in the decrypted request is an `https`
hit; on SMTP's implicit-TLS port, the SMTP session.

Bounds: the guard's connection caps; a ClientHello must arrive within
`timeout` and fit MAX_HELLO_BYTES, the handshake takes `timeout` more; bytes
that are not a ClientHello close the connection at once.
"""

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable

from uvicorn.server import ServerState

from canaries.find import locate, split_name
from canaries.index import Unknowable
from canaries.model import Canary
from listeners.base import Context, NotDurable, Peer
from listeners.certificates import Contexts
from listeners.guard import (
    ConnectionGuard,
    Slot,
    StreamOptions,
    addresses_of,
    listening_socket,
)
from listeners.http import BoundedH11Protocol, HttpOptions, RequestCatcher, bounded_config
from listeners.tlswire import MAX_HELLO_BYTES, ClientHello, Malformed, client_hello
from store.ledger import Event

log = logging.getLogger(__name__)

# Peeks of a ClientHello not yet whole: the socket stays readable, so wait between them.
_FIRST_WAIT, _LONGEST_WAIT = 0.005, 0.2
# What OpenSSL reports when the client sent an alert about our certificate.
_REJECTIONS = ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "UNSUPPORTED_CERTIFICATE")


class TlsOptions(StreamOptions):
    """`[https]`: where the TLS listener binds (443 in production)."""

    enabled: bool = False
    port: int = 8443


class TlsListener:
    """`[https]`: catches every ClientHello; the requests of a completed handshake are caught
    as plaintext HTTP's are, as `https` hits."""

    name = "https"

    def __init__(self, context: Context, options: TlsOptions, http: HttpOptions) -> None:
        if context.tls is None:
            raise ValueError("the TLS listener needs the node's certificate (context.tls)")
        guard = ConnectionGuard.of(options)
        context.connections = guard
        self._config = bounded_config(RequestCatcher(context, http, guard), guard, options.timeout)
        self._config.load()
        self._step = options.timeout
        self._state = ServerState()
        self._front = TlsFront(context, options, guard, context.tls.contexts(), self._serve)

    def _serve(self, slot: Slot) -> asyncio.Protocol:
        return BoundedH11Protocol(self._config, self._state, {}, slot=slot)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self._front.addresses

    async def start(self) -> None:
        await self._front.start()

    async def stop(self) -> None:
        await self._front.stop()
        for connection in list(self._state.connections):
            connection.shutdown()
        # A request in flight gets a step to finish its answer, as uvicorn's own shutdown gives.
        if self._state.tasks:
            await asyncio.wait(list(self._state.tasks), timeout=self._step)
        for connection in list(self._state.connections):
            connection.transport.abort()


class TlsFront:
    """Accepts TLS connections within `guard`: catches each ClientHello, completes the
    handshake with `tls`, and hands the connection, with its slot, to `serve`'s protocol."""

    def __init__(
        self,
        context: Context,
        options: StreamOptions,
        guard: ConnectionGuard,
        tls: Contexts,
        serve: Callable[[Slot], asyncio.Protocol],
    ) -> None:
        self._context = context
        self._options = options
        self._guard = guard
        self._tls = tls
        self._serve = serve
        self._zone = split_name(context.zone)
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return addresses_of(self._socket)

    async def start(self) -> None:
        listening = listening_socket(self._options)
        self._socket = listening
        self._accepting = asyncio.create_task(self._accept(listening))

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        for session in list(self._sessions):
            session.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                connection, peer = await loop.sock_accept(listening)
            except OSError as error:
                # Out of descriptors, for one: wait, do not spin or die.
                log.warning("tls accept failed: %r", error)
                await asyncio.sleep(0.1)
                continue
            session = asyncio.create_task(self._session(connection, peer))
            self._sessions.add(session)
            session.add_done_callback(self._sessions.discard)
            # Also when the session is cancelled before it ever ran (the node stopping);
            # a connection handed on was detached from this socket object first.
            session.add_done_callback(_closing(connection))

    async def _session(self, connection: socket.socket, peer: Peer) -> None:
        counters = self._context.counters
        session = asyncio.current_task()
        assert session is not None
        slot = self._guard.admit(str(peer[0]), lambda: _end(connection, session))
        if slot is None:
            counters.dropped += 1
            connection.close()
            return
        handed = False
        try:
            hello = await self._hello(connection, slot)
            if hello is None:
                return
            counters.received += 1
            canary = await self._canary(hello, str(peer[0]))
            if canary is not None:
                await self._context.record(self._hit(canary, hello, peer))
            elif hello.sni is not None:
                counters.junk += 1
            ended = await self._handshake(connection, slot)
            handed = ended == "completed"
            if canary is not None:
                await self._context.record(
                    self._context.observation(
                        "evidence", canary, "tls", peer, {"sni": hello.sni, "handshake": ended}
                    )
                )
        except NotDurable:
            pass  # counted by the context; no handshake as if the hit were recorded
        except Unknowable:
            # Not known whether it is a canary: no handshake as if it were fine.
            counters.record_failures += 1
        except OSError:
            pass
        finally:
            if not handed:
                slot.release()
                connection.close()

    async def _hello(self, connection: socket.socket, slot: Slot) -> ClientHello | None:
        """The ClientHello in the connection's first bytes, left unread for the handshake."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.timeout
        wait = _FIRST_WAIT
        seen = 0
        while True:
            if not await _readable(connection, deadline):
                self._guard.timeouts["hello"] += 1
                return None
            try:
                data = connection.recv(MAX_HELLO_BYTES + 1024, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            if data == b"":
                return None
            if data and len(data) > seen:
                # Only new bytes are worth parsing again; a client sending them is active.
                seen = len(data)
                slot.touch()
                try:
                    hello = client_hello(data)
                except Malformed:
                    self._context.counters.malformed += 1
                    return None
                if hello is not None:
                    return hello
            if loop.time() + wait > deadline:
                self._guard.timeouts["hello"] += 1
                return None
            await asyncio.sleep(wait)
            wait = min(wait * 2, _LONGEST_WAIT)

    async def _canary(self, hello: ClientHello, source: str) -> Canary | None:
        if not hello.sni:
            return None
        match = locate(split_name(hello.sni), self._zone)
        if match is None or not match.candidate:
            return None
        index = self._context.index
        if not index.worth_asking(match.candidate):
            return None
        return await index.lookup(match.candidate, source)

    def _hit(self, canary: Canary, hello: ClientHello, peer: Peer) -> Event:
        match = locate(split_name(hello.sni or ""), self._zone)
        evidence = {
            "sni": hello.sni,
            "alpn": list(hello.alpn),
            "versions": hello.version_names,
            "ja4": hello.ja4,
            "left_labels": list(match.left) if match else [],
            "handshake": "started",
        }
        return self._context.hit(canary, "tls", peer, evidence)

    async def _handshake(self, connection: socket.socket, slot: Slot) -> str:
        """Complete the handshake; how it ended. A completed one is handed to `serve`."""
        loop = asyncio.get_running_loop()
        # The transport owns the descriptor from here: this socket object lets it go.
        handing = socket.socket(fileno=connection.detach())
        try:
            await loop.connect_accepted_socket(
                lambda: self._serve(slot),
                handing,
                ssl=self._tls.current,
                ssl_handshake_timeout=self._options.timeout,
            )
        except ssl.SSLError as error:
            reason = str(getattr(error, "reason", "") or error)
            return "rejected" if any(name in reason for name in _REJECTIONS) else "failed"
        except (TimeoutError, ConnectionAbortedError):
            # asyncio ends a handshake that takes too long with ConnectionAbortedError.
            self._guard.timeouts["handshake"] += 1
            return "timeout"
        except ConnectionResetError:
            return "reset"
        except (ConnectionError, OSError):
            return "gone"
        return "completed"


async def _readable(connection: socket.socket, deadline: float) -> bool:
    """Whether `connection` has bytes (or its end) to read before the loop's `deadline`."""
    loop = asyncio.get_running_loop()
    if deadline <= loop.time():
        return False
    ready: asyncio.Future[None] = loop.create_future()

    def woken() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = connection.fileno()
    loop.add_reader(fd, woken)
    try:
        async with asyncio.timeout_at(deadline):
            await ready
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
    return True


def _closing(connection: socket.socket) -> "Callable[[asyncio.Task[None]], None]":
    def close(_: "asyncio.Task[None]") -> None:
        connection.close()

    return close


def _end(connection: socket.socket, session: "asyncio.Task[None]") -> None:
    """End a session now (evicted for a newcomer): its peeks would still see what was sent."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    session.cancel()
