"""The CLI against a remote node's API: `--api URL --token T` does what the local store does."""

import json
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import pytest
from click.testing import CliRunner, Result

from oobwatch.cli import main
from support import Receiver, Serving, node_config


@pytest.fixture
def remote(tmp_path: Path, receiver: Receiver) -> Iterator[tuple[Path, dict[str, int]]]:
    node = Serving(
        node_config(tmp_path, receiver.url(), extra="[heartbeat]\nenabled = false")
    ).start()
    try:
        yield node.config, node.ports
    finally:
        node.stop()


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_the_cli_works_over_the_api(
    remote: tuple[Path, dict[str, int]], receiver: Receiver, tmp_path: Path
) -> None:
    config, ports = remote
    tokens = {
        scope: json.loads(
            run(
                "--config",
                str(config),
                "token",
                "create",
                "--scope",
                scope,
                "--name",
                scope,
                "--json",
            ).stdout
        )["token"]
        for scope in ("admin", "read")
    }
    api = ["--api", f"http://127.0.0.1:{ports['api']}", "--token", tokens["admin"]]
    minted = json.loads(
        run(*api, "mint", "dns", "--sandbox", "sbx-r", "--label", "team=x", "--json").stdout
    )
    assert minted["labels"] == {"team": "x"}
    dns.query.udp(
        dns.message.make_query(minted["value"], "A"), "127.0.0.1", port=ports["dns"], timeout=5
    )
    receiver.wait_for(1)
    assert [
        c["id"] for c in json.loads(run(*api, "list", "--sandbox", "sbx-r", "--json").stdout)
    ] == [minted["id"]]
    events = json.loads(run(*api, "timeline", "--sandbox", "sbx-r", "--format", "json").stdout)
    assert [e["type"] for e in events][:2] == ["canary_minted", "hit"]
    assert "hit" in run(*api, "timeline", "--sandbox", "sbx-r").stdout
    assert run(*api, "timeline", "--format", "csv").stdout.startswith("seq,time,type")
    [incident] = json.loads(run(*api, "timeline", "--incidents", "--format", "json").stdout)
    assert f"Incident {incident['id']}" in run(*api, "incident", "show", incident["id"]).stdout
    [alert] = json.loads(run(*api, "alerts", "list", "--open", "--json").stdout)
    assert run(*api, "alerts", "ack", alert["id"], "--by", "bob").exit_code == 0
    assert json.loads(run(*api, "alerts", "list", "--json").stdout)[0]["acked_by"] == "bob"
    assert run(*api, "alerts", "resolve", alert["id"]).exit_code == 0
    head = json.loads(run(*api, "ledger", "head", "--json").stdout)
    verified = run(*api, "ledger", "verify")
    assert verified.exit_code == 0
    assert head["hash"][:10] in verified.stdout or "ledger intact" in verified.stdout
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text("Host mine\n")
    planted = run(*api, "plant", "--sandbox", "sbx-r", "--into", str(home), "--json")
    assert planted.exit_code == 0, planted.output
    assert (home / ".netrc").is_file()
    assert (home / ".ssh" / "config").read_text() == "Host mine\n"
    assert "skipped .ssh/config" in planted.stderr
    assert {c["location"] for c in json.loads(planted.stdout)} >= {".netrc", ".aws/credentials"}

    reader = ["--api", f"http://127.0.0.1:{ports['api']}", "--token", tokens["read"]]
    refused = run(*reader, "mint", "dns", "--sandbox", "x")
    assert refused.exit_code == 1
    assert "API answered 403" in refused.output
    assert run("--api", "http://127.0.0.1:1", "--token", "t", "list").exit_code == 1
    assert run("--api", "http://127.0.0.1:1", "list").exit_code == 2  # --api needs --token
    # The node keeps appending (deliveries, heartbeats): the export ends at the head it read,
    # which is this head or a later one.
    head = json.loads(run(*api, "ledger", "head", "--json").stdout)
    exported = run(*api, "ledger", "export")
    assert exported.exit_code == 0
    rows = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [row["seq"] for row in rows] == list(range(1, len(rows) + 1))
    assert rows[head["seq"] - 1]["hash"] == head["hash"]
