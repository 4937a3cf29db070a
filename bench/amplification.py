"""Amplification benchmark: how much larger than its query each DNS answer is.

For each config below, the real DnsListener is started in this process on
127.0.0.1, port 0 (as the tests start it), and dnspython sends one UDP query
for every query type the server tells apart (and one it does not know), each
three ways: without EDNS, with EDNS, and with EDNS and the DO bit. Each goes
to four names: the zone apex, a random name under the zone, a minted canary's
token name (answered once its hit is committed), and a name outside the zone
(REFUSED). For every query it reports the query and answer sizes in bytes,
the bytes the answer adds (answer - query) and the ratio (answer / query),
then the largest ratio and the most bytes added, and the case of each.

Configs:

- default: `DnsOptions(zone=canary.example.test)`, one A, no AAAA, ns1.<zone>;
- largest: everything at its limit: 4 A, 4 AAAA, a 173-character zone (the
  most the token check allows) and two 42-character nameservers outside the
  zone, which nothing in the answer can compress (the longest that fit the bound);
- largest, 1-char zone: the same records for the shortest zone allowed, so the
  smallest queries: the worst ratio;
- over the bound: two 253-character nameservers outside the zone, which
  `ZoneAnswers` refuses at startup because its answers would add more than
  `MAX_GROWTH` bytes (the row says whether it started).

Bounded: 4 configs x 4 names x 17 types x 3 ways = 816 queries, one at a
time, each waited for at most `--timeout` seconds; 127.0.0.1 only.

Usage: python bench/amplification.py [--timeout SECONDS]
"""

import argparse
import asyncio
import random
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
from dnsbench import markdown_table

from canaries.index import TokenIndex
from canaries.mint import mint
from listeners import dnswire
from listeners.base import Context
from listeners.burst import BurstFolder
from listeners.dns import DnsListener, DnsOptions
from store.engine import migrate, open_engine
from store.writer import LedgerWriter

QTYPES = [
    "A",
    "AAAA",
    "ANY",
    "SOA",
    "NS",
    "TXT",
    "MX",
    "CNAME",
    "PTR",
    "SRV",
    "CAA",
    "HTTPS",
    "SVCB",
    "DNSKEY",
    "TYPE65280",
    "AXFR",
    "IXFR",
]
WAYS: dict[str, dict[str, Any]] = {
    "no EDNS": {},
    "EDNS": {"use_edns": 0},
    "EDNS+DO": {"use_edns": 0, "want_dnssec": True},
}
OUTSIDE = "example.com"

LONG_ZONE = ".".join(["l" * 63, "o" * 63, "n" * 40, "test"])
# The longest two names outside the zone whose NS answer still fits MAX_GROWTH.
MAX_NAMESERVERS = [f"ns{n}.{'x' * 26}.example.net" for n in (1, 2)]
OVERSIZED_NAMESERVERS = [".".join([f"{n}" * 63, "y" * 63, "z" * 63, "w" * 61]) for n in (1, 2)]
FOUR_IPV4 = [f"192.0.2.{n}" for n in range(1, 5)]
FOUR_IPV6 = [f"2001:db8::{n}" for n in range(1, 5)]
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {"zone": "canary.example.test"},
    "largest": {
        "zone": LONG_ZONE,
        "answer_ipv4": FOUR_IPV4,
        "answer_ipv6": FOUR_IPV6,
        "nameservers": MAX_NAMESERVERS,
    },
    "largest, 1-char zone": {
        "zone": "z",
        "answer_ipv4": FOUR_IPV4,
        "answer_ipv6": FOUR_IPV6,
        "nameservers": MAX_NAMESERVERS,
    },
    "over the bound": {"zone": "canary.example.test", "nameservers": OVERSIZED_NAMESERVERS},
}


@dataclass
class Exchange:
    """One query and its answer, by size."""

    config: str
    name: str
    qtype: str
    way: str
    query: int
    answer: int
    rcode: str
    records: str
    opt: str

    @property
    def added(self) -> int:
        return self.answer - self.query

    @property
    def ratio(self) -> float:
        return self.answer / self.query

    def case(self) -> str:
        return (
            f"{self.config}: {self.qtype} for the {self.name} name, {self.way}, "
            f"{self.query}-byte query -> {self.answer}-byte {self.rcode} answer"
        )


@dataclass
class ConfigRun:
    """Everything measured for one config, or why it did not start."""

    config: str
    zone: str
    exchanges: list[Exchange] = field(default_factory=list)
    refused_at_start: str = ""


async def ask(sock: socket.socket, port: int, query: dns.message.Message) -> bytes:
    """Send `query` over UDP and return the first datagram back with its id."""
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(sock, query.to_wire(), ("127.0.0.1", port))
    while True:
        reply = await loop.sock_recv(sock, 65535)
        if reply[:2] == query.id.to_bytes(2, "big"):
            return reply


