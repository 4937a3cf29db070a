"""The PostgreSQL listener with real clients (psql, psycopg's libpq) and hostile bytes: a planted
.pgpass or URL, used, names its canary; every login fails with 28P01."""

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine

from listeners import pgwire
from support import ZONE, hits, plant_canary, run_postgres, settle, trusting_anything


def planted_url(value: str) -> str:
    return value.split("=", 1)[1].strip()


def connect(url: str, port: int, **extra: str) -> str:
    """psycopg (libpq) with the planted URL, its host reached at 127.0.0.1; what it was told."""
    try:
        psycopg.connect(url, hostaddr="127.0.0.1", port=port, connect_timeout=5, **extra)
    except psycopg.OperationalError as error:
        return str(error)
    raise AssertionError("a canary login succeeded")


async def test_the_planted_url_is_caught_by_its_tls_server_name_and_its_password(
    engine: Engine,
) -> None:
    canary = plant_canary(engine, "credential", fmt="postgres-url")
    async with run_postgres(engine) as node:
        told = await asyncio.to_thread(connect, planted_url(canary.value), node.port)
    assert "password authentication failed" in told
    recorded = hits(engine)
    assert {hit.canary_id for hit in recorded} == {canary.id}
    assert all(hit.protocol == "postgres" for hit in recorded)
    # sslmode=prefer: TLS first, naming the planted host; then (after the failure) without.
    first = recorded[0]
    assert first.evidence["trigger"] == "startup"
    assert first.evidence["found_in"] == ["sni"]
    assert first.evidence["sni"].startswith("db.")
    assert first.evidence["tls"] is True
    assert (first.evidence["user"], first.evidence["database"]) == ("app_rw", "app_production")
    [presented] = hits(engine, "evidence")
    assert presented.evidence["hit_seq"] == first.seq
    assert presented.evidence["secret_presented"] is True
    assert "password" not in presented.evidence
    assert any(h.evidence["found_in"] == ["password"] for h in recorded if h.seq != first.seq)


