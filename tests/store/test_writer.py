"""Group commit: many events, few transactions, every callback after its commit."""

import asyncio

from sqlalchemy import Engine

from store import ledger
from store.clock import now_us
from store.ledger import Entry, Event
from store.writer import LedgerWriter


async def test_concurrent_appends_share_transactions(engine: Engine) -> None:
    writer = LedgerWriter(engine)
    writer.start()
    committed: list[Entry] = []
    writer.subscribe(committed.extend)
    events = [Event(type="hit", time_us=now_us(), node="n", data={"i": i}) for i in range(500)]
    results = await asyncio.gather(*(writer.append(event) for event in events))
    await writer.stop()
    assert sorted(entry.seq for [entry] in results) == list(range(1, 501))
    assert writer.batches < 500
    assert len(committed) == 500
    with engine.connect() as connection:
        assert ledger.verify(connection).count == 500


async def test_callbacks_run_after_the_row_is_readable(engine: Engine) -> None:
    writer = LedgerWriter(engine)
    writer.start()
    seen: list[int] = []

    def done(entry: Entry | None) -> None:
        assert entry is not None
        with engine.connect() as connection:
            seen.append(ledger.head(connection)[0] >= entry.seq)

    for i in range(20):
        writer.submit(Event(type="hit", time_us=now_us(), node="n", data={"i": i}), done)
    await writer.stop()
    await asyncio.sleep(0)
    assert seen == [True] * 20


async def test_stop_commits_what_is_queued(engine: Engine) -> None:
    writer = LedgerWriter(engine)
    writer.start()
    for i in range(100):
        writer.submit(Event(type="hit", time_us=now_us(), node="n", data={"i": i}))
    await writer.stop()
    with engine.connect() as connection:
        assert ledger.head(connection)[0] == 100


async def test_one_bad_event_does_not_cost_the_others_or_stop_the_writer(engine: Engine) -> None:
    writer = LedgerWriter(engine)
    writer.start()
    outcomes: list[Entry | None] = []
    good = [Event(type="hit", time_us=now_us(), node="n", data={"i": i}) for i in range(3)]
    bad = Event(type="hit", time_us=now_us(), node="n", data={"not json": {1, 2}})
    for event in (good[0], bad, good[1], good[2]):
        writer.submit(event, outcomes.append)
    await writer.append(Event(type="hit", time_us=now_us(), node="n", data={"after": True}))
    await writer.stop()
    await asyncio.sleep(0)
    assert [outcome is None for outcome in outcomes] == [False, True, False, False]
    assert writer.failed == 1
    with engine.connect() as connection:
        verdict = ledger.verify(connection)
    assert verdict.intact
    assert verdict.count == 4


async def test_appending_nothing_returns_at_once(engine: Engine) -> None:
    writer = LedgerWriter(engine)
    writer.start()
    try:
        assert await asyncio.wait_for(writer.append(), 5) == []
    finally:
        await writer.stop()
