"""No hit lost while the store is away: `oobwatch serve` spools, answers, and replays once.

Real parts throughout: the node is a real process, PostgreSQL is the test's own
server (stopped as a crash would stop it), SQLite is locked by another
process, queries come from dnspython over UDP, pages reach a real receiver.
"""

import json
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
from sqlalchemy import Engine, func, select

from store import ledger
from store.engine import open_engine
from store.schema import ledger as ledger_table
from support import PostgresServer, Receiver, Serving, node_config, postgres_bin

QUIET = "[bursts]\nthreshold = 1000000\n[heartbeat]\nenabled = false\n"


def cli(config: Path, *args: str) -> str:
    """The CLI as a user runs it: a process of its own."""
    command = [sys.executable, "-m", "oobwatch.cli", "--config", str(config), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, which it may stop."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.fail("PostgreSQL is not installed; `make test` installs it with apt-get")
    server = PostgresServer(bindir)
    server.start()
    yield server
    server.stop()


def ask(port: int, name: str) -> bool:
    """One query as a stub resolver sends it (two tries); whether it was answered as a hit
    is (SERVFAIL says it was not recorded)."""
    query = dns.message.make_query(name, "A")
    for _ in range(2):
        try:
            reply = dns.query.udp(query, "127.0.0.1", port=port, timeout=2)
        except dns.exception.Timeout:
            continue
        if reply.rcode() == dns.rcode.NOERROR and reply.answer:
            return True
    return False


def steadily(port: int, names: list[str], seconds: float) -> list[str]:
    """Send `names` evenly over `seconds`; the ones that were answered."""
    answered = []
    started = time.monotonic()
    for number, name in enumerate(names):
        time.sleep(max(0.0, started + number * seconds / len(names) - time.monotonic()))
        if ask(port, name):
            answered.append(name)
    return answered


def recorded(url: str) -> Counter[str]:
    """How many hit rows each query name has."""
    engine = open_engine(url)
    with engine.connect() as connection:
        names = Counter(
            entry.evidence["qname"].rstrip(".")
            for entry in ledger.entries(connection)
            if entry.type == "hit"
        )
    engine.dispose()
    return names


def rows(url: str) -> int:
    engine = open_engine(url)
    with engine.connect() as connection:
        count = connection.execute(select(func.count()).select_from(ledger_table)).scalar_one()
    engine.dispose()
    return int(count)


def replayed(engine: Engine) -> int:
    """Rows that came from the spool."""
    spooled = ledger_table.c.data.like('%"spooled":true%')
    with engine.connect() as connection:
        query = select(func.count()).select_from(ledger_table).where(spooled)
        return int(connection.execute(query).scalar_one())


def wait_until(predicate: object, seconds: float = 60.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert predicate()


def served(tmp_path: Path, receiver: Receiver, url: str) -> tuple[Serving, str]:
    config = node_config(tmp_path, receiver.url("json", "/page"), extra=QUIET, store_url=url)
    node = Serving(config).start()
    canary = json.loads(cli(config, "mint", "dns", "--sandbox", "agent-7", "--json"))
    return node, canary["value"]


def test_postgresql_away_for_30_s_loses_and_duplicates_no_answered_hit(
    tmp_path: Path, receiver: Receiver, own_postgres: PostgresServer
) -> None:
    url = own_postgres.new_database()
    node, canary = served(tmp_path, receiver, url)
    try:
        assert ask(node.ports["dns"], f"before.{canary}")
        own_postgres.halt()
        names = [f"q{number}.{canary}" for number in range(1000)]
        answered = steadily(node.ports["dns"], names, 30.0)
        # While it was away the heartbeat route heard of it once, directly.
        spooling = [r for r in receiver.requests if "UNREACHABLE" in r.body.decode()]
        own_postgres.resume()
        wait_until(lambda: rows(url) >= len(answered) + 1)
        time.sleep(1.5)  # a few more replay rounds: nothing comes twice
        found = recorded(url)
    finally:
        node.stop()
    assert len(spooling) == 1
    assert len(answered) == len(names)
    assert all(found[name] == 1 for name in answered)
    assert set(found) == {*answered, f"before.{canary}"}
    assert max(found.values()) == 1
    assert "intact" in cli(node.config, "ledger", "verify")
    events = json.loads(cli(node.config, "timeline", "--sandbox", "agent-7", "--format", "json"))
    hits = [event for event in events if event["type"] == "hit"]
    spooled = [event for event in hits if event.get("spooled")]
    assert len(spooled) == len(names)
    assert all(event["received_at"] <= event["time"] for event in spooled)
    # The spooled hits paged once they reached the ledger.
    assert any("agent-7" in r.body.decode() for r in receiver.requests)


def test_a_kill_during_the_replay_loses_and_duplicates_nothing(
    tmp_path: Path, receiver: Receiver, own_postgres: PostgresServer
) -> None:
    url = own_postgres.new_database()
    node, canary = served(tmp_path, receiver, url)
    count = 3000
    try:
        assert ask(node.ports["dns"], f"before.{canary}")
        own_postgres.halt()
        names = [f"k{number}.{canary}" for number in range(count)]
        answered = steadily(node.ports["dns"], names, 3.0)
        own_postgres.resume()
        # Killed as soon as the replay has committed something, with more still to come.
        watch = open_engine(url)
        wait_until(lambda: replayed(watch) > 0, 30)
        node.kill()
        at_kill = replayed(watch)
        watch.dispose()
        node.start()
        wait_until(lambda: rows(url) >= len(answered) + 1)
        time.sleep(1.5)
        found = recorded(url)
    finally:
        node.stop()
    assert len(answered) == count
    assert 0 < at_kill < count
    assert all(found[name] == 1 for name in answered)
    assert sum(found.values()) == count + 1
    assert "intact" in cli(node.config, "ledger", "verify")


def test_sqlite_locked_for_30_s_by_another_process_loses_and_duplicates_no_answered_hit(
    tmp_path: Path, receiver: Receiver
) -> None:
    database = tmp_path / "oobwatch.db"
    url = f"sqlite:///{database}"
    node, canary = served(tmp_path, receiver, url)
    locker = None
    try:
        locker = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        names = [f"s{number}.{canary}" for number in range(1000)]
        assert ask(node.ports["dns"], f"before.{canary}")
        locker.execute("BEGIN EXCLUSIVE")
        answered = steadily(node.ports["dns"], names, 30.0)
        locker.execute("ROLLBACK")
        wait_until(lambda: rows(url) >= len(answered) + 1)
        time.sleep(1.5)
        found = recorded(url)
    finally:
        if locker is not None:
            locker.close()
        node.stop()
    assert len(answered) == len(names)
    assert all(found[name] == 1 for name in answered)
    assert sum(found.values()) == len(names) + 1
    assert "intact" in cli(node.config, "ledger", "verify")
