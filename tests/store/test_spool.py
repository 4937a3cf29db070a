"""The local spool: a journal that survives a crash, and a writer that spools when the store is away."""

import asyncio
import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from store import ledger
from store import spool as spool_module
from store.clock import now_us
from store.engine import open_store
from store.ledger import Entry, Event
from store.spool import Look, Spool, SpoolBusy, SpoolFull, inspect, strays
from store.writer import LedgerWriter, NotDurable
from support import numbered_event, settle

MIB = 1024 * 1024


def events(count: int, start: int = 0) -> list[Event]:
    return [numbered_event(number) for number in range(start, start + count)]


def journal(path: Path, count: int) -> bytes:
    """A journal of `count` events, left as a stopped node leaves it; its bytes."""
    spool = Spool(path, MIB)
    spool.add(events(count))
    spool.close()
    return path.read_bytes()


def test_records_come_back_in_order_and_a_finished_journal_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "oobwatch.spool"
    spool = Spool(path, MIB)
    assert spool.add(events(3)) == [1, 2, 3]
    assert spool.add(events(2, 3)) == [4, 5]
    assert spool.pending == 5
    first = spool.unreplayed(3)
    assert [r.event.data["n"] for r in first] == [0, 1, 2]
    spool.replayed(first[-1])
    # A restart picks up where the replay got to.
    spool.close()
    again = Spool(path, MIB)
    assert again.pending == 2
    rest = again.unreplayed(10)
    assert [(r.number, r.event.data["n"]) for r in rest] == [(4, 3), (5, 4)]
    again.replayed(rest[-1])
    assert again.pending == 0
    assert [p.name for p in tmp_path.iterdir()] == ["oobwatch.spool.lock"]
    # The next outage starts a new journal, with new keys.
    assert again.add(events(1)) == [6]
    assert again.key(6) != spool.key(6)
    again.close()


def test_a_torn_tail_was_never_answered_and_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "oobwatch.spool"
    whole = journal(path, 2)
    path.write_bytes(whole + whole.splitlines(keepends=True)[-1][:-7])
    again = Spool(path, MIB)
    assert again.pending == 2
    assert again.add(events(1, 2)) == [3]
    assert [r.event.data["n"] for r in again.unreplayed(10)] == [0, 1, 2]
    again.close()


def test_a_journal_cut_off_as_it_was_created_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "oobwatch.spool"
    path.write_bytes(b"0000")
    assert Spool(path, MIB).pending == 0
    assert not path.exists()


def test_a_damaged_header_sets_the_journal_aside_and_the_node_starts(tmp_path: Path) -> None:
    path = tmp_path / "oobwatch.spool"
    path.write_bytes(b"garbage\n" + b"x" * 100)
    spool = Spool(path, MIB)
    assert spool.pending == 0
    assert not path.exists()
    assert [p.name.split("-")[0] for p in tmp_path.glob("*.damaged-*")] == [
        "oobwatch.spool.damaged"
    ]
    spool.close()


def test_a_damaged_header_before_a_large_record_is_set_aside_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "oobwatch.spool"
    spool = Spool(path, MIB)
    spool.add([Event(type="hit", time_us=1, node="n1", data={"body": "x" * 8000})])
    spool.close()
    whole = path.read_bytes()
    newline = whole.index(b"\n")
    path.write_bytes(whole[:newline] + b"?" + whole[newline + 1 :])
    again = Spool(path, MIB)
    assert again.damaged == 1
    [aside] = tmp_path.glob("oobwatch.spool.damaged-*")
    assert aside.read_bytes() == whole[:newline] + b"?" + whole[newline + 1 :]
    again.close()


def test_spools_left_beside_this_one_are_found(tmp_path: Path) -> None:
    journal(tmp_path / "oobwatch.db.old-name.spool", 2)
    journal(tmp_path / "oobwatch.db.drained.spool", 0)
    assert strays(tmp_path / "oobwatch.db.n1.spool") == [
        (tmp_path / "oobwatch.db.old-name.spool", 2)
    ]


