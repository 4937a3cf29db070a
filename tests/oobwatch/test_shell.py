"""The application shell as a new user meets it: config lookup, bind failures, logs, tokens, list."""

import io
import json
import logging
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from canaries.tokens import decode_exfil
from oobwatch import logs
from oobwatch.cli import main
from oobwatch.config import ConfigError, load
from store.engine import HEAD_REVISION, MIGRATIONS
from support import Receiver, Serving, node_config

OOBWATCH = [sys.executable, "-m", "oobwatch.cli"]


def oobwatch(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OOBWATCH_")}
    return subprocess.run(
        [*OOBWATCH, *args],
        cwd=cwd,
        env={**environment, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("oobwatch, version ")


def test_without_a_config_file_it_says_where_it_looked(tmp_path: Path) -> None:
    for command in (["serve"], ["list"]):
        result = oobwatch(*command, cwd=tmp_path)
        assert result.returncode == 2
        [line] = result.stderr.strip().splitlines()
        assert "no config file" in line
        assert "--config" in line
        assert "OOBWATCH_CONFIG" in line
        assert "oobwatch.toml" in line
    assert list(tmp_path.iterdir()) == []  # no stray database was created


def test_the_local_file_is_found_and_paths_are_relative_to_it(tmp_path: Path) -> None:
    home = tmp_path / "etc"
    home.mkdir()
    (home / "oobwatch.toml").write_text(
        "[store]\nurl = 'sqlite:///data/oob.db'\n[ledger]\nanchor_file = 'anchors.jsonl'\n"
    )
    (home / "data").mkdir()
    minted = oobwatch("mint", "dns", "--sandbox", "s", "--json", cwd=home)
    assert minted.returncode == 0, minted.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    listed = oobwatch("--config", str(home / "oobwatch.toml"), "list", "--json", cwd=elsewhere)
    assert [c["id"] for c in json.loads(listed.stdout)] == [json.loads(minted.stdout)["id"]]
    assert list(elsewhere.iterdir()) == []
    assert (home / "data" / "oob.db").is_file()
    config = load(home / "oobwatch.toml")
    assert config.ledger.anchor_file == home / "anchors.jsonl"
    assert config.source == (home / "oobwatch.toml").resolve()
    anchored = oobwatch("ledger", "anchor", cwd=home)
    assert anchored.returncode == 0, anchored.stderr
    assert json.loads((home / "anchors.jsonl").read_text().splitlines()[-1])["seq"] == 1
    assert oobwatch("ledger", "verify", "--anchor", "anchors.jsonl", cwd=home).returncode == 0


def test_ports_that_collide_are_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "oobwatch.toml"
    path.write_text("[http]\nport = 8787\n[api]\nport = 8787\n")
    with pytest.raises(ConfigError, match=r"api\.port 8787 on 127\.0\.0\.1 is also http\.port"):
        load(path)
    path.write_text("[http]\nport = 8787\nlisten = '0.0.0.0'\n[api]\nport = 8787\n")
    with pytest.raises(ConfigError, match=r"is also http\.port"):
        load(path)
    path.write_text("[http]\nport = 8787\nenabled = false\n[api]\nport = 8787\n")
    assert load(path).api.port == 8787


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_a_busy_port_is_one_line_naming_the_listener_and_nothing_is_left_running(
    tmp_path: Path, receiver: Receiver, log_format: str
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = node_config(tmp_path, receiver.url(), extra=f"[log]\nformat = '{log_format}'")
        config.write_text(config.read_text().replace("[http]\nport = 0", f"[http]\nport = {port}"))
        result = oobwatch("--config", str(config), "serve", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    expected = f"http cannot listen on 127.0.0.1:{port}: Address already in use"
    if log_format == "json":
        record = json.loads(lines[0])
        assert record["message"] == expected
        assert record["event.action"] == "bind-failed"
    else:
        assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_serve_raises_its_descriptor_limit_as_far_as_it_goes(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Started with 1,024 descriptors, fewer than its caps and accept backlogs could take, it
    takes all the hard limit allows."""
    path = node_config(tmp_path, receiver.url())
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    process = subprocess.Popen(
        [*OOBWATCH, "--config", str(path), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)),
    )
    try:
        assert process.stdout is not None
        assert "listening on" in process.stdout.readline()
        limits = Path(f"/proc/{process.pid}/limits").read_text()
    finally:
        process.terminate()
        process.communicate(timeout=30)
    soft = next(
        line.split()[3] for line in limits.splitlines() if line.startswith("Max open files")
    )
    assert int(soft) == hard


def test_json_logs_make_every_line_an_object(tmp_path: Path, receiver: Receiver) -> None:
    config = node_config(tmp_path, receiver.url(), extra="[log]\nformat = 'json'")
    config.write_text(config.read_text().replace(f'urls = ["{receiver.url()}"]', "urls = []"))
    serving = Serving(config)
    process = subprocess.Popen(
        [*OOBWATCH, "--config", str(config), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    announced = [json.loads(process.stdout.readline()) for _ in range(4)]
    assert {a["oobwatch.listener"] for a in announced} == {"dns", "smtp", "http", "api"}
    ports = {a["oobwatch.listener"]: a["server.port"] for a in announced}
    httpx.get(f"http://127.0.0.1:{ports['http']}/x", headers={"Host": "junk.example"})
    process.terminate()
    _, err = process.communicate(timeout=30)
    records = [json.loads(line) for line in err.splitlines()]
    assert records, err
    assert all({"@timestamp", "log.level", "log.logger", "message"} <= set(r) for r in records)
    assert any(r.get("event.action") == "no-alert-destination" for r in records)
    assert serving.process is None


def test_tokens_list_revoke_and_rotate(tmp_path: Path, receiver: Receiver) -> None:
    serving = Serving(
        node_config(tmp_path, receiver.url(), extra="[heartbeat]\nenabled = false")
    ).start()
    try:

        def cli(*args: str) -> str:
            result = CliRunner().invoke(main, ["--config", str(serving.config), *args])
            assert result.exit_code == 0, result.output
            return result.stdout

        created = json.loads(cli("token", "create", "--scope", "read", "--name", "ci", "--json"))
        assert created["token"].startswith(f"oob_{created['id']}_")
        url = f"http://127.0.0.1:{serving.ports['api']}/health"

        def status(text: str) -> int:
            return httpx.get(url, headers={"Authorization": f"Bearer {text}"}).status_code

        assert status(created["token"]) == 200
        [listed] = json.loads(cli("token", "list", "--json"))
        assert listed == {
            k: created[k] for k in ("id", "name", "scope", "created_at", "revoked_at")
        }
        assert "oob_" not in cli("token", "list")
        rotated = json.loads(cli("token", "rotate", created["id"], "--json"))
        assert rotated["id"] == created["id"]
        assert rotated["token"] != created["token"]
        assert status(created["token"]) == 401
        assert status(rotated["token"]) == 200
        assert f"revoked {created['id']}" in cli("token", "revoke", created["id"])
        assert status(rotated["token"]) == 401
        assert "revoked already" in cli("token", "revoke", created["id"])
        refused = CliRunner().invoke(
            main, ["--config", str(serving.config), "token", "rotate", created["id"]]
        )
        assert refused.exit_code == 1
        assert "is revoked" in refused.output
        [revoked] = json.loads(cli("token", "list", "--json"))
        assert revoked["revoked_at"] is not None
    finally:
        serving.stop()


def test_list_shows_state_and_hits_and_files_only_when_asked(tmp_path: Path) -> None:
    config = tmp_path / "oobwatch.toml"
    config.write_text("[store]\nurl = 'sqlite:///oob.db'\n")

    def cli(*args: str) -> str:
        result = CliRunner().invoke(main, ["--config", str(config), *args])
        assert result.exit_code == 0, result.output
        return result.stdout

    credential = json.loads(
        cli("mint", "credential", "--format", "netrc", "--sandbox", "s", "--json")
    )
    dns_canary = json.loads(cli("mint", "dns", "--sandbox", "s", "--json"))
    assert f"retired {dns_canary['id']} at" in cli("retire", dns_canary["id"])
    assert "was retired already" in cli("retire", dns_canary["id"])
    table = cli("list")
    assert "credential/netrc" in table
    assert "retired" in table
    assert "active" in table
    assert "password" not in table
    assert "password" in cli("list", "--show-files")
    assert [c["id"] for c in json.loads(cli("list", "--state", "retired", "--json"))] == [
        dns_canary["id"]
    ]
    assert [c["id"] for c in json.loads(cli("list", "--kind", "credential", "--json"))] == [
        credential["id"]
    ]
    blank = CliRunner().invoke(main, ["--config", str(config), "mint", "dns", "--sandbox", " "])
    assert blank.exit_code == 2
    assert "sandbox" in blank.output


@pytest.mark.parametrize(
    ("labels", "decoded"),
    [
        (["0", "746f6b656e3d"], "token="),
        (["746f6b656e3d"], "token="),
        (["17", "746f6b", "656e3d"], "token="),
        (["www", "746f6b656e3d"], "token="),
        (["www"], None),
    ],
)
def test_exfil_decoding_survives_counters_and_other_labels(
    labels: list[str], decoded: str | None
) -> None:
    assert decode_exfil(labels) == decoded


def test_the_schema_revision_constant_is_the_newest_migration() -> None:
    newest = sorted(path.name for path in (MIGRATIONS / "versions").glob("[0-9]*.py"))[-1]
    assert newest.startswith(HEAD_REVISION + "_")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[ledger]\nanchor_file = '~nosuchuser_zz/a'\n", None),
        ("[store]\nurl = 'postgresql://h:abc/db'\n", "store.url: not a SQLAlchemy database URL"),
    ],
)
def test_odd_values_are_config_errors_not_tracebacks(
    tmp_path: Path, text: str, expected: str | None
) -> None:
    path = tmp_path / "oobwatch.toml"
    path.write_text(text)
    if expected is None:
        load(path)
    else:
        with pytest.raises(ConfigError, match=expected):
            load(path)


def test_deeply_nested_environment_json_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "oobwatch.toml"
    path.write_text("")
    monkeypatch.setenv("OOBWATCH_DNS__PORT", "[" * 100_000)
    with pytest.raises(ConfigError, match=r"dns\.port"):
        load(path)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("1.2.3.4:53", ("1.2.3.4", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("::1", ("::1", None)),
        ("1.2.3.4:\u00b2", ("1.2.3.4", None)),
        ("1.2.3.4:99999999", ("1.2.3.4", None)),
        ("", (None, None)),
    ],
)
def test_sources_split_into_address_and_port(
    source: str, expected: tuple[str | None, int | None]
) -> None:
    from store.ledger import split_source

    assert split_source(source) == expected


def test_console_logs_escape_tracebacks_too() -> None:
    import logging

    from oobwatch.logs import ConsoleFormatter

    try:
        raise ValueError("x\n2030-01-01T00:00:00Z CRITICAL oobwatch: forged")
    except ValueError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", None, None)
        import sys as _sys

        record.exc_info = _sys.exc_info()
    lines = ConsoleFormatter().format(record).splitlines()
    assert not any(line.startswith("2030-01-01") for line in lines)


def test_a_flood_of_one_log_line_is_rate_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    stream = io.StringIO()
    logs.configure("json", "info", stream)
    flood = logging.getLogger("oobwatch.test.flood")
    for n in range(1_000):
        flood.warning("client %d misbehaved", n)
    logging.getLogger("oobwatch.test.other").warning("a different event")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len([line for line in lines if line["log.logger"] == "oobwatch.test.flood"]) == 20
    # Other kinds of event are not drowned by the flood.
    assert lines[-1]["message"] == "a different event"
    limit = next(f for f in root.handlers[0].filters if isinstance(f, logs.RateLimit))
    record = logging.LogRecord(
        "oobwatch.test.flood", logging.WARNING, "", 0, "client %d misbehaved", (1,), None
    )
    record.created += 60
    assert limit.filter(record)
    assert record.fields == {"oobwatch.suppressed": 980}
