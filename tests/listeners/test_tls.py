"""The TLS listener over real sockets: the ClientHello is a hit before any certificate is trusted."""

import asyncio
import contextlib
import socket
import ssl
import subprocess

import httpx
import pytest
from sqlalchemy import Engine

from support import (
    ZONE,
    hits,
    plant_canary,
    resolving,
    run_tls,
    settle,
    trusting,
    trusting_anything,
)

OTHER_SOURCE = "127.0.0.2"


async def verifying_client(port: int, name: str, source: str = "127.0.0.1") -> str:
    """Connect as a careful client does: it checks the certificate, and refuses ours."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    try:
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=name, local_addr=(source, 0)
        )
    except ssl.SSLCertVerificationError:
        return "refused"
    writer.close()
    return "trusted"


async def test_a_client_that_refuses_our_certificate_has_left_its_hit(
    engine: Engine,
) -> None:
    canary = plant_canary(engine)
    async with run_tls(engine) as node:
        assert await verifying_client(node.port, f"api.{canary.value}") == "refused"
        await settle(lambda: len(hits(engine, "evidence")) == 1)
    [hit] = hits(engine)
    assert hit.canary_id == canary.id
    assert hit.protocol == "tls"
    assert hit.evidence["sni"] == f"api.{canary.value}"
    assert hit.evidence["alpn"] == ["h2", "http/1.1"]
    assert hit.evidence["left_labels"] == ["api"]
    assert hit.evidence["ja4"].startswith("t13d")
    assert "13" in hit.evidence["versions"]
    [ended] = hits(engine, "evidence")
    assert ended.evidence["handshake"] in ("rejected", "reset")


@pytest.mark.parametrize(
    "client",
    [
        lambda port, name: [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            name,
        ],
        lambda port, name: [
            "curl",
            "-sk",
            "--max-time",
            "5",
            "--resolve",
            f"{name}:{port}:127.0.0.1",
            f"https://{name}:{port}/",
        ],
    ],
    ids=["openssl", "curl"],
)
async def test_real_clients_complete_the_handshake_and_are_recorded(
    engine: Engine, client: object
) -> None:
    canary = plant_canary(engine)
    async with run_tls(engine) as node:
        port = node.port
        argv = client(port, canary.value)  # type: ignore[operator]
        await asyncio.to_thread(
            subprocess.run, argv, input=b"", capture_output=True, timeout=20, check=False
        )
        await settle(lambda: len(hits(engine, "evidence")) == 1)
    [hit, *requests] = hits(engine)
    assert hit.protocol == "tls"
    assert hit.evidence["sni"] == canary.value
    [ended] = hits(engine, "evidence")
    assert ended.evidence["handshake"] == "completed"
    # curl goes on to ask for the page: its request, decrypted, is a hit of its own.
    assert [(r.protocol, r.evidence["host"]) for r in requests] == (
        [("https", f"{canary.value}:{port}")] if "curl" in argv else []
    )


async def test_junk_and_missing_sni_are_counted_not_stored(engine: Engine) -> None:
    plant_canary(engine)
    async with run_tls(engine) as node:
        for name in (f"www.{ZONE}", "example.org", f"{'a' * 26}.{ZONE}"):
            assert await verifying_client(node.port, name) == "refused"
        context = trusting_anything()
        _, writer = await asyncio.open_connection("127.0.0.1", node.port, ssl=context)
        writer.close()
        await settle(lambda: node.context.counters.received == 4)
        assert node.context.counters.junk == 3
    assert hits(engine) == []


async def test_bytes_that_are_not_a_hello_and_stalled_hellos_are_dropped(
    engine: Engine,
) -> None:
    canary = plant_canary(engine)
    async with run_tls(engine, timeout=0.5, max_connections_per_source=8) as node:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        # Closed with the request unread: a reset is a close too.
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # Half a record header, then silence: cut off after the timeout, and many of them
        # from one source cannot keep another source's real hit out.
        stalled = []
        for _ in range(40):
            raw = socket.create_connection(("127.0.0.1", node.port))
            raw.sendall(b"\x16\x03")
            stalled.append(raw)
        assert await verifying_client(node.port, canary.value, OTHER_SOURCE) == "refused"
        guard = node.context.connections
        assert guard is not None
        await settle(lambda: guard.open == 0)
        assert guard.timeouts["hello"] >= 1
        assert node.context.counters.malformed == 1
        for raw in stalled:
            raw.close()
    [hit] = hits(engine)
    assert hit.source == OTHER_SOURCE


def real_hello(name: str) -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


async def test_a_hello_then_silence_is_a_handshake_timeout(engine: Engine) -> None:
    canary = plant_canary(engine)
    async with run_tls(engine, timeout=0.5) as node:
        raw = socket.create_connection(("127.0.0.1", node.port))
        raw.sendall(real_hello(canary.value))
        await settle(lambda: len(hits(engine, "evidence")) == 1)
        raw.close()
        guard = node.context.connections
        assert guard is not None
        assert guard.timeouts["handshake"] == 1
    [hit] = hits(engine)
    assert hit.evidence["sni"] == canary.value
    [ended] = hits(engine, "evidence")
    assert ended.evidence["handshake"] == "timeout"


async def test_evicted_sessions_end_so_the_caps_bound_descriptors(engine: Engine) -> None:
    """Partial hellos from many sources: each eviction must end its session, not just its slot."""
    canary = plant_canary(engine)
    options = {"max_connections": 16, "max_connections_per_source": 4, "eviction_grace": 0}
    async with run_tls(engine, timeout=5, **options) as node:
        opened = []
        most = 0
        for number in range(200):
            raw = socket.socket()
            raw.bind((f"127.0.{10 + number % 8}.1", 0))
            raw.connect(("127.0.0.1", node.port))
            raw.sendall(real_hello(canary.value)[:20])
            opened.append(raw)
            if number % 20 == 19:
                await asyncio.sleep(0.05)
                most = max(most, len(node.listener._front._sessions))
        assert most <= 16 + 20
        assert await verifying_client(node.port, canary.value, OTHER_SOURCE) == "refused"
        for raw in opened:
            raw.close()
    assert [hit.source for hit in hits(engine)] == [OTHER_SOURCE]


async def test_a_hello_in_many_tiny_records_is_refused(engine: Engine) -> None:
    plant_canary(engine)
    async with run_tls(engine) as node:
        handshake = real_hello("x.canary.example.test")[5:]
        tiny = b"".join(b"\x16\x03\x01\x00\x01" + handshake[i : i + 1] for i in range(100))
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write(tiny)
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert node.context.counters.malformed == 1


async def test_a_request_inside_tls_is_matched_as_plaintext_http_is(engine: Engine) -> None:
    named = plant_canary(engine)
    secret = plant_canary(engine, "credential", fmt="netrc")
    in_body = plant_canary(engine)
    async with run_tls(engine) as node:
        host = named.value
        async with httpx.AsyncClient(verify=trusting()) as client:
            with resolving(host):
                reply = await client.post(
                    f"https://{host}:{node.port}/v1/chat?x=1",
                    headers={"Authorization": f"Bearer {secret.token}", "User-Agent": "sdk/1"},
                    content=f"prompt {in_body.token} end".encode(),
                )
        assert reply.status_code == 200
        assert reply.http_version == "HTTP/1.1"
        await settle(lambda: len(hits(engine)) == 4)
    tls, *https = hits(engine)
    assert (tls.protocol, tls.canary_id) == ("tls", named.id)
    assert all(hit.protocol == "https" for hit in https)
    by_canary = {hit.canary_id: hit for hit in https}
    assert set(by_canary) == {named.id, secret.id, in_body.id}
    assert by_canary[named.id].evidence["found_in"] == ["host"]
    assert by_canary[secret.id].evidence["found_in"] == ["header:authorization"]
    assert by_canary[in_body.id].evidence["found_in"] == ["body"]
    assert by_canary[named.id].evidence["target"] == "/v1/chat?x=1"
    assert by_canary[named.id].evidence["user_agent"] == "sdk/1"


async def test_a_silent_client_after_the_handshake_is_cut_off_and_can_be_evicted(
    engine: Engine,
) -> None:
    canary = plant_canary(engine)
    options = {"max_connections": 4, "max_connections_per_source": 2, "eviction_grace": 0}
    async with run_tls(engine, timeout=1.0, **options) as node:
        guard = node.context.connections
        assert guard is not None
        # Handshakes completed, then nothing: the connections are held to the h11 bounds.
        silent = []
        for _ in range(2):
            _, writer = await asyncio.open_connection(
                "127.0.0.1", node.port, ssl=trusting(), server_hostname=f"www.{ZONE}"
            )
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            silent.append(writer)
        await settle(lambda: guard.open == 2)
        # A third from the same source takes the place of the idlest, which is ended.
        _, writer = await asyncio.open_connection(
            "127.0.0.1", node.port, ssl=trusting(), server_hostname=canary.value
        )
        silent.append(writer)
        await settle(lambda: guard.evicted["source"] == 1)
        await settle(lambda: guard.open == 0, 5)
        assert guard.timeouts["head"] >= 1
        for writer in silent:
            writer.close()
    assert [hit.protocol for hit in hits(engine)] == ["tls"]