async def test_without_tls_the_password_names_the_canary(engine: Engine) -> None:
    canary = plant_canary(engine, "credential", fmt="postgres-url")
    async with run_postgres(engine) as node:
        told = await asyncio.to_thread(
            connect, planted_url(canary.value), node.port, sslmode="disable"
        )
    assert "password authentication failed" in told
    [hit] = hits(engine)
    assert hit.canary_id == canary.id
    assert hit.evidence["trigger"] == "password"
    assert hit.evidence["tls"] is False
    assert hit.evidence["password_length"] == len(canary.token)


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")
async def test_psql_with_the_planted_pgpass(engine: Engine, tmp_path: Path) -> None:
    canary = plant_canary(engine, "credential", fmt="pgpass")
    host, port, database, user, _ = canary.value.strip().split(":")
    async with run_postgres(engine) as node:
        # libpq matches .pgpass on host, port, database and user: the planted line, on
        # the test listener's port.
        pgpass = tmp_path / ".pgpass"
        pgpass.write_text(canary.value.replace(f":{port}:", f":{node.port}:"))
        pgpass.chmod(0o600)
        done = await asyncio.to_thread(
            subprocess.run,
            ["psql", "-w", "-c", "select 1"],
            env={
                "PATH": os.environ["PATH"],
                "HOME": str(tmp_path),
                "PGPASSFILE": str(pgpass),
                "PGHOST": host,
                "PGHOSTADDR": "127.0.0.1",
                "PGPORT": str(node.port),
                "PGUSER": user,
                "PGDATABASE": database,
                "PGAPPNAME": "psql",
                "PGCONNECT_TIMEOUT": "5",
            },
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode != 0
    assert "password authentication failed" in done.stderr
    recorded = hits(engine)
    assert {hit.canary_id for hit in recorded} == {canary.id}
    assert recorded[0].evidence["application_name"] == "psql"
    assert recorded[0].evidence["sni"] == host
    assert hits(engine, "evidence")[0].evidence["secret_presented"] is True


async def test_scram_clients_are_seen_as_far_as_their_first_message(engine: Engine) -> None:
    canary = plant_canary(engine, "credential", fmt="postgres-url")
    url = planted_url(canary.value)
    async with run_postgres(engine, auth="scram-sha-256") as node:
        told = await asyncio.to_thread(
            connect, url, node.port, require_auth="scram-sha-256", sslmode="require"
        )
    assert "password authentication failed" in told
    [hit] = hits(engine)
    assert hit.evidence["found_in"] == ["sni"]
    assert hit.evidence["auth"] == "scram-sha-256"
    [first] = hits(engine, "evidence")
    assert first.evidence["hit_seq"] == hit.seq
    assert first.evidence["sasl_mechanism"] == "SCRAM-SHA-256"
    assert first.evidence["secret_presented"] is False


async def test_a_client_that_requires_scram_still_leaves_its_server_name(engine: Engine) -> None:
    canary = plant_canary(engine, "credential", fmt="postgres-url")
    async with run_postgres(engine) as node:
        told = await asyncio.to_thread(
            connect, planted_url(canary.value), node.port, require_auth="scram-sha-256"
        )
    # libpq refuses to send a cleartext password; its TLS server name was a hit already.
    assert "password" in told
    assert [hit.evidence["found_in"] for hit in hits(engine)] == [["sni"]]


async def test_a_token_in_the_user_or_database_counts(engine: Engine) -> None:
    canary = plant_canary(engine)
    async with run_postgres(engine) as node:
        told = await asyncio.to_thread(
            connect,
            f"postgresql://svc_{canary.token}@x.example/{canary.token}",
            node.port,
            sslmode="disable",
            password="whatever",
        )
    assert "password authentication failed" in told
    [hit] = hits(engine)
    assert hit.evidence["found_in"] == ["user", "database"]


async def raw(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    try:
        return await asyncio.wait_for(reader.read(4096), 10)
    finally:
        writer.close()


async def test_bytes_that_are_not_the_protocol_get_08P01_and_nothing_is_stored(
    engine: Engine,
) -> None:
    plant_canary(engine)
    async with run_postgres(engine) as node:
        for junk in (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            struct.pack("!i", 1_000_000) + b"x",
            struct.pack("!ii", 8, 2 << 16),
            pgwire.startup_message({"user": "u"}) + b"Q\x00\x00\x00\x05x",
        ):
            answer = await raw(node.port, junk)
            assert answer.endswith(pgwire.error("08P01", "invalid frontend message"))
        assert node.context.counters.malformed == 4
    assert hits(engine) == []


async def test_a_stalled_client_is_cut_off_and_cannot_hold_the_listener(engine: Engine) -> None:
    canary = plant_canary(engine)
    async with run_postgres(engine, timeout=0.5, max_connections_per_source=4) as node:
        guard = node.context.connections
        assert guard is not None
        stalled = []
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", node.port))
            sock.sendall(b"\x00\x00")
            stalled.append(sock)
        await settle(lambda: guard.open == 4)
        assert guard.open == 4
        await settle(lambda: guard.open == 0, 5)
        assert guard.open == 0
        assert guard.timeouts["step"] >= 1
        told = await asyncio.to_thread(
            connect,
            f"postgresql://{canary.token}@x.example/app",
            node.port,
            sslmode="disable",
            password="p",
        )
        assert "password authentication failed" in told
        for sock in stalled:
            sock.close()
    assert [hit.canary_id for hit in hits(engine)] == [canary.id]


async def test_over_the_cap_a_client_is_told_too_many_clients(engine: Engine) -> None:
    async with run_postgres(
        engine, max_connections=1, max_connections_per_source=1, eviction_grace=60
    ) as node:
        holder = socket.create_connection(("127.0.0.1", node.port))
        holder.sendall(b"\x00")
        await settle(
            lambda: node.context.connections is not None and node.context.connections.open == 1
        )
        answer = await raw(node.port, pgwire.startup_message({"user": "u"}))
        holder.close()
    assert b"C53300\x00" in answer


async def test_sessions_evicted_mid_handshake_end_quietly(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Eviction under a TLS handshake leaves asyncio without a transport: the session ends as
    a reset, nothing escapes to asyncio's unhandled-exception log."""
    options = {"max_connections": 2, "max_connections_per_source": 1, "eviction_grace": 0}
    async with run_postgres(engine, **options) as node:
        guard = node.context.connections
        assert guard is not None
        opened = []
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for _ in range(10):
                sock = socket.create_connection(("127.0.0.1", node.port))
                sock.sendall(struct.pack("!ii", 8, 80877103))
                opened.append(sock)
                await asyncio.sleep(0.05)
            for sock in opened:
                sock.close()
            await settle(lambda: guard.open == 0, 5)
        assert guard.open == 0
        assert guard.evicted["source"] >= 5
    assert not [r for r in caplog.records if "exception" in r.getMessage().lower()]


async def test_plaintext_sent_before_the_tls_handshake_is_refused(engine: Engine) -> None:
    canary = plant_canary(engine)
    async with run_postgres(engine) as node:
        startup = pgwire.startup_message({"user": canary.token})
        answer = await raw(node.port, struct.pack("!ii", 8, 80877103) + startup)
    assert answer.endswith(pgwire.error("08P01", "invalid frontend message"))
    assert hits(engine) == []


async def test_a_tls_session_is_closed_at_once_after_its_answer(engine: Engine) -> None:
    """No wait for the client's close_notify (asyncio's TLS close would hold the socket 30 s
    after the slot was given back)."""
    canary = plant_canary(engine, "credential", fmt="postgres-url")

    def client(port: int) -> tuple[bytes, float]:
        context = trusting_anything()
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(struct.pack("!ii", 8, 80877103))
        assert sock.recv(1) == b"S"
        with context.wrap_socket(sock, server_hostname=f"db.{canary.token}.{ZONE}") as tls:
            tls.sendall(pgwire.startup_message({"user": "app_rw", "database": "app"}))
            assert tls.recv(9) == pgwire.auth_cleartext()
            tls.sendall(b"p\x00\x00\x00\x06x\x00")
            started = time.monotonic()
            received = b""
            # Read until the server closes, never sending close_notify ourselves.
            with contextlib.suppress(ssl.SSLError, OSError):
                while chunk := tls.recv(4096):
                    received += chunk
            return received, time.monotonic() - started

    async with run_postgres(engine) as node:
        received, waited = await asyncio.to_thread(client, node.port)
    assert b"C28P01\x00" in received
    assert waited < 3
    assert hits(engine)[0].evidence["found_in"] == ["sni"]


async def test_control_characters_a_client_sends_are_not_kept(engine: Engine) -> None:
    canary = plant_canary(engine)
    async with run_postgres(engine) as node:
        startup = pgwire.startup_message(
            {"user": canary.token, "application_name": "\x1b]0;pwn\x07\r\nevil"}
        )
        await raw(node.port, startup)
    [hit] = hits(engine)
    assert hit.evidence["application_name"] == "?]0;pwn???evil"
