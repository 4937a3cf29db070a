"""The catch-all HTTP listener: any request carrying a token is a hit, recorded before the answer.

Served by uvicorn (h11) inside the node's loop, on its own port, never the
admin API's. Headers are bounded by h11, bodies by `max_body`; the answer is
fixed by configuration and never echoes anything from the request.
"""

import asyncio
import contextlib
import hashlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import uvicorn
from pydantic import Field

from canaries.find import in_request, split_name
from canaries.model import Canary
from listeners.base import Context, ListenerOptions, NotDurable, Port

log = logging.getLogger(__name__)

Response = Literal["empty", "404", "pixel"]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

BODY_SCANNED = 1024
MAX_HEADERS_KEPT = 50
MAX_VALUE_KEPT = 512
MAX_TARGET_KEPT = 2048
_PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
_ANSWERS: dict[str, tuple[int, bytes, bytes]] = {
    "empty": (200, b"text/plain", b""),
    "404": (404, b"text/plain", b"Not Found\n"),
    "pixel": (200, b"image/gif", _PIXEL),
}


# Clients such as git and docker send a stored secret only when challenged.
_CHALLENGE = ((b"www-authenticate", b'Basic realm="restricted"'),)


def _challenge(hits: list[tuple[Canary, list[str]]], headers: list[tuple[str, str]]) -> bool:
    """Challenge for credentials when a credential canary's host is asked without any."""
    unauthenticated = all(name.lower() != "authorization" for name, _ in headers)
    return unauthenticated and any(canary.kind == "credential" for canary, _ in hits)


class HttpOptions(ListenerOptions):
    """`[http]`: how it binds, what everyone gets back, and how much body it reads."""

    port: Port = 8080
    response: Response = "empty"
    max_body_bytes: Annotated[int, Field(ge=1024, le=100 * 1024 * 1024)] = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Body:
    """What was read of a request body: its first bytes, size and hash."""

    head: bytes
    size: int
    sha256: str
    complete: bool


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the node owns SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AsgiServer:
    """An ASGI app served by uvicorn (h11) on its own socket, inside the running loop."""

    def __init__(self, app: Any, listen: str, port: int) -> None:
        self._app = app
        self._listen = listen
        self._port = port
        self._socket: socket.socket | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._socket is None:
            return []
        host, port = self._socket.getsockname()[:2]
        return [(host, port)]

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._listen else socket.AF_INET
        listening = socket.socket(family, socket.SOCK_STREAM)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((self._listen, self._port))
        listening.listen(512)
        listening.setblocking(False)
        self._socket = listening
        config = uvicorn.Config(
            self._app,
            http="h11",
            interface="asgi3",
            lifespan="off",
            # The client is the peer that connected, never a header it sent.
            proxy_headers=False,
            access_log=False,
            server_header=False,
            date_header=True,
            log_level="warning",
            h11_max_incomplete_event_size=16 * 1024,
            limit_concurrency=1000,
            timeout_keep_alive=5,
        )
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
        self._context = context
        self._options = options
        self._zone = split_name(context.zone)
        self._server = AsgiServer(self.app, options.listen, options.port)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self._server.addresses

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop()

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application every request goes through."""
        if scope["type"] != "http":
            return
        counters = self._context.counters
        counters.received += 1
        body = await self._read_body(receive)
        headers = [
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in scope["headers"]
        ]
        host = next((value for name, value in headers if name.lower() == "host"), "")
        target = scope.get("raw_path", b"").decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        found = in_request(host, target, headers, body.head.decode("utf-8", "replace"), self._zone)
        hits: list[tuple[Canary, list[str]]] = []
        for candidate, where in found.items():
            canary = await self._context.index.lookup(candidate)
            if canary is not None:
                hits.append((canary, where))
        if hits:
            peer = scope.get("client") or ("?", 0)
            evidence = {
                "method": scope["method"],
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
                "body_size": body.size,
                "body_sha256": body.sha256,
                "body_complete": body.complete,
            }
            events = [
                self._context.hit(canary, "http", peer, {**evidence, "found_in": where})
                for canary, where in hits
            ]
            try:
                await self._context.record(*events)
            except NotDurable:
                await self._answer(send, 503, b"text/plain", b"")
                return
        else:
            counters.junk += 1
        if not body.complete:
            await self._answer(send, 413, b"text/plain", b"")
        elif _challenge(hits, headers):
            await self._answer(send, 401, b"text/plain", b"", _CHALLENGE)
        else:
            await self._answer(send, *_ANSWERS[self._options.response])

    async def _read_body(self, receive: Receive) -> Body:
        digest = hashlib.sha256()
        head = bytearray()
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._options.max_body_bytes:
                return Body(bytes(head), size, digest.hexdigest(), complete=False)
            digest.update(chunk)
            if len(head) < BODY_SCANNED:
                head += chunk[: BODY_SCANNED - len(head)]
            if not message.get("more_body", False):
                break
        return Body(bytes(head), size, digest.hexdigest(), complete=True)

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
