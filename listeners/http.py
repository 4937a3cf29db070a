"""The catch-all HTTP listener: any request carrying a token is a hit, recorded before the answer.

Served by uvicorn (h11) inside the node's loop, on its own port, never the
admin API's. A token in the request head (Host, target, headers) is recorded
as soon as the head has arrived, before the body is read, so a client that
stalls its body cannot delay its hit; a token found only in the body is
recorded once the body is in. Connections are held to the listener's bounds
(`listeners.guard`), heads must arrive within `timeout`, bodies within
`timeout` and `max_body_bytes`, and replies are written within `timeout`.
The answer is fixed by configuration and never echoes anything from the request.
"""

import asyncio
import contextlib
import hashlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import uvicorn
from pydantic import Field
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle
from uvicorn.server import ServerState

from canaries.find import in_request, split_name
from canaries.index import Unknowable
from canaries.model import Canary
from listeners import llmapi, mcpapi
from listeners.base import Context, NotDurable, Peer, Port
from listeners.guard import (
    BACKLOG,
    ConnectionGuard,
    Slot,
    StreamOptions,
    addresses_of,
    listening_socket,
)
from store.ledger import Entry, Event

log = logging.getLogger(__name__)

Response = Literal["empty", "404", "pixel"]
# How reading a request body ended.
BodyEnd = Literal["complete", "too_large", "timeout", "disconnected"]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = Sequence[tuple[bytes, bytes]]

BODY_SCANNED = 1024
MAX_HEADERS_KEPT = 50
MAX_VALUE_KEPT = 512
MAX_TARGET_KEPT = 2048
# A request head larger than this, or with more header lines, is answered 431.
MAX_HEAD_BYTES = 16 * 1024
MAX_HEADER_LINES = 100
# Plausible tokens (known, or passing the keyed check) looked up per request.
MAX_CANDIDATES = 32
_PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
_ANSWERS: dict[str, tuple[int, bytes, bytes]] = {
    "empty": (200, b"text/plain", b""),
    "404": (404, b"text/plain", b"Not Found\n"),
    "pixel": (200, b"image/gif", _PIXEL),
}
_CLOSE = ((b"connection", b"close"),)
# Sent to a connection over the bounds before anything of it is read.
_TOO_MANY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
    b"retry-after: 1\r\nconnection: close\r\n\r\n"
)


# Clients such as git and docker send a stored secret only when challenged.
_CHALLENGE = ((b"www-authenticate", b'Basic realm="restricted"'),)


def _challenge(hits: list[tuple[Canary, list[str]]], headers: list[tuple[str, str]]) -> bool:
    """Challenge for credentials when a credential canary's host is asked without any."""
    unauthenticated = all(name.lower() != "authorization" for name, _ in headers)
    return unauthenticated and any(canary.kind == "credential" for canary, _ in hits)


def head_too_large(headers: Headers) -> bool:
    """More header lines or bytes than any real client sends (h11 bounds only a partial head)."""
    return len(headers) > MAX_HEADER_LINES or (
        sum(len(name) + len(value) for name, value in headers) > MAX_HEAD_BYTES
    )


def framing_ambiguous(headers: Headers) -> bool:
    """Both Content-Length and Transfer-Encoding: RFC 9112 6.1 says close after answering."""
    names = {name.lower() for name, _ in headers}
    return b"content-length" in names and b"transfer-encoding" in names


