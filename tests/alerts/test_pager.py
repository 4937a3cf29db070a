"""Pages go to a real local HTTP receiver through apprise; each outcome is a ledger event."""

import asyncio

from sqlalchemy import Engine

from alerts.pager import Pager, check_url
from alerts.render import quote
from store import ledger
from store.clock import now_us
from store.ledger import Event
from store.writer import LedgerWriter
from support import Receiver


def hit(qname: str) -> Event:
    return Event(
        type="hit",
        time_us=now_us(),
        node="n1",
        canary_id="cn-1",
        sandbox="sbx-9",
        protocol="dns",
        source="198.51.100.7:4242",
        data={
            "kind": "dns",
            "location": "/home/agent/.bashrc",
            "labels": {"team": "evals"},
            "qname": qname,
            "qtype": "A",
        },
    )


async def wait_for_alert_events(engine: Engine, count: int) -> list[ledger.Entry]:
    for _ in range(200):
        with engine.connect() as connection:
            found = [e for e in ledger.entries(connection) if e.type.startswith("alert_")]
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} alert events, found {len(found)}")


async def test_each_hit_pages_every_url_and_records_the_outcome(
    sqlite_engine: Engine, receiver: Receiver
) -> None:
    writer = LedgerWriter(sqlite_engine)
    writer.start()
    pager = Pager(writer, [receiver.url("json", "/a"), receiver.url("form", "/b")], "n1")
    pager.start()
    await writer.append(hit("x.tok.canary.example.test."))
    requests = await asyncio.to_thread(receiver.wait_for, 2)
    events = await wait_for_alert_events(sqlite_engine, 2)
    await pager.stop()
    await writer.stop()
    assert sorted(r.path for r in requests) == ["/a", "/b"]
    page = next(r for r in requests if r.path == "/a").json()
    assert "cn-1" in str(page["title"])
    body = str(page["message"])
    for expected in (
        "sbx-9",
        "/home/agent/.bashrc",
        "198.51.100.7:4242",
        "x.tok.canary.example.test.",
        '"A"',
        "team",
    ):
        assert expected in body
    assert {event.type for event in events} == {"alert_sent"}
    assert all(event.evidence["hit_seq"] == 1 for event in events)


async def test_a_failing_url_is_recorded_and_does_not_stop_the_others(
    sqlite_engine: Engine, receiver: Receiver
) -> None:
    writer = LedgerWriter(sqlite_engine)
    writer.start()
    closed_port = receiver.port + 1 if receiver.port < 65535 else receiver.port - 1
    pager = Pager(writer, [f"json://127.0.0.1:{closed_port}/down", receiver.url()], "n1")
    pager.start()
    await writer.append(hit("tok.canary.example.test."))
    await asyncio.to_thread(receiver.wait_for, 1)
    events = await wait_for_alert_events(sqlite_engine, 2)
    await pager.stop()
    await writer.stop()
    assert sorted(event.type for event in events) == ["alert_failed", "alert_sent"]
    failed = next(event for event in events if event.type == "alert_failed")
    assert failed.evidence["error"]


async def test_attacker_strings_are_quoted_and_truncated(
    sqlite_engine: Engine, receiver: Receiver
) -> None:
    writer = LedgerWriter(sqlite_engine)
    writer.start()
    pager = Pager(writer, [receiver.url()], "n1")
    pager.start()
    nasty = "evil\r\nFAKE: line\x1b[31m" + "A" * 500
    await writer.append(hit(nasty))
    [request] = await asyncio.to_thread(receiver.wait_for, 1)
    await pager.stop()
    await writer.stop()
    body = str(request.json()["message"])
    assert "\r\nFAKE" not in body
    assert "\x1b" not in body
    assert "A" * 201 not in body
    assert "+321 chars" in body


def test_quote() -> None:
    assert quote("a\nb") == '"a\\nb"'
    assert quote("x" * 5, limit=3) == '"xxx" (+2 chars)'


def test_check_url() -> None:
    assert check_url("json://127.0.0.1:8099/hook") is None
    assert check_url("nosuchscheme://x") is not None
