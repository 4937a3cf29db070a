"""A burst of one canary's hits folds into bounded aggregate rows, on every listener.

Each test floods one canary's token over a real socket (from 127.0.0.1)
while another canary is hit once (from 127.0.0.2), then checks what the
issue asks: the other hit is answered and recorded, the burst's rows stay
under the bound, every answered burst query is accounted for by a committed
row, the chain verifies, and the data the first folded hits carried is
readable in the evidence.
"""

import asyncio
import smtplib
import time
from collections.abc import Awaitable, Callable

import dns.asyncquery
import dns.message
import dns.rcode
import httpx
import pytest
from sqlalchemy import Engine

from canaries.model import Canary
from listeners.base import hit_event
from listeners.burst import BurstFolder, BurstOptions
from store import ledger
from store.bursts import burst_of, summary
from store.clock import now_us
from store.ledger import Entry, Event
from store.writer import LedgerWriter
from support import ZONE, hits, plant_canary, run_dns, run_http, run_smtp

OTHER_SOURCE = "127.0.0.2"
BURSTS = BurstOptions(threshold=40, interval=0.02)
SECRET = "the quarterly numbers"


def exfil_name(number: int, token: str) -> str:
    """A query as DNS exfiltration tools send them: a part number, hex data, the token."""
    return f"p{number}.{SECRET.encode().hex()}.{token}.{ZONE}"


def rows_of(engine: Engine, canary: Canary) -> list[Entry]:
    return [entry for entry in hits(engine) if entry.canary_id == canary.id]


def check_accounting(
    engine: Engine, canary: Canary, answered: int, sent: int, seconds: float
) -> list[Entry]:
    """Every answered query is counted by a committed row, and the rows are few: past the
    threshold, one an interval at most, however many queries came."""
    rows = rows_of(engine, canary)
    singles = [row for row in rows if burst_of(row.evidence) is None]
    aggregates = [row for row in rows if burst_of(row.evidence) is not None]
    assert len(singles) == BURSTS.threshold
    accounted = sum(row.hits for row in rows)
    unanswered = sum(int(burst_of(row.evidence)["unanswered"]) for row in aggregates)
    assert answered == accounted - unanswered
    assert accounted <= sent
    assert len(aggregates) <= seconds / BURSTS.interval + 2
    with engine.connect() as connection:
        assert ledger.verify(connection).intact
    return aggregates


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


