"""Incidents across DNS, SMTP and HTTP for one sandbox; filters; follow; incident show."""

import csv
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from canaries.mint import mint
from oobwatch.cli import main
from store import ledger
from store.engine import open_engine
from store.ledger import Event
from store.timeline import incidents
from support import ZONE, record_burst, store_with

MINUTE = 60_000_000
T0 = 1_800_000_000_000_000


def hit(
    at: int, canary: str, protocol: str, source: str, sandbox: str = "sbx-7", kind: str = "dns"
) -> Event:
    return Event(
        "hit", at, "n", canary, sandbox, protocol, source, {"kind": kind, "qname": "=cmd|x"}
    )


def story() -> list[Event]:
    """Two bursts in sbx-7 (DNS then SMTP and HTTP; later HTTP again), one in sbx-8."""
    return [
        Event("canary_minted", T0 - MINUTE, "n", "cn-a", "sbx-7", data={"value": "a"}),
        hit(T0, "cn-a", "dns", "198.51.100.1:53"),
        Event(
            "alert_opened",
            T0 + 1,
            "n",
            "cn-a",
            "sbx-7",
            data={"alert_id": "al-1", "routes": ["default"]},
        ),
        Event(
            "alert_sent",
            T0 + 2,
            "n",
            "cn-a",
            "sbx-7",
            data={
                "alert_id": "al-1",
                "purpose": "page",
                "route": "default",
                "target": "apprise:0",
                "attempt": 1,
            },
        ),
        hit(T0 + 5 * MINUTE, "cn-b", "smtp", "203.0.113.9:25", kind="email"),
        hit(T0 + 9 * MINUTE, "cn-c", "http", "203.0.113.9:443", kind="credential"),
        Event(
            "alert_acked",
            T0 + 10 * MINUTE,
            "n",
            "cn-a",
            "sbx-7",
            data={"alert_id": "al-1", "by": "alice"},
        ),
        hit(T0 + 3 * MINUTE, "cn-z", "dns", "192.0.2.1:53", sandbox="sbx-8"),
        hit(T0 + 120 * MINUTE, "cn-a", "http", "198.51.100.1:8080", kind="credential"),
    ]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path, engine = store_with(tmp_path, story(), "[timeline]\nincident_gap = '30m'\n")
    engine.dispose()
    return path


def cli(config: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["--config", str(config), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_incidents_group_by_sandbox_and_quiet_gap(config: Path) -> None:
    grouped = json.loads(cli(config, "timeline", "--incidents", "--format", "json"))
    assert [(i["sandbox"], i["hits"]) for i in grouped] == [
        ("sbx-7", 3),
        ("sbx-8", 1),
        ("sbx-7", 1),
    ]
    first = grouped[0]
    assert first["channels"] == ["dns", "http", "smtp"]
    # Distinct hosts: one host's two connections (ports 25 and 443) are one source.
    assert first["sources"] == ["198.51.100.1", "203.0.113.9"]
    assert first["canaries"] == ["cn-a", "cn-b", "cn-c"]
    assert first["alerts"] == ["al-1"]
    assert first["acked_by"] == ["alice"]
    assert [f["type"] for f in first["follow_up"]] == ["alert_opened", "alert_sent", "alert_acked"]
    assert first["first"] < first["last"]


def test_incident_csv_is_spreadsheet_safe_and_the_table_renders(config: Path) -> None:
    rows = list(
        csv.DictReader(io.StringIO(cli(config, "timeline", "--incidents", "--format", "csv")))
    )
    assert [row["id"] for row in rows] == [
        i["id"] for i in json.loads(cli(config, "timeline", "--incidents", "--format", "json"))
    ]
    assert "incidents" in cli(config, "timeline", "--incidents")


def test_incident_show_tells_the_story_with_evidence(config: Path) -> None:
    [first, *_] = json.loads(cli(config, "timeline", "--incidents", "--format", "json"))
    text = cli(config, "incident", "show", first["id"])
    assert f"Incident {first['id']}: sandbox sbx-7, 3 hits" in text
    assert text.count("  hit  ") == 3
    assert 'qname: "=cmd|x"' in text
    assert "\\n" not in text  # blank lines between events, not an escaped newline
    assert "\n\n" in text
    detail = json.loads(cli(config, "incident", "show", first["id"], "--format", "json"))
    assert [e["type"] for e in detail["events"]].count("hit") == 3
    for unknown in ("in-999", "in-99999999999999999999", "in-x", "in--1"):
        missing = CliRunner().invoke(main, ["--config", str(config), "incident", "show", unknown])
        assert missing.exit_code == 1
        assert f"no incident {unknown}" in missing.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--protocol", "smtp"], ["cn-b"]),
        (["--source", "203.0.113.0/24"], ["cn-b", "cn-c"]),
        (["--kind", "credential"], ["cn-c", "cn-a"]),
        (["--sandbox", "sbx-8"], ["cn-z"]),
    ],
)
def test_filters(config: Path, args: list[str], expected: list[str]) -> None:
    events = json.loads(cli(config, "timeline", "--format", "json", *args))
    assert [e["canary_id"] for e in events if e["type"] == "hit"] == expected


def test_bad_source_network(config: Path) -> None:
    result = CliRunner().invoke(main, ["--config", str(config), "timeline", "--source", "nope"])
    assert result.exit_code == 2
    assert "not an IP network" in result.output


def test_follow_prints_new_events_as_they_are_committed(config: Path, tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oobwatch.cli",
            "--config",
            str(config),
            "timeline",
            "--follow",
            "--format",
            "json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        existing = [json.loads(process.stdout.readline()) for _ in range(len(story()))]
        assert existing[0]["type"] == "canary_minted"
        engine = open_engine(f"sqlite:///{tmp_path / 'oobwatch.db'}")
        with engine.begin() as connection:
            ledger.append(connection, [hit(T0 + 200 * MINUTE, "cn-new", "dns", "192.0.2.77:53")])
        engine.dispose()
        started = time.monotonic()
        fresh = json.loads(process.stdout.readline())
        assert fresh["canary_id"] == "cn-new"
        assert time.monotonic() - started < 30
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def test_grouping_is_pure_and_ignores_events_before_any_hit() -> None:
    entries = []
    for n, event in enumerate(sorted(story(), key=lambda e: e.time_us), start=1):
        entries.append(
            ledger.Entry(
                n,
                event.time_us,
                event.type,
                event.canary_id,
                event.sandbox,
                event.protocol,
                event.source,
                event.node,
                json.dumps(dict(event.data)),
                "",
                "",
            )
        )
    grouped = incidents(entries, 30 * MINUTE)
    assert all(i.entries[0].type == "hit" for i in grouped)
    assert sum(len(i.hits) for i in grouped) == 5


async def test_a_burst_is_shown_as_what_it_is(tmp_path: Path) -> None:
    config, engine = store_with(tmp_path, [])
    canary = mint(engine, kind="dns", zone=ZONE, sandbox="sbx-9", node="n", location="/x")
    await record_burst(engine, canary, 2_500)
    engine.dispose()
    [incident] = json.loads(cli(config, "timeline", "--incidents", "--format", "json"))
    assert incident["hits"] == 2_500
    assert incident["sources"] == ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
    text = cli(config, "incident", "show", incident["id"])
    assert f"2,500 lookups of canary {canary.id} from 3 sources in " in text
    [listed] = json.loads(cli(config, "list", "--json"))
    assert listed["hits"] == 2_500
