"""Prepared statements: SQLAlchemy Core statements compiled once per dialect and run on
the transaction's DBAPI cursor.

The ledger append runs in front of every hit's answer. A one-hit commit with
its three statements run through SQLAlchemy's execution layer cost about
450 µs of CPU on SQLite, and with them run by the driver about 240 µs: most
of the difference is the per-statement setup of a result and of its
parameters. So the few statements
on that path are written as Core (one text for both dialects), compiled for
the connection's dialect on first use, and executed by the driver inside the
caller's transaction (begun here if the connection has none yet, as
SQLAlchemy's autobegin would). They take plain parameters: no type
processing, no expanding IN lists, no Python-side column defaults.
"""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine.interfaces import DBAPICursor
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement


class Prepared:
    """One statement, its compiled text per dialect, run through the driver."""

    def __init__(self, statement: ClauseElement) -> None:
        self._statement = statement
        # (dialect, driver, paramstyle) -> (SQL text, bind names in positional order or
        # None, the values of binds the statement fixes itself)
        self._forms: dict[
            tuple[str, str, str], tuple[str, tuple[str, ...] | None, dict[str, Any]]
        ] = {}

    def execute(
        self, connection: Connection, params: Mapping[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Run once with `params`, inside `connection`'s transaction; the rows it returns."""
        sql, names, fixed = self._form(connection)
        bound = _bound(names, fixed, params or {})
        with _driver(connection, sql, bound) as cursor:
            cursor.execute(sql, bound)
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []

    def execute_many(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run once per row of `rows`, inside `connection`'s transaction."""
        sql, names, fixed = self._form(connection)
        bound = [_bound(names, fixed, row) for row in rows]
        with _driver(connection, sql, bound) as cursor:
            cursor.executemany(sql, bound)

    def _form(self, connection: Connection) -> tuple[str, tuple[str, ...] | None, dict[str, Any]]:
        dialect = connection.dialect
        key = (dialect.name, dialect.driver, dialect.paramstyle)
        form = self._forms.get(key)
        if form is None:
            compiled = self._statement.compile(dialect=dialect)
            assert isinstance(compiled, SQLCompiler)
            names = tuple(compiled.positiontup or ()) if compiled.positional else None
            fixed = {
                name: value
                for name, value in compiled.params.items()
                if not compiled.binds[name].required
            }
            form = self._forms[key] = (str(compiled), names, fixed)
        return form


@contextmanager
def _driver(connection: Connection, sql: str, params: Any) -> Iterator[DBAPICursor]:
    """A cursor of `connection`'s driver connection; its errors raised as SQLAlchemy raises
    them (`OperationalError`, `IntegrityError`...), a lost connection invalidated first."""
    if not connection.in_transaction():
        connection.begin()
    dbapi_connection = connection.connection.dbapi_connection
    assert dbapi_connection is not None, "the connection is closed"
    dialect = connection.dialect
    cursor = None
    try:
        cursor = dbapi_connection.cursor()
        yield cursor
    except dialect.loaded_dbapi.Error as error:
        lost = dialect.is_disconnect(error, dbapi_connection, cursor)
        if lost:
            connection.invalidate(error)
        raise DBAPIError.instance(
            sql,
            params,
            error,
            dialect.loaded_dbapi.Error,
            connection_invalidated=lost,
            dialect=dialect,
        ) from error
    finally:
        if cursor is not None and not connection.invalidated:
            cursor.close()


def _bound(names: tuple[str, ...] | None, fixed: dict[str, Any], params: Mapping[str, Any]) -> Any:
    """The driver's parameters: a tuple in the compiled order, or a mapping by name."""
    if names is None:
        return {**fixed, **params}
    return tuple([params[name] if name in params else fixed[name] for name in names])