class _Flood(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answered: set[int] = set()
        self.waiting: set[int] = set()
        self.round_done = asyncio.Event()

    def datagram_received(self, data: bytes, addr: object) -> None:
        query_id = int.from_bytes(data[:2], "big")
        if query_id in self.waiting:
            self.waiting.discard(query_id)
            self.answered.add(query_id)
            if not self.waiting:
                self.round_done.set()


async def test_a_udp_dns_burst_folds_and_another_canary_still_lands(
    sqlite_engine: Engine,
) -> None:
    flooded = plant_canary(sqlite_engine, sandbox="sbx-leaked")
    other = plant_canary(sqlite_engine, sandbox="sbx-other")
    rounds, per_round = 15, 200
    async with run_dns(sqlite_engine, bursts=BURSTS) as node:
        loop = asyncio.get_running_loop()
        transport, flood = await loop.create_datagram_endpoint(
            _Flood, remote_addr=("127.0.0.1", node.port)
        )
        other_answer: list[dns.message.Message] = []

        async def other_hit() -> None:
            query = dns.message.make_query(f"x.{other.value}", "A")
            other_answer.append(
                await dns.asyncquery.udp(
                    query, "127.0.0.1", port=node.port, timeout=5, source=OTHER_SOURCE
                )
            )

        number = 0
        started = time.perf_counter()
        for round_ in range(rounds):
            flood.round_done.clear()
            for _ in range(per_round):
                number += 1
                query = dns.message.make_query(exfil_name(number, flooded.token), "A")
                query.id = number
                flood.waiting.add(number)
                transport.sendto(query.to_wire())
            if round_ == rounds // 2:
                took = await timed(other_hit)
            try:
                await asyncio.wait_for(flood.round_done.wait(), 5)
            except TimeoutError:
                flood.waiting.clear()
        seconds = time.perf_counter() - started
        transport.close()
    sent = rounds * per_round
    assert other_answer[0].rcode() == dns.rcode.NOERROR
    assert took < 5
    assert [row.hits for row in rows_of(sqlite_engine, other)] == [1]
    aggregates = check_accounting(sqlite_engine, flooded, len(flood.answered), sent, seconds)
    first = burst_of(aggregates[0].evidence)
    assert first is not None
    assert first["data"][0]["decoded"] == SECRET
    assert first["protocols"] == {"dns": first["count"]}
    assert first["kinds"] == {"A": first["count"]}
    last = burst_of(aggregates[-1].evidence)
    assert last is not None
    assert last["total"]["hits"] == sum(row.hits for row in rows_of(sqlite_engine, flooded))
    assert summary(flooded.id, aggregates[-1].evidence).startswith(
        f"{last['total']['hits']:,} lookups of canary {flooded.id} from 1 source in "
    )


async def test_a_tcp_dns_burst_folds_and_another_canary_still_lands(
    sqlite_engine: Engine,
) -> None:
    flooded = plant_canary(sqlite_engine, sandbox="sbx-leaked")
    other = plant_canary(sqlite_engine, sandbox="sbx-other")
    connections, per_connection = 4, 200
    async with run_dns(sqlite_engine, bursts=BURSTS) as node:

        async def pipeline(first: int) -> int:
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            answered = 0
            # Eight queries in flight at a time: as many as a session may have waiting.
            for start in range(first, first + per_connection, 8):
                for number in range(start, start + 8):
                    wire = dns.message.make_query(exfil_name(number, flooded.token), "A").to_wire()
                    writer.write(len(wire).to_bytes(2, "big") + wire)
                for _ in range(8):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    reply = dns.message.from_wire(await reader.readexactly(size))
                    answered += reply.rcode() == dns.rcode.NOERROR
            writer.close()
            return answered

        async def other_hit() -> dns.message.Message:
            await asyncio.sleep(0.2)
            query = dns.message.make_query(f"x.{other.value}", "A")
            return await dns.asyncquery.tcp(
                query, "127.0.0.1", port=node.port, timeout=5, source=OTHER_SOURCE
            )

        started = time.perf_counter()
        *answered, other_reply = await asyncio.gather(
            *(pipeline(1 + n * per_connection) for n in range(connections)), other_hit()
        )
        seconds = time.perf_counter() - started
    assert other_reply.rcode() == dns.rcode.NOERROR
    assert [row.hits for row in rows_of(sqlite_engine, other)] == [1]
    aggregates = check_accounting(
        sqlite_engine, flooded, sum(answered), connections * per_connection, seconds
    )
    assert burst_of(aggregates[0].evidence)["data"][0]["decoded"] == SECRET


async def test_an_http_burst_folds_and_another_canary_still_lands(sqlite_engine: Engine) -> None:
    flooded = plant_canary(sqlite_engine, "url", sandbox="sbx-leaked")
    other = plant_canary(sqlite_engine, "url", sandbox="sbx-other")
    requests = 600
    async with run_http(sqlite_engine, bursts=BURSTS) as node:
        base = f"http://127.0.0.1:{node.port}"
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=base, timeout=10, limits=limits) as client:
            gate = asyncio.Semaphore(16)

            async def one(number: int) -> int:
                async with gate:
                    response = await client.get(f"/{flooded.token}/part/{number}")
                    return response.status_code

            async def other_hit() -> httpx.Response:
                await asyncio.sleep(0.2)
                transport = httpx.AsyncHTTPTransport(local_address=OTHER_SOURCE)
                async with httpx.AsyncClient(transport=transport, timeout=5) as own:
                    return await own.get(f"{base}/{other.token}")

            started = time.perf_counter()
            *statuses, other_response = await asyncio.gather(
                *(one(number) for number in range(requests)), other_hit()
            )
            seconds = time.perf_counter() - started
    assert other_response.status_code == 200
    assert [row.hits for row in rows_of(sqlite_engine, other)] == [1]
    aggregates = check_accounting(sqlite_engine, flooded, statuses.count(200), requests, seconds)
    first = burst_of(aggregates[0].evidence)
    assert first is not None
    assert first["data"][0]["data"].startswith(f"/{flooded.token}/part/")
    assert first["kinds"] == {"GET": first["count"]}