async def measure(config: str, database: Path, wait: float) -> ConfigRun:
    options = DnsOptions(port=0, **CONFIGS[config])
    run = ConfigRun(config, options.zone)
    engine = open_engine(f"sqlite:///{database}")
    migrate(engine)
    canary = mint(engine, kind="dns", zone=options.zone, sandbox="bench", node="bench")
    writer = LedgerWriter(engine)
    writer.start()
    index = TokenIndex(engine)
    index.refresh()
    try:
        listener = DnsListener(Context(index, BurstFolder(writer), "bench", options.zone), options)
    except ValueError as error:
        run.refused_at_start = str(error)
        await writer.stop()
        engine.dispose()
        return run
    await listener.start()
    rng = random.Random(20261124)
    names = {
        "apex": options.zone,
        "random": "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=10))
        + "."
        + options.zone,
        "token": canary.value,
        "outside": OUTSIDE,
    }
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        port = listener.addresses[0][1]
        for kind, name in names.items():
            for qtype in QTYPES:
                for way, edns in WAYS.items():
                    query = dns.message.make_query(name, qtype, **edns)
                    async with asyncio.timeout(wait):
                        wire = await ask(sock, port, query)
                    reply = dns.message.from_wire(wire)
                    run.exchanges.append(
                        Exchange(
                            config,
                            kind,
                            qtype,
                            way,
                            len(query.to_wire()),
                            len(wire),
                            dns.rcode.to_text(reply.rcode()),
                            records(reply),
                            opt(reply),
                        )
                    )
    finally:
        sock.close()
        await listener.stop()
        await writer.stop()
        engine.dispose()
    return run


def records(reply: dns.message.Message) -> str:
    """What an answer holds: its rcode, answer records, authority records."""
    parts = [dns.rcode.to_text(reply.rcode())]
    for section, label in ((reply.answer, ""), (reply.authority, "auth ")):
        for rrset in section:
            kind = dns.rdatatype.to_text(rrset.rdtype)
            parts.append(f"{label}{len(rrset)} {kind}" if len(rrset) > 1 else f"{label}{kind}")
    return ", ".join(parts)


def opt(reply: dns.message.Message) -> str:
    if reply.opt is None:
        return "-"
    return "OPT+DO" if reply.ednsflags & dns.flags.DO else "OPT"


def exchanges_table(runs: Sequence[ConfigRun]) -> None:
    """One row per config, name and type; types answered alike share a row."""
    header = ["config", "name", "types", "answer"]
    for way in WAYS:
        header += [f"{way}: q->a", "+", "ratio"]
    header.append("OPT back")
    rows: list[list[str]] = []
    for run in runs:
        by_case: dict[tuple[str, str], list[Exchange]] = {}
        for exchange in run.exchanges:
            by_case.setdefault((exchange.name, exchange.qtype), []).append(exchange)
        previous: tuple[str, ...] = ()
        for (name, qtype), ways in by_case.items():
            cells = [ways[0].records]
            for exchange in ways:
                cells += [
                    f"{exchange.query}->{exchange.answer}",
                    f"{exchange.added:+d}",
                    f"{exchange.ratio:.2f}",
                ]
            cells.append(" / ".join(exchange.opt for exchange in ways))
            signature = (run.config, name, *cells)
            if signature == previous:
                rows[-1][2] += f" {qtype}"
                continue
            previous = signature
            rows.append([run.config, name, qtype, *cells])
    for cells in rows:
        if cells[2] == " ".join(QTYPES):
            cells[2] = f"all {len(QTYPES)}"
    markdown_table(header, rows)


def summary_table(runs: Sequence[ConfigRun]) -> None:
    header = ["config", "zone length", "queries", "max ratio", "max +bytes", "case of max ratio"]
    rows = []
    for run in runs:
        if run.refused_at_start:
            rows.append([run.config, str(len(run.zone)), "0", "-", "-", "refused at startup"])
            continue
        worst = max(run.exchanges, key=lambda exchange: exchange.ratio)
        most = max(exchange.added for exchange in run.exchanges)
        ties = sum(exchange.ratio == worst.ratio for exchange in run.exchanges) - 1
        rows.append(
            [
                run.config,
                str(len(run.zone)),
                str(len(run.exchanges)),
                f"{worst.ratio:.2f}",
                f"{most:+d}",
                f"{worst.qtype} {worst.name} {worst.way}" + (f" (+{ties} tied)" if ties else ""),
            ]
        )
    markdown_table(header, rows)


def unequal_tokens(run: ConfigRun) -> list[str]:
    """Cases where a token name's answer adds other bytes than a random name's (it must not)."""
    added = {(e.name, e.qtype, e.way): e.added for e in run.exchanges}
    return [
        f"{run.config}: {qtype} {way}"
        for (name, qtype, way), value in added.items()
        if name == "token" and added[("random", qtype, way)] != value
    ]


async def run_all(wait: float) -> list[ConfigRun]:
    with tempfile.TemporaryDirectory(prefix="oobwatch-amplification-") as work:
        return [
            await measure(config, Path(work) / f"config{number}.db", wait)
            for number, config in enumerate(CONFIGS)
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait per answer")
    args = parser.parse_args()
    started = time.perf_counter()
    runs = asyncio.run(run_all(args.timeout))
    elapsed = time.perf_counter() - started
    measured = [run for run in runs if not run.refused_at_start]
    every = [exchange for run in measured for exchange in run.exchanges]

    print()
    print(
        f"DNS amplification: {len(every)} UDP queries to the real listener on 127.0.0.1 "
        f"in {elapsed:.1f} s; sizes in bytes; +bytes = answer - query, ratio = answer / query"
    )
    print()
    exchanges_table(measured)
    print()
    summary_table(runs)
    print()
    worst = max(every, key=lambda exchange: exchange.ratio)
    most = max(every, key=lambda exchange: exchange.added)
    print(f"max ratio {worst.ratio:.2f}x ({worst.added:+d} bytes): {worst.case()}")
    print(f"max +bytes {most.added:+d} ({most.ratio:.2f}x): {most.case()}")
    print(f"bound in listeners/dnswire.py: MAX_GROWTH = {getattr(dnswire, 'MAX_GROWTH', None)}")
    for run in runs:
        if run.refused_at_start:
            print(f"{run.config}: refused at startup: {run.refused_at_start}")
    for problem in (problem for run in measured for problem in unequal_tokens(run)):
        print(f"note: a token answer differs in size from a random name's: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