def test_a_damaged_record_costs_that_record_only(tmp_path: Path) -> None:
    path = tmp_path / "oobwatch.spool"
    lines = journal(path, 10).splitlines(keepends=True)
    lines[3] = lines[3][:20] + bytes([lines[3][20] ^ 1]) + lines[3][21:]
    path.write_bytes(b"".join(lines))
    assert inspect(path).pending == 9
    again = Spool(path, MIB)
    assert again.pending == 10  # counted by number: the damaged one cannot be read back
    assert again.damaged == 1
    assert [r.event.data["n"] for r in again.unreplayed(100)] == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    again.close()


def test_one_process_owns_a_spool_and_inspecting_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "oobwatch.spool"
    spool = Spool(path, MIB)
    spool.add(events(3))
    with open(path, "ab") as torn:
        torn.write(b"0000 half a record")
    before = path.read_bytes()
    with pytest.raises(SpoolBusy, match="another process uses the spool"):
        Spool(path, MIB)
    assert inspect(path) == Look(pending=3, size=len(before), damaged=0)
    assert path.read_bytes() == before
    spool.close()


def test_a_write_that_fails_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "oobwatch.spool"
    spool = Spool(path, MIB)
    spool.add(events(1))
    real_fsync = os.fsync
    failures = iter([OSError(errno.EIO, "I/O error")])

    def failing_once(descriptor: int) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", failing_once)
    with pytest.raises(OSError, match="I/O error"):
        spool.add(events(1, 1))  # its caller is told: not recorded
    assert spool.add(events(1, 2)) == [2]
    monkeypatch.undo()
    assert [(r.number, r.event.data["n"]) for r in spool.unreplayed(10)] == [(1, 0), (2, 2)]
    spool.close()
    assert [(r.number, r.event.data["n"]) for r in Spool(path, MIB).unreplayed(10)] == [
        (1, 0),
        (2, 2),
    ]


def test_a_full_spool_refuses(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "oobwatch.spool", MIB)
    big = Event(type="hit", time_us=1, node="n1", data={"pad": "x" * 600_000})
    spool.add([big])
    with pytest.raises(SpoolFull):
        spool.add([big])
    assert spool.pending == 1
    spool.close()


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tail=st.binary(max_size=300), cut=st.integers(0, 400))
def test_whatever_follows_the_good_records_they_are_read_back(
    tmp_path: Path, tail: bytes, cut: int
) -> None:
    path = tmp_path / "fuzzed.spool"
    path.unlink(missing_ok=True)
    whole = journal(path, 3)
    path.write_bytes(whole + (whole[: cut % len(whole)] if cut % 2 else tail))
    again = Spool(path, MIB)
    found = again.unreplayed(100)
    assert [r.event.data["n"] for r in found[:3]] == [0, 1, 2]
    again.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    url = f"sqlite:///{tmp_path / 'oobwatch.db'}"
    engine = open_store(url, own_checkpoints=True)
    yield url, engine
    engine.dispose()