async def test_an_smtp_burst_folds_and_another_canary_still_lands(sqlite_engine: Engine) -> None:
    flooded = plant_canary(sqlite_engine, "email", sandbox="sbx-leaked")
    other = plant_canary(sqlite_engine, "email", sandbox="sbx-other")
    sessions, recipients = 6, 50

    def session(first: int) -> int:
        accepted = 0
        with smtplib.SMTP("127.0.0.1", node.port, timeout=10) as client:
            client.ehlo("sandbox-7")
            client.mail("agent@sandbox.internal")
            for number in range(first, first + recipients):
                code, _ = client.rcpt(f"n{number}@{flooded.token}.{ZONE}")
                accepted += code == 250
            client.rset()
        return accepted

    def other_mail() -> int:
        time.sleep(0.2)
        with smtplib.SMTP(
            "127.0.0.1", node.port, timeout=10, source_address=(OTHER_SOURCE, 0)
        ) as client:
            client.ehlo("sandbox-8")
            client.mail("agent@sandbox.internal")
            code, _ = client.rcpt(other.value)
            return code

    async with run_smtp(sqlite_engine, bursts=BURSTS) as node:
        started = time.perf_counter()
        *accepted, other_code = await asyncio.gather(
            *(asyncio.to_thread(session, n * recipients) for n in range(sessions)),
            asyncio.to_thread(other_mail),
        )
        seconds = time.perf_counter() - started
    assert other_code == 250
    assert [row.hits for row in rows_of(sqlite_engine, other)] == [1]
    aggregates = check_accounting(
        sqlite_engine, flooded, sum(accepted), sessions * recipients, seconds
    )
    assert burst_of(aggregates[0].evidence)["data"][0]["data"].endswith(f"@{flooded.token}.{ZONE}")


@pytest.fixture
async def writer(sqlite_engine: Engine) -> object:
    started = LedgerWriter(sqlite_engine)
    started.start()
    yield started
    await started.stop()


