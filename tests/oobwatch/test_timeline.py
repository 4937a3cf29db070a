"""`oobwatch timeline` filters and formats, in-process over a store filled through the ledger."""

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine

from oobwatch import operations, output
from oobwatch.cli import main
from oobwatch.config import load
from oobwatch.views import Filters
from store.clock import to_iso
from store.ledger import Event
from support import store_with

BASE = 1_790_000_000_000_000  # 2026-09-21T...Z


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, Engine]:
    events = [
        Event("canary_minted", BASE, "n", "cn-a", "sbx-1", data={"value": "a.zone"}),
        Event(
            "hit",
            BASE + 10,
            "n",
            "cn-a",
            "sbx-1",
            "dns",
            "198.51.100.1:53",
            {"qname": "@SUM(1).a.zone.", "qtype": "A"},
        ),
        Event(
            "hit",
            BASE + 5,
            "n",
            "cn-b",
            "sbx-2",
            "dns",
            "198.51.100.2:53",
            {"qname": "b.zone.", "qtype": "TXT"},
        ),
        Event(
            "alert_sent",
            BASE + 20,
            "n",
            "cn-a",
            "sbx-1",
            data={"target": "json://x/...", "error": None},
        ),
        Event(
            "hit",
            BASE + 30,
            "n",
            "cn-a",
            "sbx-1",
            "dns",
            "198.51.100.3:53",
            {"qname": "=1+1.a.zone.", "qtype": "AAAA", "decoded": "\x1b[2J"},
        ),
    ]
    return store_with(tmp_path, events)


def timeline(config: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["--config", str(config), "timeline", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_json_is_ordered_by_time_and_filtered_by_sandbox(filled: tuple[Path, Engine]) -> None:
    config, _ = filled
    events = json.loads(timeline(config, "--sandbox", "sbx-1", "--format", "json"))
    assert [event["type"] for event in events] == ["canary_minted", "hit", "alert_sent", "hit"]
    assert events[1]["time"] == to_iso(BASE + 10)
    everything = json.loads(timeline(config, "--format", "json"))
    assert [event["canary_id"] for event in everything][:3] == ["cn-a", "cn-b", "cn-a"]


def test_canary_and_time_window(filled: tuple[Path, Engine]) -> None:
    config, _ = filled
    window = ["--since", to_iso(BASE + 5), "--until", to_iso(BASE + 30), "--format", "json"]
    events = json.loads(timeline(config, "--canary", "cn-a", *window))
    assert [(e["type"], e["source_ip"], e["source_port"]) for e in events] == [
        ("hit", "198.51.100.1", 53),
        ("alert_sent", None, None),
    ]


def test_bad_time_is_a_clear_error(filled: tuple[Path, Engine]) -> None:
    config, _ = filled
    result = CliRunner().invoke(main, ["--config", str(config), "timeline", "--since", "yesterday"])
    assert result.exit_code == 2
    assert "not an ISO 8601 time" in result.output


def test_csv_neutralises_formulas(filled: tuple[Path, Engine]) -> None:
    config, _ = filled
    rows = list(csv.DictReader(io.StringIO(timeline(config, "--format", "csv"))))
    assert [row["qname"] for row in rows if row["type"] == "hit"] == [
        "b.zone.",
        "'@SUM(1).a.zone.",
        "'=1+1.a.zone.",
    ]
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row.values())


def test_table_escapes_control_characters(filled: tuple[Path, Engine]) -> None:
    config, _ = filled
    table = timeline(config)
    assert "\x1b" not in table
    assert "\\x1b[2J" in table
    assert "198.51.100.3:53" in table


@pytest.mark.parametrize("size", [1, 2, 3, 100])
def test_an_export_in_chunks_is_the_same_text(
    filled: tuple[Path, Engine], size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, engine = filled
    monkeypatch.setattr(operations, "EXPORT_CHUNK", size)
    ops = operations.LocalOperations(load(config), engine)
    everything = ops.timeline(Filters())
    assert [e for chunk in ops.timeline_chunks(Filters()) for e in chunk] == everything
    assert "".join(output.json_chunks(ops.timeline_chunks(Filters()))) == output.as_json(everything)
    assert "".join(output.csv_chunks(ops.timeline_chunks(Filters()))) == output.timeline_csv(
        everything
    )
    none = Filters(sandbox="nobody")
    assert "".join(output.json_chunks(ops.timeline_chunks(none))) == output.as_json([])
    assert "".join(output.csv_chunks(ops.timeline_chunks(none))) == output.timeline_csv([])