class HttpOptions(StreamOptions):
    """`[http]`: how it binds, what everyone gets back, how much body it reads, and its bounds."""

    port: Port = 8080
    response: Response = "empty"
    max_body_bytes: Annotated[int, Field(ge=1024, le=100 * 1024 * 1024)] = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Body:
    """What was read of a request body: its first bytes, size and hash, and how reading ended."""

    head: bytes
    size: int
    sha256: str
    ended: BodyEnd

    @property
    def complete(self) -> bool:
        return self.ended == "complete"


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the node owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _BoundedConfig(uvicorn.Config):
    """uvicorn's config, carrying the listener's connection bounds to its protocol."""

    def __init__(self, app: Any, guard: ConnectionGuard, timeout: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard
        self.step_timeout = timeout


def bounded_config(app: Any, guard: ConnectionGuard, timeout: float) -> uvicorn.Config:
    """How every h11 connection of the node is served: within `guard`, each step in `timeout`."""
    return _BoundedConfig(
        app,
        guard,
        timeout,
        http=BoundedH11Protocol,
        interface="asgi3",
        lifespan="off",
        # The client is the peer that connected, never a header it sent.
        proxy_headers=False,
        access_log=False,
        server_header=False,
        date_header=True,
        log_level="warning",
        # Through the node's handler (escaped, rate limited), not uvicorn's own.
        log_config=None,
        # No upgrades: a protocol switch would leave the bounds behind.
        ws="none",
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        # The guard bounds connections; uvicorn's own limit would answer a real hit 503.
        limit_concurrency=None,
        timeout_keep_alive=5,
        backlog=BACKLOG,
    )


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol held to the guard's caps, with the head and write timeouts it lacks.

    uvicorn times out only an idle keep-alive connection: a head sent slowly,
    or a reply the client never reads, would hold a connection for ever.
    A connection admitted before (a TLS one, at accept) comes with its `slot`.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        slot: Slot | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, _BoundedConfig)
        self._guard = config.guard
        self._step = config.step_timeout
        self._slot = slot
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._closing_seen = False
        self._waiting_after: RequestResponseCycle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if self._slot is not None:
            self._slot.close = transport.abort
        else:
            peer = transport.get_extra_info("peername")
            self._slot = self._guard.admit(str(peer[0]) if peer else "", transport.abort)
        if self._slot is None:
            transport.write(_TOO_MANY)
            transport.close()
            return
        super().connection_made(transport)
        self._wait_for_head()
        self._watchdog = self.loop.call_later(self._step, self._watch)

    def data_received(self, data: bytes) -> None:
        if self._slot is None:
            return  # refused: nothing of it is read
        self._slot.touch()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._slot is None:
            return  # refused before uvicorn saw it
        self._slot.release()
        for timer in (self._head_timer, self._write_timer, self._watchdog):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_timer is not None and self.cycle is not self._waiting_after:
            self._head_timer.cancel()
            self._head_timer = None

    def on_response_complete(self) -> None:
        # Armed before uvicorn reads a pipelined request, which then disarms it.
        self._wait_for_head()
        super().on_response_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_timer = self.loop.call_later(self._step, self._expired, "write")

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _wait_for_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._waiting_after = self.cycle
        self._head_timer = self.loop.call_later(self._step, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.cycle is self._waiting_after:
            self._expired("head")

    def _expired(self, phase: str) -> None:
        # A closing transport too: close() waits for its buffer to drain, however long.
        self._guard.timeouts[phase] += 1
        self.transport.abort()

    def _watch(self) -> None:
        """Abort a connection that has been closing for a whole step: its client does not read."""
        if self.transport.is_closing():
            if self._closing_seen:
                self._expired("close")
                return
            self._closing_seen = True
        self._watchdog = self.loop.call_later(self._step, self._watch)


class AsgiServer:
    """An ASGI app served by uvicorn (h11) on its own socket, inside the running loop."""

    def __init__(
        self, app: Any, options: StreamOptions, guard: ConnectionGuard | None = None
    ) -> None:
        self._app = app
        self._options = options
        self.guard = guard or ConnectionGuard.of(options)
        self._socket: socket.socket | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return addresses_of(self._socket)

    async def start(self) -> None:
        options = self._options
        listening = listening_socket(options)
        self._socket = listening
        config = bounded_config(self._app, self.guard, options.timeout)
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[listening]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
        if self._socket is not None:
            self._socket.close()
        self._server = self._task = self._socket = None


class HttpListener:
    """Answers every request the same way; records those that carry a canary token."""

    name = "http"

    def __init__(self, context: Context, options: HttpOptions) -> None:
        guard = ConnectionGuard.of(options)
        self._server = AsgiServer(RequestCatcher(context, options, guard), options, guard)
        context.connections = guard

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self._server.addresses

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()


class RequestCatcher:
    """The ASGI application every request goes through, plaintext (`http`) or inside TLS (`https`)."""

    def __init__(self, context: Context, options: HttpOptions, guard: ConnectionGuard) -> None:
        self._context = context
        self._options = options
        self._guard = guard
        self._zone = split_name(context.zone)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        counters = self._context.counters
        counters.received += 1
        # uvicorn says https when the request came through a TLS transport.
        protocol = "https" if scope.get("scheme") == "https" else "http"
        raw_headers: Headers = scope["headers"]
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw_headers]
        host = next((value for name, value in headers if name.lower() == "host"), "")
        target = scope.get("raw_path", b"").decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        peer = scope.get("client") or ("?", 0)
        head = {
            "method": scope["method"][:MAX_VALUE_KEPT],
            "target": target[:MAX_TARGET_KEPT],
            "http_version": scope.get("http_version", ""),
            "host": host[:MAX_VALUE_KEPT],
            "headers": [
                [name[:MAX_VALUE_KEPT], value[:MAX_VALUE_KEPT]]
                for name, value in headers[:MAX_HEADERS_KEPT]
            ],
            "user_agent": next(
                (v[:MAX_VALUE_KEPT] for n, v in headers if n.lower() == "user-agent"), None
            ),
        }
        try:
            # The head's hits first: a client that stalls its body has already left them.
            source = str(peer[0])
            head_hits = await self._context.index.among(
                in_request(host, target, headers, "", self._zone), source, MAX_CANDIDATES
            )
            # A canary's holder is answered as the service it was planted for: an MCP server
            # at a planted MCP endpoint, the provider at an LLM API path. Anyone else is
            # answered as any request is (no fingerprint, and no cost of parsing for it).
            path = scope.get("path", "")
            llm = (
                llmapi.provider(path, headers)
                if any(canary.format in llmapi.FORMATS for canary, _ in head_hits)
                else None
            )
            mcp = mcpapi.is_endpoint(scope.get("raw_path", b"").decode("latin-1"), scope["method"])
            mcp = mcp and any(canary.format == "mcp" for canary, _ in head_hits)
            if llm is not None:
                head |= {"provider": llm, "endpoint": path[:MAX_VALUE_KEPT]}
            if mcp:
                head["scheme"] = protocol
                protocol = "mcp"
            entries = await self._context.record(
                *[
                    self._context.hit(canary, protocol, peer, {**head, "found_in": where})
                    for canary, where in head_hits
                ]
            )
            # Their bodies are kept whole (within a bound): the model, the prompt, the call.
            body = await self._read_body(
                receive,
                llmapi.MAX_BODY_KEPT
                if llm is not None
                else mcpapi.MAX_BODY_BYTES
                if mcp
                else BODY_SCANNED,
            )
            whole = body.complete and body.size == len(body.head)
            served = mcpapi.answer(scope["method"], body.head, whole) if mcp else None
            found = in_request("", "", [], body.head.decode("utf-8", "replace"), self._zone)
            known = {canary.token for canary, _ in head_hits}
            body_hits = await self._context.index.among(
                {token: where for token, where in found.items() if token not in known},
                source,
                MAX_CANDIDATES,
            )
            recorded = [
                (canary, entry) for (canary, _), entry in zip(head_hits, entries, strict=True)
            ]
            asked = (
                llmapi.request_facts(llm, head["endpoint"], body.head, whole)
                if llm is not None and body.size
                else served.facts
                if served is not None
                else {}
            )
            await self._context.record(
                *self._body_events(protocol, head, body, peer, recorded, body_hits, asked)
            )
        except (NotDurable, Unknowable):
            # Not recorded, or not known whether it is a canary: never answered as if it were fine.
            await self._answer(send, 503, b"text/plain", b"", _CLOSE)
            return
        hits = head_hits + body_hits
        if not hits:
            counters.junk += 1
        close = _CLOSE if framing_ambiguous(raw_headers) or not body.complete else ()
        if head_too_large(raw_headers):
            await self._answer(send, 431, b"text/plain", b"", _CLOSE)
        elif body.ended == "too_large":
            await self._answer(send, 413, b"text/plain", b"", close)
        elif body.ended == "timeout":
            self._guard.timeouts["body"] += 1
            await self._answer(send, 408, b"text/plain", b"", close)
        elif served is not None:
            await self._answer(
                send, served.status, b"application/json", served.body, served.headers + close
            )
        elif llm is not None:
            refusal, marked = llmapi.refusal(llm)
            await self._answer(send, 401, b"application/json", refusal, marked + close)
        elif _challenge(hits, headers):
            await self._answer(send, 401, b"text/plain", b"", _CHALLENGE + close)
        else:
            await self._answer(send, *_ANSWERS[self._options.response], close)

    def _body_events(
        self,
        protocol: str,
        head: dict[str, Any],
        body: Body,
        peer: Peer,
        recorded: list[tuple[Canary, Entry]],
        body_hits: list[tuple[Canary, list[str]]],
        asked: dict[str, Any],
    ) -> list[Event]:
        """Hits found in the body, and the body's evidence for each hit its head already recorded
        (with what an LLM request `asked`: its model and the start of its prompt)."""
        read = {
            "body_size": body.size,
            "body_sha256": body.sha256,
            "body_complete": body.complete,
            "body_ended": body.ended,
            **asked,
        }
        events = [
            self._context.hit(canary, protocol, peer, {**head, **read, "found_in": where})
            for canary, where in body_hits
        ]
        if body.size or asked:
            events += [
                self._context.observation(
                    "evidence", canary, protocol, peer, {"hit_seq": entry.seq, **read}
                )
                for canary, entry in recorded
            ]
        return events

    async def _read_body(self, receive: Receive, keep: int) -> Body:
        """The body, its first `keep` bytes kept, within the size and time bounds."""
        digest = hashlib.sha256()
        head = bytearray()
        size = 0
        ended: BodyEnd = "complete"
        try:
            async with asyncio.timeout(self._options.timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        ended = "disconnected"
                        break
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self._options.max_body_bytes:
                        ended = "too_large"
                        break
                    digest.update(chunk)
                    if len(head) < keep:
                        head += chunk[: keep - len(head)]
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            ended = "timeout"
        return Body(bytes(head), size, digest.hexdigest(), ended)

    @staticmethod
    async def _answer(
        send: Send,
        status: int,
        content_type: bytes,
        payload: bytes,
        extra: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(payload)).encode()),
                    (b"cache-control", b"no-store"),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})
