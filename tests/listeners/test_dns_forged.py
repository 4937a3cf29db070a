"""A flood of forged token names over real UDP: real hits still answer, the store is never asked."""

import asyncio
import itertools
import socket

import dns.asyncquery
import dns.message
import dns.rcode
from dnslib import DNSRecord
from sqlalchemy import Engine

from support import ZONE, forged_tokens, hits, plant_canary, plant_legacy_canary, run_dns

FORGED = 5000


async def udp(port: int, name: str) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=5)


async def test_real_hits_answer_during_a_forged_flood_without_store_lookups(
    sqlite_engine: Engine,
) -> None:
    canary = plant_canary(sqlite_engine)
    legacy = plant_legacy_canary(sqlite_engine)
    async with run_dns(sqlite_engine) as node:
        index = node.index
        packets = [
            DNSRecord.question(f"x.{token}.{ZONE}").pack()
            for token in forged_tokens(index.key, FORGED)
        ]
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sent = 0
        halfway, answered = asyncio.Event(), asyncio.Event()

        async def flood() -> None:
            """Forged names until at least FORGED are sent and the real queries are answered."""
            nonlocal sent
            for packet in itertools.cycle(packets):
                if sent >= FORGED and answered.is_set():
                    return
                await loop.sock_sendto(sock, packet, ("127.0.0.1", node.port))
                sent += 1
                if sent % 50 == 0:
                    # Let the listener drain its socket, as it would between kernel wake-ups.
                    await asyncio.sleep(0)
                if sent == FORGED // 2:
                    halfway.set()

        flooding = asyncio.create_task(flood())
        await halfway.wait()
        real = await udp(node.port, canary.value)
        old = await udp(node.port, legacy.value)
        assert index.store_lookups == 0
        fresh = plant_canary(sqlite_engine)  # minted now: only the store knows it
        new = await udp(node.port, fresh.value)
        answered.set()
        await flooding
        sock.close()
        assert [reply.rcode() for reply in (real, old, new)] == [dns.rcode.NOERROR] * 3
        assert index.store_lookups == 1  # for the fresh canary alone
        assert node.context.counters.hits == 3
        assert node.context.counters.junk > 0
    recorded = [entry.canary_id for entry in hits(sqlite_engine)]
    assert recorded == [canary.id, legacy.id, fresh.id]
