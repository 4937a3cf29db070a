"""Group commit: many events, few transactions, every callback after its commit."""

import asyncio
import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine

from store import ledger
from store.clock import now_us
from store.engine import checkpoint, open_store
from store.ledger import Entry, Event
from store.writer import _STOP, LedgerWriter


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


async def test_store_work_runs_on_the_writer_thread_between_batches(engine: Engine) -> None:
    writer = LedgerWriter(engine)
    writer.start()
    committed: list[Entry | None] = []
    writer.submit(Event(type="hit", time_us=now_us(), node="n"), committed.append)
    seen = await writer.call(lambda: (threading.current_thread().name, head(engine)))
    assert seen == ("ledger-writer", 1)  # the append queued before it was committed first

    def fails() -> None:
        raise ValueError("no such alert")

    with pytest.raises(ValueError, match="no such alert"):
        await writer.call(fails)
    # The thread lives on after a failed job.
    assert (await writer.append(Event(type="hit", time_us=now_us(), node="n")))[0].seq == 2
    await writer.stop()


async def test_what_comes_after_the_stop_is_refused_not_left_waiting(engine: Engine) -> None:
    writer = LedgerWriter(engine)
    writer.start()
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[Entry | None] = loop.create_future()
    writer._queue.put(_STOP)  # the stop arrives first, a hit right after it
    writer.submit(Event(type="hit", time_us=now_us(), node="n"), outcome.set_result)
    assert await asyncio.wait_for(outcome, 10) is None
    await writer.stop()
    assert head(engine) == 0


def head(engine: Engine) -> int:
    with engine.connect() as connection:
        return ledger.head(connection)[0]


def test_a_node_that_checkpoints_itself_leaves_no_wal_behind(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'own.db'}"
    engine = open_store(url, own_checkpoints=True)
    with engine.begin() as connection:
        ledger.append(
            connection,
            [Event(type="hit", time_us=now_us(), node="n", data={"i": i}) for i in range(20_000)],
        )
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 16384
    checkpoint(engine)
    with engine.connect() as connection:
        busy, frames, done = connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
    assert busy == 0
    assert frames > 1000  # past the point where SQLite's default checkpoints in a commit
    assert done == frames
    engine.dispose()
