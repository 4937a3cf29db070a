"""The real `oobwatch` command: serve, mint, a real DNS query, the page, the timeline, verify."""

import csv
import io
import json
import os
import smtplib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from urllib.parse import urlsplit

import dns.message
import dns.query
import dns.rcode
import httpx
import pytest

from canaries.plant import BUNDLE
from support import Receiver, Serving, node_config

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
    return node_config(tmp_path, receiver.url())


@pytest.fixture
def ports(config: Path) -> Iterator[dict[str, int]]:
    """`oobwatch serve` running; the port of each listener, by name."""
    node = Serving(config).start()
    try:
        yield node.ports
    finally:
        node.stop()


def query(port: int, name: str, qtype: str = "A") -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, qtype), "127.0.0.1", port=port, timeout=5)


def test_mint_query_page_timeline_verify(
    config: Path, ports: dict[str, int], receiver: Receiver
) -> None:
    server = ports["dns"]
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

    [page] = receiver.wait_for(1)
    assert minted["id"] in str(page.json()["message"])
    # The second hit folds into the open alert instead of paging again.
    [alert] = json.loads(run(config, "alerts", "list", "--json").stdout)
    assert alert["canary_id"] == minted["id"]
    assert alert["status"] == "open"
    for _ in range(50):
        if alert["hit_count"] == 2:
            break
        time.sleep(0.1)
        [alert] = json.loads(run(config, "alerts", "list", "--json").stdout)
    assert alert["hit_count"] == 2
    assert receiver.wait_for(2, timeout=0.5) == [page]

    events = json.loads(run(config, "timeline", "--sandbox", "sbx-42", "--format", "json").stdout)
    types = [event["type"] for event in events]
    assert types[0] == "canary_minted"
    assert types.count("hit") == 2
    hit = next(event for event in events if event["type"] == "hit")
    assert hit["protocol"] == "dns"
    assert hit["source_ip"] == "127.0.0.1"
    assert isinstance(hit["source_port"], int)
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
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        database.execute("UPDATE ledger SET sandbox = 'innocent' WHERE seq = 2")
    database.execute("DROP TRIGGER ledger_no_update")
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


def test_email_url_and_credential_canaries_through_serve(
    config: Path, ports: dict[str, int], receiver: Receiver, tmp_path: Path
) -> None:
    email = json.loads(run(config, "mint", "email", "--sandbox", "sbx-9", "--json").stdout)
    assert email["value"] == f"{email['token']}@canary.example.test"
    url = json.loads(run(config, "mint", "url", "--sandbox", "sbx-9", "--json").stdout)
    assert url["value"].startswith(f"http://{url['token']}.canary.example.test:")
    mcp = json.loads(
        run(config, "mint", "credential", "--format", "mcp", "--sandbox", "sbx-9", "--json").stdout
    )
    assert mcp["path_hint"] == "project/.mcp.json"
    assert json.loads(mcp["value"])["mcpServers"]

    mail = EmailMessage(policy=SMTP_POLICY)
    mail["From"] = "agent@sandbox"
    mail["To"] = email["value"]
    mail["Subject"] = "leak"
    mail.set_content(f"config: {mcp['value']}")
    with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=10) as client:
        client.send_message(mail)
    path = urlsplit(url["value"]).path
    with httpx.Client() as client:
        response = client.get(
            f"http://127.0.0.1:{ports['http']}{path}",
            headers={"Host": f"{url['token']}.canary.example.test"},
        )
    assert response.status_code == 200

    receiver.wait_for(3)
    events = json.loads(run(config, "timeline", "--sandbox", "sbx-9", "--format", "json").stdout)
    fired = sorted(
        (event["protocol"], event.get("trigger"), event["canary_id"])
        for event in events
        if event["type"] == "hit"
    )
    assert fired == sorted(
        [("smtp", "rcpt", email["id"]), ("smtp", "leaked", mcp["id"]), ("http", None, url["id"])]
    )
    assert any(event["type"] == "evidence" and event["subject"] == "leak" for event in events)

    home = tmp_path / "home"
    manifest = json.loads(
        run(config, "plant", "--sandbox", "sbx-9", "--into", str(home), "--json").stdout
    )
    # Every format of the bundle, and the contacts file's email and URL canaries.
    assert len(manifest) == len(BUNDLE) + 2
    assert (home / ".aws" / "credentials").is_file()
    again = run(config, "plant", "--sandbox", "sbx-9", "--into", str(home), "--json")
    assert json.loads(again.stdout) == []
    assert "skipped .netrc: it exists already" in again.stderr
