"""The hash chain on SQLite and on a real PostgreSQL server."""

import itertools
import multiprocessing

import pytest
from sqlalchemy import Engine, delete, insert, text, update
from sqlalchemy.exc import DatabaseError

from store import ledger
from store.engine import migrate, open_engine
from store.ledger import GENESIS
from store.schema import ledger as ledger_table
from support import append_many, drop_ledger_guards, numbered_event


def fill(engine: Engine, count: int) -> list[ledger.Entry]:
    with engine.begin() as connection:
        return ledger.append(connection, [numbered_event(number) for number in range(count)])


def verdict(engine: Engine) -> ledger.Verdict:
    with engine.connect() as connection:
        return ledger.verify(connection)


def test_an_empty_ledger_is_intact(engine: Engine) -> None:
    result = verdict(engine)
    assert result.intact
    assert (result.count, result.head_hash) == (0, GENESIS)


def test_appended_entries_chain(engine: Engine) -> None:
    first = fill(engine, 3)
    second = fill(engine, 2)
    entries = first + second
    assert [entry.seq for entry in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == GENESIS
    assert all(after.prev_hash == before.hash for before, after in itertools.pairwise(entries))
    result = verdict(engine)
    assert result.intact
    assert (result.count, result.head_hash) == (5, entries[-1].hash)
    with engine.connect() as connection:
        assert ledger.head(connection) == (5, entries[-1].hash)
        assert [entry.evidence["n"] for entry in ledger.entries(connection)] == [0, 1, 2, 0, 1]


def test_edited_row_is_named(engine: Engine) -> None:
    fill(engine, 10)
    with engine.begin() as connection:
        drop_ledger_guards(connection)
        connection.execute(
            update(ledger_table).where(ledger_table.c.seq == 4).values(source="10.0.0.1:1")
        )
    result = verdict(engine)
    assert not result.intact
    assert result.bad_seq == 4
    assert result.count == 3


def test_deleted_row_is_named(engine: Engine) -> None:
    fill(engine, 10)
    with engine.begin() as connection:
        drop_ledger_guards(connection)
        connection.execute(delete(ledger_table).where(ledger_table.c.seq == 6))
    result = verdict(engine)
    assert result.bad_seq == 7
    assert "row 6 is missing" in (result.problem or "")


def test_deleted_tail_is_caught_by_the_head(engine: Engine) -> None:
    fill(engine, 10)
    with engine.begin() as connection:
        drop_ledger_guards(connection)
        connection.execute(delete(ledger_table).where(ledger_table.c.seq >= 9))
    result = verdict(engine)
    assert not result.intact
    assert result.bad_seq == 9


def test_inserted_row_is_named(engine: Engine) -> None:
    entries = fill(engine, 5)
    forged = {name: getattr(entries[2], name) for name in ledger.Entry.__slots__}
    with engine.begin() as connection:
        drop_ledger_guards(connection)
        connection.execute(
            update(ledger_table).where(ledger_table.c.seq >= 3).values(seq=ledger_table.c.seq + 100)
        )
        connection.execute(insert(ledger_table).values({**forged, "source": "203.0.113.9:53"}))
        connection.execute(
            update(ledger_table)
            .where(ledger_table.c.seq >= 103)
            .values(seq=ledger_table.c.seq - 99)
        )
    result = verdict(engine)
    assert not result.intact
    assert result.bad_seq == 3


def test_reordered_rows_are_caught(engine: Engine) -> None:
    fill(engine, 5)
    with engine.begin() as connection:
        drop_ledger_guards(connection)
        connection.execute(update(ledger_table).where(ledger_table.c.seq == 2).values(seq=-2))
        connection.execute(update(ledger_table).where(ledger_table.c.seq == 3).values(seq=2))
        connection.execute(update(ledger_table).where(ledger_table.c.seq == -2).values(seq=3))
    assert verdict(engine).bad_seq == 2


def test_writers_in_several_processes_extend_one_chain(engine: Engine) -> None:
    url = engine.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=append_many, args=(url, f"node{n}", 40)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    result = verdict(engine)
    assert result.intact
    assert result.count == 4 * 40 * 2


def test_migrations_are_idempotent(store_url: str) -> None:
    engine = open_engine(store_url)
    migrate(engine)
    migrate(engine)
    with engine.connect() as connection:
        assert connection.execute(text("select count(*) from ledger_head")).scalar_one() == 1
    engine.dispose()


@pytest.mark.parametrize("size", [1, 7])
def test_canonical_encoding_is_stable(size: int) -> None:
    data = {"b": [1, 2], "a": "x" * size}
    assert ledger.canonical(data) == ledger.canonical(dict(reversed(list(data.items()))))


@pytest.mark.parametrize("change", ["update", "delete"])
def test_the_store_refuses_to_change_ledger_rows(engine: Engine, change: str) -> None:
    fill(engine, 3)
    statement = (
        update(ledger_table).where(ledger_table.c.seq == 2).values(source="x")
        if change == "update"
        else delete(ledger_table).where(ledger_table.c.seq == 2)
    )
    with pytest.raises(DatabaseError, match="append-only"), engine.begin() as connection:
        connection.execute(statement)
    assert verdict(engine).intact