class Outcomes(list[Entry | None]):
    """What `done` callbacks were given, and a way to wait for a number of them."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def __call__(self, entry: Entry | None) -> None:
        self.append(entry)
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self) < count:
                self.changed.clear()
                await self.changed.wait()


def hit_of(canary: Canary, number: int, source: str = "198.51.100.7") -> Event:
    evidence = {"qname": "x", "qtype": "TXT", "left_labels": [f"chunk{number:05d}"]}
    return hit_event(canary, protocol="dns", peer=(source, 53), node="n", evidence=evidence)


async def test_kept_data_sources_and_answers_are_bounded(
    sqlite_engine: Engine, writer: LedgerWriter
) -> None:
    canary = plant_canary(sqlite_engine)
    options = BurstOptions(threshold=1, interval=5, keep_bytes=100, max_waiting=10)
    bursts = BurstFolder(writer, options)
    outcomes = Outcomes()
    for number in range(1, 61):
        bursts.submit(hit_of(canary, number, f"10.0.{number}.1"), outcomes)
    # Past max_waiting, a folded hit is counted but answered as not recorded at once.
    assert outcomes == [None] * 49
    bursts.close()
    await outcomes.wait_for(60)
    [single, aggregate] = rows_of(sqlite_engine, canary)
    assert single.hits == 1
    burst = burst_of(aggregate.evidence)
    assert burst is not None
    assert burst["count"] == 59
    assert burst["unanswered"] == 49
    assert aggregate.hits == 59
    answered = sorted(entry.seq for entry in outcomes[49:] if entry is not None)
    assert answered == [single.seq] + [aggregate.seq] * 10
    # 100 bytes kept of 59 ten-byte chunks: the first ten, in order; all of them hashed.
    assert [sample["data"] for sample in burst["data"]] == [f"chunk{n:05d}" for n in range(2, 12)]
    assert burst["total"]["data_bytes"] == 59 * 10
    assert burst["total"]["sources"] == 60
    assert len(burst["sources"]) == 32
    assert burst["other_sources"] == 59 - 32


async def test_a_new_window_records_one_by_one_again(
    sqlite_engine: Engine, writer: LedgerWriter
) -> None:
    canary = plant_canary(sqlite_engine)
    now = [0.0]
    bursts = BurstFolder(writer, BurstOptions(threshold=2, window=10, interval=5), lambda: now[0])
    done = Outcomes()
    for number in range(5):
        bursts.submit(hit_of(canary, number), done)
    now[0] = 11.0
    for number in range(3):
        bursts.submit(hit_of(canary, number), done)
    bursts.close()
    await done.wait_for(8)
    assert [row.hits for row in rows_of(sqlite_engine, canary)] == [1, 1, 3, 1, 1, 1]


def test_burst_options_are_validated() -> None:
    with pytest.raises(ValueError, match="threshold"):
        BurstOptions(threshold=0)
    with pytest.raises(ValueError, match="interval"):
        BurstOptions(interval=0)


def http_hit(canary: Canary, source: str, agent: str, method: str = "GET") -> Event:
    evidence = {"method": method, "target": "/x", "user_agent": agent}
    return hit_event(canary, protocol="http", peer=(source, 4000), node="n", evidence=evidence)


async def test_a_mail_after_a_dns_flood_keeps_its_subject_and_the_canary_its_fields(
    sqlite_engine: Engine, writer: LedgerWriter
) -> None:
    canary = plant_canary(sqlite_engine, severity="critical")
    bursts = BurstFolder(writer, BurstOptions(threshold=1, interval=5, keep_bytes=2000))
    done = Outcomes()
    bursts.submit(hit_of(canary, 0), done)
    for number in range(1, 800):
        bursts.submit(hit_of(canary, number), done)
    evidence = {"subject": "CUSTOMER TABLE DUMP", "rcpt_tos": ["dump@x"], "size": 10}
    peer = ("198.51.100.9", 25)
    bursts.submit(
        hit_event(canary, protocol="smtp", peer=peer, node="n", evidence={"rcpt": "dump@x"}), done
    )
    bursts.submit(
        Event("evidence", now_us(), "n", canary.id, canary.sandbox, "smtp", peer[0], evidence), done
    )
    bursts.close()
    await done.wait_for(802)
    aggregate = rows_of(sqlite_engine, canary)[-1]
    burst = burst_of(aggregate.evidence)
    assert burst is not None
    samples = [sample.get("data") or sample.get("evidence") for sample in burst["data"]]
    assert "dump@x" in samples
    assert any("subject=CUSTOMER TABLE DUMP" in str(sample) for sample in samples)
    assert aggregate.evidence["severity"] == "critical"
    assert aggregate.evidence["kind"] == "dns"


async def test_an_aggregate_started_by_evidence_still_names_its_canary(
    sqlite_engine: Engine, writer: LedgerWriter
) -> None:
    canary = plant_canary(sqlite_engine, "url", severity="critical")
    bursts = BurstFolder(writer, BurstOptions(threshold=1, interval=5))
    done = Outcomes()
    bursts.submit(http_hit(canary, "127.0.0.1", "curl/8"), done)
    body = {"body_size": 3, "body_sha256": "ab"}
    bursts.submit(
        Event("evidence", now_us(), "n", canary.id, canary.sandbox, "http", "127.0.0.1", body),
        done,
    )
    for _ in range(10):
        bursts.submit(http_hit(canary, "127.0.0.4", "x", method="P" * 5_000), done)
    bursts.close()
    await done.wait_for(12)
    aggregate = rows_of(sqlite_engine, canary)[-1]
    assert aggregate.evidence["kind"] == "url"
    assert aggregate.evidence["severity"] == "critical"
    burst = burst_of(aggregate.evidence)
    assert burst is not None
    assert burst["count"] == 10
    assert burst["evidence"] == 1
    # Attacker-chosen kinds are cut short: a long method cannot grow the row.
    assert all(len(kind) <= 64 for kind in burst["kinds"])
    assert len(aggregate.data) < 4_000


async def test_answers_held_are_bounded_across_canaries(
    sqlite_engine: Engine, writer: LedgerWriter
) -> None:
    first, second = plant_canary(sqlite_engine), plant_canary(sqlite_engine)
    bursts = BurstFolder(writer, BurstOptions(threshold=1, interval=5, max_waiting=5))
    done = Outcomes()
    for canary in (first, second):
        for number in range(5):
            bursts.submit(hit_of(canary, number), done)
    # Two singles are committed on their own; of the eight folded, five wait, three are refused.
    assert bursts.held == 5
    assert done.count(None) == 3
    bursts.close()
    await done.wait_for(10)
    assert bursts.held == 0
    counted = sum(row.hits for canary in (first, second) for row in rows_of(sqlite_engine, canary))
    assert counted == 10
