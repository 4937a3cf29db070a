"""Ledger integrity from the CLI and the scheduled jobs: head, export, offline verify, anchors."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, delete, insert, update

from alerts.policy import DEFAULT_ROUTE, Policy, Route, Sink
from oobwatch.cli import main
from oobwatch.config import load
from oobwatch.integrity import Integrity
from oobwatch.operations import LocalOperations
from store import ledger
from store.schema import ledger as ledger_table
from store.schema import ledger_head
from support import Receiver, drop_ledger_guards, numbered_event, store_with


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, Engine]:
    return store_with(tmp_path, [numbered_event(n) for n in range(20)])


def cli(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(config), *args])


def test_head_export_and_offline_verify(store: tuple[Path, Engine], tmp_path: Path) -> None:
    config, _ = store
    head = json.loads(cli(config, "ledger", "head", "--json").stdout)
    assert head["seq"] == 20
    export = tmp_path / "chain.jsonl"
    assert cli(config, "ledger", "export", "--output", str(export)).exit_code == 0
    lines = export.read_text().splitlines()
    assert len(lines) == 20
    assert json.loads(lines[-1])["hash"] == head["hash"]
    verified = cli(config, "ledger", "verify", "--file", str(export))
    assert verified.exit_code == 0
    assert head["hash"] in verified.stdout
    edited = json.loads(lines[4])
    edited["source"] = "10.9.9.9:1"
    lines[4] = json.dumps(edited)
    export.write_text("\n".join(lines) + "\n")
    broken = cli(config, "ledger", "verify", "--file", str(export))
    assert broken.exit_code == 1
    assert "row 5" in broken.stderr
    export.write_text("not json\n")
    assert (
        "line 1 is not a ledger entry"
        in cli(config, "ledger", "verify", "--file", str(export)).output
    )


def test_a_truncated_and_rebuilt_chain_is_caught_by_the_anchor(
    store: tuple[Path, Engine], tmp_path: Path
) -> None:
    config, engine = store
    anchor_file = tmp_path / "anchors.jsonl"
    integrity = Integrity(engine, Policy({}), "n1", anchor_file, None, None)
    integrity.anchor(1)
    with engine.begin() as connection:
        ledger.append(connection, [numbered_event(99)])
    integrity.anchor(2)
    assert cli(config, "ledger", "verify", "--anchor", str(anchor_file)).exit_code == 0
    # Rewrite history: drop the guards, empty the chain, reset the head, rebuild a clean chain.
    with engine.begin() as connection:
        drop_ledger_guards(connection)
        connection.execute(delete(ledger_table))
        connection.execute(update(ledger_head).values(seq=0, hash=ledger.GENESIS))
        ledger.append(connection, [numbered_event(n + 1000) for n in range(25)])
    assert cli(config, "ledger", "verify").exit_code == 0  # internally consistent...
    caught = cli(config, "ledger", "verify", "--anchor", str(anchor_file))
    assert caught.exit_code == 1  # ...but the saved heads are gone
    assert "anchored head 20" in caught.stderr
    # The API's and the console's verify is the node's check: the saved heads count there too.
    loaded = load(config)
    checked = Integrity(engine, loaded.policy(), "n1", anchor_file, None, None)
    verified = LocalOperations(loaded, engine, integrity=checked).verify()
    assert not verified.intact
    assert "anchored head 20" in (verified.problem or "")


def test_rows_beyond_the_head_are_caught(store: tuple[Path, Engine]) -> None:
    config, engine = store
    with engine.begin() as connection:
        last = list(ledger.entries(connection))[-1]
        connection.execute(
            insert(ledger_table).values(
                seq=21, **{k: getattr(last, k) for k in ledger.Entry.__slots__ if k != "seq"}
            )
        )
    result = cli(config, "ledger", "verify")
    assert result.exit_code == 1
    assert "row 21 lies beyond the head" in result.stderr


def test_scheduled_verify_pages_once_per_break(
    store: tuple[Path, Engine], receiver: Receiver
) -> None:
    _, engine = store
    policy = Policy(
        {
            DEFAULT_ROUTE: Route(
                DEFAULT_ROUTE, (Sink("webhook:0", "webhook", receiver.http("/ops"), "x" * 16),)
            )
        }
    )
    integrity = Integrity(engine, policy, "n1", None, None, None)
    assert integrity.check(1).intact
    with engine.begin() as connection:
        drop_ledger_guards(connection)
        connection.execute(update(ledger_table).where(ledger_table.c.seq == 7).values(node="evil"))
    assert integrity.check(2).bad_seq == 7
    assert integrity.check(3).bad_seq == 7
    with engine.connect() as connection:
        from store.schema import deliveries

        queued = connection.execute(deliveries.select()).mappings().all()
    assert [row["purpose"] for row in queued] == ["integrity"]
    assert "row 7" not in queued[0]["payload"] or "contents do not match" in queued[0]["payload"]
    assert [e.type for e in ledger.entries(engine.connect()) if e.type == "ledger_broken"] == [
        "ledger_broken"
    ]
