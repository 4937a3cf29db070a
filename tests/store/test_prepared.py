"""Prepared statements run by the driver behave as SQLAlchemy's own execution does, on
SQLite and on a real PostgreSQL server: results, errors, and a connection lost mid-way."""

import pytest
from sqlalchemy import Engine, bindparam, insert, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError

from store import ledger
from store.clock import now_us
from store.engine import open_store
from store.ledger import Event
from store.prepared import Prepared
from store.schema import alerts, ledger_head
from store.schema import ledger as ledger_table
from support import PostgresServer

# A fixed bind (id == 1) beside named ones, and RETURNING.
_SET_HEAD = Prepared(
    update(ledger_head)
    .where(ledger_head.c.id == 1, ledger_head.c.seq == bindparam("b_seq"))
    .values(hash=bindparam("b_hash"))
    .returning(ledger_head.c.seq, ledger_head.c.hash)
)
_INSERT = Prepared(ledger_table.insert())


def _append(engine: Engine, count: int) -> list[ledger.Entry]:
    events = [Event(type="note", time_us=now_us(), node="n", data={"n": n}) for n in range(count)]
    with engine.begin() as connection:
        return ledger.append(connection, events)


def test_rows_parameters_and_fixed_binds_as_core_reads_them(engine: Engine) -> None:
    entries = _append(engine, 3)
    with engine.connect() as connection:
        chained = connection.execute(select(ledger_table.c.prev_hash).order_by("seq")).scalars()
        assert list(chained) == [ledger.GENESIS, entries[0].hash, entries[1].hash]
    with engine.begin() as connection:
        missing = _SET_HEAD.execute(connection, {"b_seq": 2, "b_hash": "x"})
        returned = _SET_HEAD.execute(connection, {"b_seq": 3, "b_hash": "f" * 64})
    assert missing == []
    assert returned == [(3, "f" * 64)]
    with engine.connect() as connection:
        assert ledger.head(connection) == (3, "f" * 64)


def test_driver_errors_are_sqlalchemys_and_the_transaction_is_rolled_back(engine: Engine) -> None:
    [entry] = _append(engine, 1)
    row = {name: getattr(entry, name) for name in ledger.Entry.__slots__}
    with engine.begin() as connection:
        _SET_HEAD.execute(connection, {"b_seq": 1, "b_hash": "rolled back"})
        with pytest.raises(IntegrityError):
            _INSERT.execute_many(connection, [row])
        connection.rollback()
    with engine.connect() as connection:
        assert ledger.head(connection) == (1, entry.hash)
    assert [entry.seq for entry in _append(engine, 2)] == [2, 3]


@pytest.mark.postgres
def test_a_connection_lost_mid_transaction_is_invalidated_not_pooled(
    postgres: PostgresServer,
) -> None:
    engine = open_store(postgres.new_database())
    _append(engine, 1)
    with engine.connect() as watcher:
        watcher.execution_options(isolation_level="AUTOCOMMIT")
        with engine.begin() as connection:
            backend = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
            watcher.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
            with pytest.raises(OperationalError) as raised:
                _SET_HEAD.execute(connection, {"b_seq": 1, "b_hash": "lost"})
            assert connection.invalidated
            connection.rollback()
    assert raised.value.connection_invalidated
    # The pool does not hand the dead connection out again: the next append just works.
    assert [entry.seq for entry in _append(engine, 1)] == [2]
    engine.dispose()


def test_a_connection_without_a_transaction_begins_one_that_commit_keeps(engine: Engine) -> None:
    event = Event(type="note", time_us=now_us(), node="n")
    with engine.connect() as connection:
        [entry] = ledger.append(connection, [event])
        assert connection.in_transaction()
        connection.commit()
    with engine.connect() as connection:
        assert ledger.head(connection) == (1, entry.hash)


def test_a_value_the_statement_fixes_itself_may_be_none(engine: Engine) -> None:
    row = {name: 1 for name in ("opened_us", "window_ends_us", "last_hit_us", "first_hit_seq")}
    row |= {"hit_count": 1, "digested_count": 1, "next_digest_us": 1, "acked_by": "someone"}
    row |= {"id": "al-1", "canary_id": "c", "sandbox": "s", "routes": "[]", "status": "open"}
    unacknowledge = Prepared(
        update(alerts)
        .where(alerts.c.id == bindparam("b_id"))
        .values(acked_by=None)
        .returning(alerts.c.acked_by)
    )
    with engine.begin() as connection:
        connection.execute(insert(alerts), [{**row, "sources": "[]", "protocols": "[]"}])
        assert unacknowledge.execute(connection, {"b_id": "al-1"}) == [(None,)]
