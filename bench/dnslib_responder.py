"""Baseline for bench/dnsbench.py: the plainest asyncio + dnslib authoritative responder.

Every name under the zone gets one A record; anything outside it is REFUSED.
No store, no tokens: this is the floor a Python DNS server on asyncio's
datagram transport and dnslib's parse/reply/pack costs.

Usage: python bench/dnslib_responder.py ZONE PORT
"""

import asyncio
import contextlib
import sys
from typing import cast

from dnslib import QTYPE, RCODE, RR, A, DNSLabel, DNSRecord


class Responder(asyncio.DatagramProtocol):
    """Answers A for every name under one zone, REFUSED elsewhere."""

    def __init__(self, zone: str) -> None:
        self._zone = DNSLabel(zone)
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector datagram transport does not subclass DatagramTransport.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return
        reply = request.reply()
        # reply() copies RD and sets RA; an authoritative server offers no recursion.
        reply.header.ra = 0
        qname = request.q.qname
        if qname.matchSuffix(self._zone):
            reply.header.aa = 1
            if request.q.qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=0))
        else:
            reply.header.aa = 0
            reply.header.rcode = RCODE.REFUSED
        assert self._transport is not None
        self._transport.sendto(reply.pack(), addr)


async def main(zone: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: Responder(zone), local_addr=("127.0.0.1", port)
    )
    host, bound = transport.get_extra_info("sockname")[:2]
    print(f"dns listening on {host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        transport.close()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(sys.argv[1], int(sys.argv[2])))
