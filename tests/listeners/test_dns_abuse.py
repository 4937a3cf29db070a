"""DNS over TCP under abuse: connection caps that cannot be escaped, while a real hit still lands.

Each test floods from 127.0.0.1 and sends its real hit from 127.0.0.2 (Linux
answers for all of 127.0.0.0/8), so the per-source bounds are exercised as an
intruder would meet them: one source abusing, another one using a canary.
"""

import asyncio
import os

import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from sqlalchemy import Engine

from canaries import index as index_module
from support import ZONE, Node, hits, plant_canary, run_dns, send_without_reading, settle

OTHER_SOURCE = "127.0.0.2"
# Outside 127.0.0.0/24, the network of both sources above.
OTHER_NETWORK = "127.0.1.2"


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def real_hit(node: Node, name: str, source: str = OTHER_SOURCE) -> dns.message.Message:
    query = dns.message.make_query(f"data.{name}", "A")
    return await dns.asyncquery.tcp(query, "127.0.0.1", port=node.port, timeout=10, source=source)


async def test_unanswerable_last_frames_do_not_hold_sockets(sqlite_engine: Engine) -> None:
    """The repro: a frame shorter than a header, then close. On main each one held a socket 10 s."""
    canary = plant_canary(sqlite_engine)
    async with run_dns(sqlite_engine) as node:
        before = open_descriptors()
        most = before
        for round_ in range(20):
            clients = []
            for _ in range(30):
                _, writer = await asyncio.open_connection("127.0.0.1", node.port)
                writer.write(b"\x00\x03\x01\x02\x03")
                clients.append(writer)
            await asyncio.sleep(0)
            for writer in clients:
                writer.close()
            await asyncio.sleep(0.05)
            most = max(most, open_descriptors())
            if round_ == 10:
                reply = await real_hit(node, canary.value)
                assert reply.rcode() == dns.rcode.NOERROR
        guard = node.context.connections
        assert guard is not None
        await settle(lambda: guard.open == 0)
        assert guard.open == 0
        assert open_descriptors() <= before + 5
        # 600 connections went through; never more than about one round's were open at once.
        assert most - before <= 2 * 30 + guard.per_source
        assert node.context.counters.malformed >= 500
    assert [hit.canary_id for hit in hits(sqlite_engine)] == [canary.id]


async def test_a_client_that_never_reads_is_cut_off(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine)
    async with run_dns(sqlite_engine, timeout=0.5) as node:
        query = dns.message.make_query(f"junk.{ZONE}", "TXT").to_wire()
        framed = (len(query).to_bytes(2, "big") + query) * 50
        # Pipeline queries and never read: the replies pile up until the listener gives up.
        raw = await send_without_reading(node.port, framed, 2_000)
        guard = node.context.connections
        assert guard is not None
        await settle(lambda: guard.open == 0)
        assert guard.open == 0
        assert guard.timeouts["write"] + guard.timeouts["read"] >= 1
        raw.close()
        reply = await real_hit(node, canary.value)
        assert reply.rcode() == dns.rcode.NOERROR
    [hit] = hits(sqlite_engine)
    assert hit.source == OTHER_SOURCE


async def test_one_source_cannot_take_every_connection(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine)
    async with run_dns(
        sqlite_engine,
        max_connections=16,
        max_connections_per_source=12,
        timeout=30,
        eviction_grace=0,
    ) as node:
        idle = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(20)]
        await asyncio.sleep(0.1)
        guard = node.context.connections
        assert guard is not None
        assert guard.open == 12
        # The newest connection wins: the source lost its own oldest eight.
        assert guard.evicted["source"] == 8
        # Four more networks fill the total; then a fifth takes the place of the busiest's oldest.
        others = [
            await asyncio.open_connection("127.0.0.1", node.port, local_addr=(f"127.0.{n}.1", 0))
            for n in range(3, 7)
        ]
        await asyncio.sleep(0.05)
        assert guard.open == 16
        reply = await real_hit(node, canary.value, OTHER_NETWORK)
        assert reply.rcode() == dns.rcode.NOERROR
        assert guard.evicted["fair"] == 1
        for _, writer in idle + others:
            writer.close()
    [hit] = hits(sqlite_engine)
    assert hit.source == OTHER_NETWORK


async def test_half_closed_sessions_still_get_their_answers(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine)
    async with run_dns(sqlite_engine) as node:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        for n in range(3):
            query = dns.message.make_query(f"q{n}.{canary.value}", "A").to_wire()
            writer.write(len(query).to_bytes(2, "big") + query)
        writer.write_eof()
        answers = []
        for _ in range(3):
            size = int.from_bytes(await reader.readexactly(2), "big")
            answers.append(dns.message.from_wire(await reader.readexactly(size)))
        assert await reader.read() == b""
        writer.close()
    assert all(answer.rcode() == dns.rcode.NOERROR for answer in answers)
    assert len(hits(sqlite_engine)) == 3


async def test_a_flooding_source_still_leaves_its_own_hit(sqlite_engine: Engine) -> None:
    """An intruder that fills its share with stalled sessions, then uses a canary itself."""
    canary = plant_canary(sqlite_engine)
    async with run_dns(
        sqlite_engine, max_connections_per_source=8, timeout=30, eviction_grace=0
    ) as node:
        stalled = [await asyncio.open_connection("127.0.0.1", node.port) for _ in range(8)]
        for _, writer in stalled:
            writer.write(b"\x00\x40")
        query = dns.message.make_query(f"own.{canary.value}", "A")
        reply = await dns.asyncquery.tcp(query, "127.0.0.1", port=node.port, timeout=10)
        assert reply.rcode() == dns.rcode.NOERROR
        for _, writer in stalled:
            writer.close()
    [hit] = hits(sqlite_engine)
    assert hit.source == "127.0.0.1"


async def test_a_token_that_cannot_be_looked_up_gets_servfail_never_a_junk_answer(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the first cut, a full lookup queue answered a just-minted canary as junk, unrecorded."""
    async with run_dns(sqlite_engine) as node:
        # Minted after the listener loaded its index: only a store lookup can find it.
        canary = plant_canary(sqlite_engine)
        monkeypatch.setattr(index_module, "MAX_PENDING", 0)
        reply = await dns.asyncquery.udp(
            dns.message.make_query(canary.value, "A"), "127.0.0.1", port=node.port, timeout=5
        )
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert hits(sqlite_engine) == []
        monkeypatch.undo()
        # The resolver's retry is looked up, recorded, then answered.
        reply = await dns.asyncquery.udp(
            dns.message.make_query(canary.value, "A"), "127.0.0.1", port=node.port, timeout=5
        )
        assert reply.rcode() == dns.rcode.NOERROR
        assert node.context.counters.record_failures == 1
    assert [hit.canary_id for hit in hits(sqlite_engine)] == [canary.id]


async def test_runt_frames_end_a_session(sqlite_engine: Engine) -> None:
    async with run_dns(sqlite_engine) as node:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write(b"\x00\x00" * 20_000)
        # Closed after a few frames shorter than a header, not after 20,000 of them.
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert node.context.counters.received <= 20
