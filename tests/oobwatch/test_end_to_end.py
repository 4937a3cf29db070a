"""The real `oobwatch` command: serve, mint, a real DNS query, the page, the timeline, verify."""

import csv
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from support import Receiver

OOBWATCH = [sys.executable, "-m", "oobwatch.cli"]


def run(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*OOBWATCH, "--config", str(config), *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


@pytest.fixture
def config(tmp_path: Path, receiver: Receiver) -> Path:
    path = tmp_path / "oobwatch.toml"
    path.write_text(
        f"""
[node]
name = "e2e"
[store]
url = "sqlite:///{tmp_path / "oobwatch.db"}"
[dns]
zone = "canary.example.test"
listen = "127.0.0.1"
port = 0
answer_ipv4 = ["192.0.2.10"]
[alerts]
urls = ["{receiver.url()}"]
"""
    )
    return path


@pytest.fixture
def server(config: Path) -> Iterator[int]:
    process = subprocess.Popen(
        [*OOBWATCH, "--config", str(config), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("dns listening on 127.0.0.1:"), line
    try:
        yield int(line.rsplit(":", 1)[1])
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        process.stdout.close()


def query(port: int, name: str, qtype: str = "A") -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, qtype), "127.0.0.1", port=port, timeout=5)


def test_mint_query_page_timeline_verify(config: Path, server: int, receiver: Receiver) -> None:
    minted = json.loads(
        run(
            config,
            "mint",
            "dns",
            "--sandbox",
            "sbx-42",
            "--location",
            "/home/agent/.bashrc",
            "--label",
            "team=evals",
            "--json",
        ).stdout
    )
    assert {
        "id",
        "token",
        "kind",
        "value",
        "sandbox",
        "location",
        "labels",
        "created_at",
    } <= minted.keys()
    assert minted["value"] == f"{minted['token']}.canary.example.test"
    assert minted["labels"] == {"team": "evals"}

    listed = json.loads(run(config, "list", "--json", "--sandbox", "sbx-42").stdout)
    assert [canary["id"] for canary in listed] == [minted["id"]]
    assert json.loads(run(config, "list", "--json", "--sandbox", "other").stdout) == []

    exfil = "mfrggzdfmztwq2lk"  # base32 of "abcdefghij"
    reply = query(server, f"{exfil}.{minted['value']}")
    assert reply.rcode() == dns.rcode.NOERROR
    assert query(server, "www.example.com").rcode() == dns.rcode.REFUSED
    query(server, f'=HYPERLINK("http://x").{minted["value"]}', "TXT")

    pages = receiver.wait_for(2)
    assert len(pages) == 2
    assert minted["id"] in str(pages[0].json()["title"])

    events = json.loads(run(config, "timeline", "--sandbox", "sbx-42", "--format", "json").stdout)
    types = [event["type"] for event in events]
    assert types[0] == "canary_minted"
    assert types.count("hit") == 2
    hit = next(event for event in events if event["type"] == "hit")
    assert hit["protocol"] == "dns"
    assert hit["source"].startswith("127.0.0.1:")
    assert hit["qname"] == f"{exfil}.{minted['value']}."
    assert hit["qtype"] == "A"
    assert hit["left_labels"] == [exfil]
    assert hit["decoded"] == "abcdefghij"
    assert hit["canary_id"] == minted["id"]
    assert all(event["time"].endswith("Z") for event in events)
    assert [event["time"] for event in events] == sorted(event["time"] for event in events)

    rows = list(csv.DictReader(io.StringIO(run(config, "timeline", "--format", "csv").stdout)))
    formula = next(row for row in rows if row["qtype"] == "TXT")
    assert formula["qname"].startswith("'=HYPERLINK")
    for row in rows:
        assert not any(cell.startswith(("=", "+", "-", "@")) for cell in row.values())

    table = run(config, "timeline", "--canary", minted["id"]).stdout
    assert "hit" in table

    verified = run(config, "ledger", "verify")
    assert verified.stdout.startswith("ledger intact:")


def test_ledger_verify_names_a_tampered_row(config: Path, tmp_path: Path) -> None:
    for sandbox in ("a", "b", "c"):
        run(config, "mint", "dns", "--sandbox", sandbox)
    assert run(config, "ledger", "verify").returncode == 0
    database = sqlite3.connect(tmp_path / "oobwatch.db")
    database.execute("UPDATE ledger SET sandbox = 'innocent' WHERE seq = 2")
    database.commit()
    database.close()
    result = run(config, "ledger", "verify", check=False)
    assert result.returncode == 1
    assert "row 2" in result.stderr


def test_serve_exits_cleanly_with_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[dns]\nport = -1\n")
    env = {**os.environ, "OOBWATCH_CONFIG": str(path)}
    result = subprocess.run(
        [*OOBWATCH, "serve"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "config error: dns.port: Input should be greater than or equal to 0"
    )
