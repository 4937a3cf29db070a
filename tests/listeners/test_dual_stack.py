"""`listen = "::"` means every address: each listener takes IPv4 and IPv6 alike."""

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import dns.message
import dns.query
import pytest
from sqlalchemy import Engine

from support import ZONE, hits, plant_canary, run_dns, run_http, run_postgres, run_smtp, run_ssh

RUNNERS: dict[str, Callable[..., contextlib.AbstractAsyncContextManager[Any]]] = {
    "dns": run_dns,
    "smtp": run_smtp,
    "http": run_http,
    "postgres": run_postgres,
    "ssh": run_ssh,
}


async def connects(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


@pytest.mark.parametrize("name", sorted(RUNNERS))
async def test_a_listener_on_every_address_takes_ipv4_and_ipv6(
    sqlite_engine: Engine, name: str
) -> None:
    async with RUNNERS[name](sqlite_engine, listen="::") as node:
        port = node.port
        assert [await connects(host, port) for host in ("127.0.0.1", "::1")] == [True, True]
        if name == "dns":
            query = dns.message.make_query(f"www.{ZONE}", "SOA")
            for host in ("127.0.0.1", "::1"):
                answer = await asyncio.to_thread(dns.query.udp, query, host, port=port, timeout=5)
                assert answer.id == query.id


async def test_an_ipv4_hit_on_every_address_is_recorded_as_ipv4(sqlite_engine: Engine) -> None:
    """Through a dual-stack socket an IPv4 client is ::ffff:a.b.c.d; recorded as a.b.c.d, an
    ignore rule or a timeline filter for its IPv4 address matches it."""
    canary = plant_canary(sqlite_engine)
    async with run_dns(sqlite_engine, listen="::") as node:
        for host in ("127.0.0.1", "::1"):
            query = dns.message.make_query(canary.value, "A")
            await asyncio.to_thread(dns.query.udp, query, host, port=node.port, timeout=5)
    assert sorted(entry.source for entry in hits(sqlite_engine)) == ["127.0.0.1", "::1"]
