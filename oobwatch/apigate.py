"""The admin API's front door: the token is checked, and the body bounded, before anything is read.

FastAPI reads and parses a request's whole body before it runs the
dependency that checks the bearer token, so an unauthenticated client could
make the node buffer any amount. This ASGI middleware runs first: a request
whose head is too large gets 431, one without a live token 401, one
declaring or sending more than `max_body_bytes` 413, one whose body does not
arrive within `timeout` 408, each closing the connection without reading the
rest. A request that passes carries its token in `request.state.token`, so
the endpoint's scope check does not look it up again.

The web console (`/ui/`) is signed in with a session cookie instead of a
bearer token, and only with one: a page asked for without a live session is
sent to the sign-in form, anything else gets 401. Every console answer,
refusals included, carries the console's security headers.
"""

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine

from listeners.http import Headers, head_too_large
from oobwatch.console.render import SECURITY_HEADERS
from oobwatch.console.signin import COOKIE, cookie_value
from store import sessions, tokens

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# Served to anyone: the OpenAPI document holds no data, the probes say only ok or not, and
# the favicon is empty.
PUBLIC_PATHS = frozenset({"/openapi.json", "/healthz", "/readyz", "/favicon.ico"})
CONSOLE = "/ui"
# The console's pages for signing in, served without a session.
SIGN_IN = frozenset({"/ui/login"})
LINK_PREFIX = "/ui/login/link/"


def in_console(path: str) -> bool:
    return path == CONSOLE or path.startswith(CONSOLE + "/")


class TooLarge(Exception):
    """The body grew past the cap."""


class ApiGate:
    """Authenticate, then read a bounded body, then hand the request to the app."""

    def __init__(self, app: App, engine: Engine, max_body_bytes: int, timeout: float) -> None:
        self._app = app
        self._engine = engine
        self._max_body = max_body_bytes
        self._timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in PUBLIC_PATHS:
            await self._app(scope, receive, send)
            return
        headers: Headers = scope["headers"]
        console = in_console(path)
        if console:
            send = _with_headers(send, SECURITY_HEADERS)
        if head_too_large(headers):
            await _refuse(send, 431, "request head too large")
            return
        if path == "/":
            await _refuse(send, 307, "the console is at /ui/", ((b"location", b"/ui/"),))
            return
        state = scope.setdefault("state", {})
        if console:
            if not await self._signed_in(scope, state, send):
                return
        else:
            presented = _bearer(headers)
            token = (
                None
                if presented is None
                else await asyncio.to_thread(tokens.authenticate, self._engine, presented)
            )
            if token is None:
                await _refuse(
                    send,
                    401,
                    "a valid bearer token is required",
                    ((b"www-authenticate", b"Bearer"),),
                )
                return
            state["token"] = token
        if _declared_length(headers) > self._max_body:
            await _refuse(send, 413, f"bodies are limited to {self._max_body} bytes")
            return
        try:
            async with asyncio.timeout(self._timeout):
                body = await self._body(receive)
        except TooLarge:
            await _refuse(send, 413, f"bodies are limited to {self._max_body} bytes")
            return
        except TimeoutError:
            await _refuse(send, 408, "the request body did not arrive in time")
            return
        # Kept for the console's form handlers, which run off the event loop (as plain
        # functions, in the thread pool) and so cannot await the body.
        state["body"] = body
        await self._app(scope, _replay(body, receive), send)

    async def _signed_in(self, scope: Scope, state: dict[str, Any], send: Send) -> bool:
        """Whether a console request may go on: a sign-in page, or a live session's."""
        path = scope["path"]
        if path in SIGN_IN or path.startswith(LINK_PREFIX):
            return True
        value = cookie_value(scope["headers"], COOKIE)
        session = (
            None if value is None else await asyncio.to_thread(sessions.find, self._engine, value)
        )
        if session is not None:
            state["session"] = session
            state["token"] = session.token
            return True
        if scope["method"] in ("GET", "HEAD"):
            # As sent, not decoded: a sandbox named `a?b` comes back to its own page.
            raw = (scope.get("raw_path") or path.encode()).decode("latin-1")
            query = scope.get("query_string", b"").decode("latin-1")
            target = quote(raw + (f"?{query}" if query else ""), safe="")
            location = f"/ui/login?next={target}".encode()
            await _refuse(send, 303, "sign in first", ((b"location", location),))
        else:
            await _refuse(send, 401, "sign in first: the session has ended")
        return False

    async def _body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _bearer(headers: Headers) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
    return None


def _declared_length(headers: Headers) -> int:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read once, then whatever the connection says next (such as a disconnect)."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


async def _refuse(
    send: Send, status: int, detail: str, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                # The body, if any, was not read: the connection cannot carry another request.
                (b"connection", b"close"),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _with_headers(send: Send, extra: tuple[tuple[bytes, bytes], ...]) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending
