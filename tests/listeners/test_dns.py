"""The DNS listener over real UDP and TCP sockets, queried with dnspython."""

import asyncio
import socket

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from dnslib import DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select

from canaries.index import TokenIndex
from canaries.mint import retire
from listeners.base import Context
from listeners.burst import BurstFolder
from listeners.dns import DnsListener, DnsOptions
from store import ledger
from store.schema import ledger as ledger_table
from store.writer import LedgerWriter
from support import ZONE, hits, plant_canary, run_dns

QTYPES = [
    "A",
    "AAAA",
    "HTTPS",
    "SVCB",
    "MX",
    "TXT",
    "ANY",
    "CNAME",
    "SOA",
    "NS",
    "SRV",
    "CAA",
    "NULL",
]


def plant(engine: Engine) -> tuple[str, str]:
    canary = plant_canary(engine)
    return canary.id, canary.value


async def udp(port: int, name: str, qtype: str = "A", **kwargs: object) -> dns.message.Message:
    query = dns.message.make_query(name, qtype, **kwargs)  # type: ignore[arg-type]
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=5)


async def tcp(port: int, name: str, qtype: str = "A") -> dns.message.Message:
    return await dns.asyncquery.tcp(
        dns.message.make_query(name, qtype), "127.0.0.1", port=port, timeout=5
    )


async def test_every_query_type_fires_a_hit_over_udp_and_tcp(engine: Engine) -> None:
    canary_id, name = plant(engine)
    async with run_dns(engine) as node:
        for qtype in QTYPES:
            reply = await udp(node.port, f"x.y.{name}", qtype)
            assert reply.rcode() == dns.rcode.NOERROR
            reply = await tcp(node.port, name.upper(), qtype)
            assert reply.rcode() == dns.rcode.NOERROR
    recorded = hits(engine)
    assert len(recorded) == 2 * len(QTYPES)
    assert {entry.canary_id for entry in recorded} == {canary_id}
    assert [entry.evidence["qtype"] for entry in recorded[::2]] == QTYPES
    assert {entry.evidence["transport"] for entry in recorded} == {"udp", "tcp"}
    first = recorded[0]
    assert first.protocol == "dns"
    assert first.sandbox == "sbx-1"
    assert first.source == "127.0.0.1"
    assert isinstance(first.source_port, int)
    assert first.source_port > 0
    assert first.evidence["qname"] == f"x.y.{name}."
    assert first.evidence["left_labels"] == ["x", "y"]
    assert first.evidence["location"] == "/etc/hosts"


async def test_a_hit_is_committed_before_its_answer_arrives(engine: Engine) -> None:
    _, name = plant(engine)
    async with run_dns(engine) as node:
        for count in range(1, 21):
            await udp(node.port, f"n{count}.{name}")
            # Read straight after the answer, before yielding to the listener again.
            with engine.connect() as connection:
                recorded = connection.execute(
                    select(func.count())
                    .select_from(ledger_table)
                    .where(ledger_table.c.type == "hit")
                ).scalar_one()
            assert recorded == count


async def test_answer_flags_and_records(sqlite_engine: Engine) -> None:
    _, name = plant(sqlite_engine)
    async with run_dns(
        sqlite_engine, answer_ipv4=["192.0.2.7"], answer_ipv6=["2001:db8::7"]
    ) as node:
        reply = await udp(node.port, name, "A", use_edns=0)
        assert reply.flags & dns.flags.AA
        assert not reply.flags & dns.flags.RA
        assert reply.flags & dns.flags.RD
        assert [rdata.to_text() for rdata in reply.answer[0]] == ["192.0.2.7"]
        assert reply.edns == 0
        reply = await udp(node.port, name, "AAAA")
        assert [rdata.to_text() for rdata in reply.answer[0]] == ["2001:db8::7"]
        reply = await udp(node.port, ZONE, "SOA")
        assert reply.answer[0].rdtype == dns.rdatatype.SOA


async def test_names_outside_the_zone_are_refused(sqlite_engine: Engine) -> None:
    _, name = plant(sqlite_engine)
    async with run_dns(sqlite_engine) as node:
        for outside in ("www.example.com", "example.test", f"{name}.evil.com"):
            reply = await udp(node.port, outside)
            assert reply.rcode() == dns.rcode.REFUSED
            assert not reply.answer
            assert not reply.flags & dns.flags.AA
        assert node.context.counters.refused == 3
    assert hits(sqlite_engine) == []


async def test_junk_is_answered_like_a_canary_counted_and_not_stored(sqlite_engine: Engine) -> None:
    _, name = plant(sqlite_engine)
    async with run_dns(sqlite_engine) as node:
        real = await udp(node.port, name)
        fake_token = "a" * 26
        for junk in ("www", "mail", fake_token, "bbbbbbbbbbbbbbbbbbbbbbbbbb", "x." + fake_token):
            reply = await udp(node.port, f"{junk}.{ZONE}")
            assert reply.rcode() == real.rcode()
            assert [r.to_text() for r in reply.answer[0]] == [r.to_text() for r in real.answer[0]]
        assert node.context.counters.junk == 5
        assert node.context.counters.hits == 1
    with sqlite_engine.connect() as connection:
        assert ledger.head(connection)[0] == 2  # the mint and the one hit


async def test_a_canary_minted_after_start_is_recorded_on_first_query(
    sqlite_engine: Engine,
) -> None:
    async with run_dns(sqlite_engine) as node:
        canary_id, name = plant(sqlite_engine)  # not in the index: no refresh has run
        assert node.index.get(name.split(".")[0]) is None
        await udp(node.port, name)
    assert [entry.canary_id for entry in hits(sqlite_engine)] == [canary_id]


async def test_malformed_packets_are_dropped_or_formerr_and_counted(sqlite_engine: Engine) -> None:
    _, name = plant(sqlite_engine)
    async with run_dns(sqlite_engine) as node:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        target = ("127.0.0.1", node.port)
        for junk in (
            b"",
            b"\x00" * 5,
            b"\xff" * 40,
            b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x3f",
        ):
            await loop.sock_sendto(sock, junk, target)
        await loop.sock_sendto(sock, b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b"\x05ab", target)
        reply = await asyncio.wait_for(loop.sock_recv(sock, 512), 5)
        assert dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR
        sock.close()
        # The listener still serves real hits afterwards.
        assert (await udp(node.port, name)).rcode() == dns.rcode.NOERROR
        assert node.context.counters.malformed >= 4


async def test_opcodes_other_than_query_are_not_implemented(sqlite_engine: Engine) -> None:
    async with run_dns(sqlite_engine) as node:
        query = dns.message.make_query(f"x.{ZONE}", "A")
        query.set_opcode(dns.opcode.NOTIFY)
        reply = await dns.asyncquery.udp(query, "127.0.0.1", port=node.port, timeout=5)
        assert reply.rcode() == dns.rcode.NOTIMP


async def test_tcp_pipelined_queries_on_one_connection(sqlite_engine: Engine) -> None:
    _, name = plant(sqlite_engine)
    async with run_dns(sqlite_engine) as node:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        for index in range(10):
            wire = dns.message.make_query(f"p{index}.{name}", "A").to_wire()
            writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        writer.write_eof()
        for _ in range(10):
            size = int.from_bytes(await reader.readexactly(2), "big")
            assert (
                dns.message.from_wire(await reader.readexactly(size)).rcode() == dns.rcode.NOERROR
            )
        writer.close()
    assert len(hits(sqlite_engine)) == 10


@pytest.mark.parametrize("family", ["::1"])
async def test_ipv6_listener(sqlite_engine: Engine, family: str) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    _, name = plant(sqlite_engine)
    async with run_dns(sqlite_engine, listen=family) as node:
        query = dns.message.make_query(name, "A")
        reply = await dns.asyncquery.udp(query, "::1", port=node.port, timeout=5)
        assert reply.rcode() == dns.rcode.NOERROR
    [hit] = hits(sqlite_engine)
    assert (hit.source, hit.source_ip) == ("::1", "::1")
    assert hit.source_port


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    packet=st.binary(max_size=300)
    | st.builds(lambda b: b"\x12\x34\x01\x00\x00\x01" + b"\x00" * 6 + b, st.binary(max_size=80))
)
def test_any_packet_gets_a_well_formed_reply_or_none(sqlite_engine: Engine, packet: bytes) -> None:
    """The whole respond path, not just the parser: it never raises and never sends garbage."""
    index = TokenIndex(sqlite_engine)
    listener = DnsListener(
        Context(index, BurstFolder(LedgerWriter(sqlite_engine)), "n", ZONE), DnsOptions(zone=ZONE)
    )
    sent: list[bytes | None] = []
    listener.respond(packet, ("192.0.2.1", 53), lambda reply, _peer: sent.append(reply), "udp")
    # Each query is settled once: a reply, or None for one that gets no reply.
    assert len(sent) <= 1
    for reply in sent:
        if reply is None:
            continue
        parsed = DNSRecord.parse(reply)
        assert parsed.header.qr == 1
        assert len(reply) <= len(packet) + 120


async def test_a_retired_canary_still_records(sqlite_engine: Engine) -> None:
    canary = plant_canary(sqlite_engine)
    assert retire(sqlite_engine, canary.id, node="n", by="alice") is not None
    assert retire(sqlite_engine, "cn-none", node="n", by="alice") is None
    async with run_dns(sqlite_engine) as node:
        assert (await udp(node.port, canary.value)).rcode() == dns.rcode.NOERROR
    assert [entry.canary_id for entry in hits(sqlite_engine)] == [canary.id]
    [retired] = hits(sqlite_engine, "canary_retired")
    assert retired.evidence["by"] == "alice"
