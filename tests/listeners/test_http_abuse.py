"""The HTTP listener under abuse: stalled heads and bodies, huge heads, ambiguous framing, unread replies.

Abuse comes from 127.0.0.1, the real hit from 127.0.0.2 (a different source on
the same loopback), through real sockets; every wait is bounded.
"""

import asyncio
import io
import json
import logging
import socket

import httpx
import pytest
from sqlalchemy import Engine

from canaries.tokens import is_plausible
from oobwatch import logs
from support import (
    ZONE,
    Node,
    hits,
    legacy_token,
    plant_canary,
    run_http,
    send_without_reading,
    settle,
)

OTHER_SOURCE = "127.0.0.2"


async def real_hit(node: Node, token: str) -> httpx.Response:
    transport = httpx.AsyncHTTPTransport(local_address=OTHER_SOURCE)
    async with httpx.AsyncClient(transport=transport, timeout=10) as client:
        return await client.get(
            f"http://127.0.0.1:{node.port}/", headers={"Host": f"{token}.{ZONE}"}
        )


async def connect(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def test_stalled_heads_cannot_keep_a_real_hit_out(sqlite_engine: Engine) -> None:
    """On main, 1,100 of these reached uvicorn's limit and a real hit got 503, unrecorded."""
    canary = plant_canary(sqlite_engine, "url")
    async with run_http(
        sqlite_engine,
        max_connections=64,
        max_connections_per_source=32,
        timeout=5.0,
        eviction_grace=1.0,
    ) as node:
        stalled = []
        guard = node.context.connections
        assert guard is not None
        try:
            for n in range(3):
                for _ in range(40):
                    reader, writer = await connect(node.port, f"127.0.{10 + n}.1")
                    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n")
                    stalled.append(writer)
            # Every one accepted and placed or refused (a loaded host takes a while).
            await settle(lambda: guard.open + sum(guard.refused.values()) >= 120)
            # Young connections are not closed for newcomers: the rest were refused, with a
            # protocol answer at once rather than a hang.
            assert guard.open == 64
            assert guard.refused["source"] == 2 * (40 - 32)
            assert guard.refused["total"] == 40
            reader, writer = await connect(node.port, "127.0.10.1")
            stalled.append(writer)
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 503 ")
            # Once they are older than the grace, a newcomer takes a stalled one's place.
            await asyncio.sleep(1.1)
            response = await real_hit(node, canary.token)
            assert response.status_code == 200
            assert len(hits(sqlite_engine)) == 1
            assert guard.evicted["fair"] == 1
            await settle(lambda: guard.open == 0)
            assert guard.open == 0
            assert guard.timeouts["head"] >= 60
        finally:
            for writer in stalled:
                writer.close()
    [hit] = hits(sqlite_engine)
    assert hit.source == OTHER_SOURCE


async def test_a_stalled_body_does_not_delay_a_hit_in_the_head(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "url")
    async with run_http(sqlite_engine, timeout=1.0) as node:
        reader, writer = await connect(node.port)
        writer.write(
            f"POST /upload HTTP/1.1\r\nHost: {canary.token}.{ZONE}\r\n"
            "Content-Length: 100000\r\n\r\npartial".encode()
        )
        await settle(lambda: len(hits(sqlite_engine)) == 1)
        assert len(hits(sqlite_engine)) == 1
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b"connection: close" in answer.lower()
        writer.close()
    [body] = hits(sqlite_engine, "evidence")
    assert body.evidence["body_ended"] == "timeout"
    assert body.evidence["body_size"] == len(b"partial")


async def test_a_huge_header_is_refused_and_closed(sqlite_engine: Engine) -> None:
    async with run_http(sqlite_engine) as node:
        reader, writer = await connect(node.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    status = answer.split(b"\r\n", 1)[0]
    assert status.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 400 ")), status


async def test_content_length_with_transfer_encoding_closes(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "url")
    async with run_http(sqlite_engine) as node:
        reader, writer = await connect(node.port)
        writer.write(
            f"POST /{canary.token} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    # One answer, then the connection is closed: the smuggled request is never served.
    assert answer.count(b"HTTP/1.1 ") == 1
    assert b"connection: close" in answer.lower()
    assert len(hits(sqlite_engine)) == 1


async def test_a_client_that_never_reads_its_replies_is_cut_off(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine, "url")
    async with run_http(sqlite_engine, timeout=0.5) as node:
        pipelined = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 200
        raw = await send_without_reading(node.port, pipelined, 3_000)
        guard = node.context.connections
        assert guard is not None
        await settle(lambda: guard.open == 0)
        assert guard.open == 0
        assert guard.timeouts["write"] + guard.timeouts["head"] >= 1
        raw.close()
        assert (await real_hit(node, canary.token)).status_code == 200
    assert len(hits(sqlite_engine)) == 1


async def test_a_closing_connection_whose_client_stops_reading_is_aborted(
    sqlite_engine: Engine,
) -> None:
    """close() waits for the buffer to drain; the client asks to close and never reads."""
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    async with run_http(sqlite_engine, timeout=0.5) as node:
        loop = asyncio.get_running_loop()
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        raw.setblocking(False)
        await loop.sock_connect(raw, ("127.0.0.1", node.port))
        await loop.sock_sendall(raw, request)
        await settle(lambda: len(node.listener._server._server.server_state.connections) == 1)
        [protocol] = list(node.listener._server._server.server_state.connections)
        transport = protocol.transport
        # Small batches, under the write high-water mark, until replies stay in user space.
        for _ in range(2_000):
            if transport.get_write_buffer_size():
                break
            await loop.sock_sendall(raw, request * 40)
            await asyncio.sleep(0.005)
        await loop.sock_sendall(
            raw, request + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        guard = node.context.connections
        assert guard is not None
        await settle(lambda: guard.open == 0)
        assert guard.open == 0
        assert sum(guard.timeouts.values()) >= 1
        raw.close()


async def test_token_shaped_words_cannot_push_a_canary_out_of_the_request(
    sqlite_engine: Engine,
) -> None:
    """On the first cut only the first 32 words were checked: junk in the query hid a canary."""
    canary = plant_canary(sqlite_engine, "url")
    async with run_http(sqlite_engine) as node:
        shaped = (legacy_token() for _ in range(200))
        # Leave out the one in 65,536 that passes the key's check by chance.
        words = [word for word in shaped if not is_plausible(word, node.index.key)]
        query = "&".join(f"a={word}" for word in words)
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(
                f"http://127.0.0.1:{node.port}/x?{query}",
                headers={"Authorization": f"Bearer {canary.token}"},
            )
        assert response.status_code == 200
        assert node.index.store_lookups == 0
    [hit] = hits(sqlite_engine)
    assert hit.evidence["found_in"] == ["header:authorization"]


async def test_uvicorns_own_warnings_are_rate_limited(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    stream = io.StringIO()
    logs.configure("json", "info", stream)
    canary = plant_canary(sqlite_engine, "url")
    async with run_http(sqlite_engine) as node:
        for _ in range(200):
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            await reader.read()
            writer.close()
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"http://127.0.0.1:{node.port}/{canary.token}")
        assert response.status_code == 200
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    invalid = [line for line in lines if line["message"] == "Invalid HTTP request received."]
    assert len(invalid) == 20
    assert [hit.canary_id for hit in hits(sqlite_engine)] == [canary.id]
