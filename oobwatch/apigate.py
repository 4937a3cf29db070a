"""The admin API's front door: the token is checked, and the body bounded, before anything is read.

FastAPI reads and parses a request's whole body before it runs the
dependency that checks the bearer token, so an unauthenticated client could
make the node buffer any amount. This ASGI middleware runs first: a request
whose head is too large gets 431, one without a live token 401, one
declaring or sending more than `max_body_bytes` 413, one whose body does not
arrive within `timeout` 408, each closing the connection without reading the
rest. A request that passes carries its token in `request.state.token`, so
the endpoint's scope check does not look it up again.
"""

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sqlalchemy import Engine

from listeners.http import Headers, head_too_large
from store import tokens

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# Served to anyone: the OpenAPI document holds no data.
PUBLIC_PATHS = frozenset({"/openapi.json", "/healthz", "/readyz"})


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
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self._app(scope, receive, send)
            return
        headers: Headers = scope["headers"]
        if head_too_large(headers):
            await _refuse(send, 431, "request head too large")
            return
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
        scope.setdefault("state", {})["token"] = token
        await self._app(scope, _replay(body, receive), send)

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