class Locked:
    """Another process holding SQLite's write lock (BEGIN EXCLUSIVE) until released."""

    def __init__(self, database: str) -> None:
        script = (
            "import sqlite3, sys\n"
            f"db = sqlite3.connect({database!r}, isolation_level=None)\n"
            "db.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.readline()\n"
            "db.execute('ROLLBACK')\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "locked\n"

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.close()
        assert self.process.wait(10) == 0
        assert self.process.stdout is not None
        self.process.stdout.close()


async def test_a_store_locked_by_another_process_spools_then_replays_in_order_once(
    store: tuple[str, Engine], tmp_path: Path
) -> None:
    url, engine = store
    spool = Spool(tmp_path / "oobwatch.spool", 64 * MIB)
    writer = LedgerWriter(engine, spool=spool)
    committed: list[Entry] = []
    writer.subscribe(committed.extend)
    changes: list[tuple[str, int]] = []
    writer.watch_spool(lambda change, count: changes.append((change, count)))
    writer.start()
    await writer.append(numbered_event(0))
    lock = Locked(url.removeprefix("sqlite:///"))
    try:
        answered = [await writer.append(event) for event in events(50, 1)]
    finally:
        lock.release()
    # Every one answered, from the spool: durable there, not yet in the ledger.
    assert all(entry.seq < 0 for [entry] in answered)
    assert spool.pending == 50
    assert changes == [("spooling", 1)]
    # New events wait behind the spooled ones, in order.
    late = await writer.append(numbered_event(51))
    await settle(lambda: spool.pending == 0 and len(committed) == 52)
    await writer.stop()
    assert late[0].seq in (-51, 52)
    assert changes == [("spooling", 1), ("replayed", 51 if late[0].seq < 0 else 50)]
    with engine.connect() as connection:
        rows = list(ledger.entries(connection))
        assert ledger.verify(connection).count == 52
    assert [row.evidence["n"] for row in rows] == list(range(52))
    spooled = [row for row in rows if row.evidence.get("spooled")]
    assert len(spooled) >= 50
    assert all(row.evidence["received_at"].endswith("Z") for row in spooled)
    left = await asyncio.to_thread(lambda: sorted(p.name for p in tmp_path.glob("oobwatch.spool*")))
    assert left == ["oobwatch.spool.lock"]


async def test_a_replay_cut_off_after_its_commit_appends_nothing_twice(
    store: tuple[str, Engine], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, engine = store
    path = tmp_path / "oobwatch.spool"
    journal(path, 30)

    def killed(_self: Spool, _last: object) -> None:
        raise SystemExit("killed between the commit and the state write")

    monkeypatch.setattr(Spool, "replayed", killed)
    writer = LedgerWriter(engine, spool=Spool(path, 64 * MIB))
    with pytest.raises(SystemExit):
        writer._replay()
    monkeypatch.undo()
    assert writer.spool is not None
    writer.spool.close()
    with engine.connect() as connection:
        assert ledger.head(connection)[0] == 30
    again = LedgerWriter(engine, spool=Spool(path, 64 * MIB))
    again.start()
    await settle(lambda: again.spool is not None and again.spool.pending == 0)
    await again.stop()
    with engine.connect() as connection:
        assert ledger.verify(connection).count == 30
        assert [e.evidence["n"] for e in ledger.entries(connection)] == list(range(30))


async def test_evidence_naming_a_spooled_hit_names_its_ledger_row(
    store: tuple[str, Engine], tmp_path: Path
) -> None:
    url, engine = store
    writer = LedgerWriter(engine, spool=Spool(tmp_path / "oobwatch.spool", MIB))
    writer.start()
    lock = Locked(url.removeprefix("sqlite:///"))
    try:
        [hit] = await writer.append(Event(type="hit", time_us=now_us(), node="n1"))
    finally:
        lock.release()
    assert hit.seq < 0
    follow = Event(type="evidence", time_us=now_us(), node="n1", data={"hit_seq": hit.seq})
    await writer.append(follow)
    await settle(lambda: writer.spool is not None and writer.spool.pending == 0)
    # And once the spool is empty, evidence naming a placeholder still gets the real row.
    await writer.append(follow)
    await writer.stop()
    with engine.connect() as connection:
        [real_hit, first, second] = list(ledger.entries(connection))
    assert real_hit.type == "hit"
    assert first.evidence["hit_seq"] == second.evidence["hit_seq"] == real_hit.seq


async def test_store_work_is_refused_at_once_while_events_wait_in_the_spool(
    store: tuple[str, Engine], tmp_path: Path
) -> None:
    url, engine = store
    writer = LedgerWriter(engine, spool=Spool(tmp_path / "oobwatch.spool", MIB))
    writer.start()
    lock = Locked(url.removeprefix("sqlite:///"))
    try:
        await writer.append(numbered_event(0))
        # Refused, rather than left to wait out the lock in front of every hit.
        with pytest.raises(NotDurable, match="spool"):
            await writer.call(lambda: json.dumps({}))
    finally:
        lock.release()
    await writer.stop()


async def test_a_failing_state_write_does_not_end_the_writer(
    store: tuple[str, Engine], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, engine = store
    path = tmp_path / "oobwatch.spool"
    spool = Spool(path, 64 * MIB)
    spool.add(events(600))
    failures = iter([OSError(errno.ENOSPC, "No space left on device")])
    real = spool_module._write_atomically

    def failing_once(where: Path, data: bytes) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        real(where, data)

    monkeypatch.setattr(spool_module, "_write_atomically", failing_once)
    writer = LedgerWriter(engine, spool=spool)
    writer.start()
    await settle(lambda: spool.pending == 0, 30)
    assert writer.recording
    [late] = await writer.append(numbered_event(600))
    await writer.stop()
    assert late.seq == 601
    with engine.connect() as connection:
        assert [e.evidence["n"] for e in ledger.entries(connection)] == list(range(601))


async def test_a_batch_too_big_for_the_spool_does_not_leave_the_node_unready(
    store: tuple[str, Engine], tmp_path: Path
) -> None:
    url, engine = store
    writer = LedgerWriter(engine, spool=Spool(tmp_path / "oobwatch.spool", MIB))
    changes: list[str] = []
    writer.watch_spool(lambda change, _count: changes.append(change))
    writer.start()
    big = Event(type="hit", time_us=now_us(), node="n1", data={"pad": "x" * 2_000_000})
    lock = Locked(url.removeprefix("sqlite:///"))
    try:
        with pytest.raises(NotDurable):
            await writer.append(big)
        assert not writer.recording
    finally:
        lock.release()
    await writer.append(numbered_event(1))
    assert writer.recording
    await writer.stop()
    assert changes == ["full"]


async def test_evidence_spooled_after_its_hit_was_replayed_names_the_row_across_a_restart(
    store: tuple[str, Engine], tmp_path: Path
) -> None:
    url, engine = store
    path = tmp_path / "oobwatch.spool"
    writer = LedgerWriter(engine, spool=Spool(path, MIB))
    writer.start()
    lock = Locked(url.removeprefix("sqlite:///"))
    try:
        [hit] = await writer.append(Event(type="hit", time_us=now_us(), node="n1"))
    finally:
        lock.release()
    await settle(lambda: writer.spool is not None and writer.spool.pending == 0)
    # The store goes away again before the evidence of that hit comes; then the node restarts.
    lock = Locked(url.removeprefix("sqlite:///"))
    try:
        follow = Event(type="evidence", time_us=now_us(), node="n1", data={"hit_seq": hit.seq})
        await writer.append(follow)
        await writer.stop()
    finally:
        lock.release()
    again = LedgerWriter(engine, spool=Spool(path, MIB))
    again.start()
    await settle(lambda: again.spool is not None and again.spool.pending == 0)
    await again.stop()
    with engine.connect() as connection:
        [real_hit, evidence] = list(ledger.entries(connection))
    assert evidence.evidence["hit_seq"] == real_hit.seq


async def test_a_spool_that_cannot_be_written_refuses_as_a_full_one_does(
    store: tuple[str, Engine], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, engine = store
    writer = LedgerWriter(engine, spool=Spool(tmp_path / "oobwatch.spool", MIB))
    changes: list[str] = []
    writer.watch_spool(lambda change, _count: changes.append(change))
    writer.start()
    real = os.pwrite
    failures = iter([OSError(errno.ENOSPC, "No space left on device")])

    def full_disk_once(descriptor: int, data: bytes, offset: int) -> int:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real(descriptor, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk_once)
    lock = Locked(url.removeprefix("sqlite:///"))
    try:
        with pytest.raises(NotDurable):
            await writer.append(numbered_event(0))
        assert not writer.recording
        [spooled] = await writer.append(numbered_event(1))
        assert spooled.seq < 0
        assert writer.recording
    finally:
        lock.release()
    await settle(lambda: writer.spool is not None and writer.spool.pending == 0)
    await writer.stop()
    assert changes[:2] == ["full", "spooling"]
    with engine.connect() as connection:
        assert [e.evidence["n"] for e in ledger.entries(connection)] == [1]
