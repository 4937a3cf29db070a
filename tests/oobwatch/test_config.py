"""Configuration: the file, environment overrides, and one clear line per bad key."""

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from oobwatch.cli import main
from oobwatch.config import DEFAULT_CONFIG, ConfigError, load
from store.engine import HEAD_REVISION, open_engine, revision


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "oobwatch.toml"
    path.write_text(text)
    return path


def test_the_default_config_loads(tmp_path: Path) -> None:
    config = load(write(tmp_path, DEFAULT_CONFIG))
    assert config.dns.zone == "canary.example.test"
    assert config.dns.port == 5353
    assert [str(a) for a in config.dns.answer_ipv4] == ["127.0.0.1"]
    assert config.alerts.urls == []


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OOBWATCH_DNS__PORT", "15353")
    monkeypatch.setenv("OOBWATCH_DNS__ZONE", "Canary.Corp.Example.")
    monkeypatch.setenv("OOBWATCH_ALERTS__URLS", '["json://127.0.0.1:9/x"]')
    config = load(write(tmp_path, DEFAULT_CONFIG))
    assert config.dns.port == 15353
    assert config.dns.zone == "canary.corp.example"
    assert config.alerts.urls == ["json://127.0.0.1:9/x"]


def test_a_secret_comes_from_the_file_a_file_variable_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "store-url"
    secret.write_text("postgresql+psycopg://oobwatch:s3cret@db/oobwatch\n")
    monkeypatch.setenv("OOBWATCH_STORE__URL_FILE", str(secret))
    assert load(write(tmp_path, DEFAULT_CONFIG)).store.url.endswith(":s3cret@db/oobwatch")
    monkeypatch.setenv("OOBWATCH_STORE__URL_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="OOBWATCH_STORE__URL_FILE: cannot read"):
        load(write(tmp_path, DEFAULT_CONFIG))
    # Read as text, whatever it starts with.
    secret.write_text("[not json")
    monkeypatch.setenv("OOBWATCH_STORE__URL_FILE", str(secret))
    with pytest.raises(ConfigError, match=r"store\.url: not a SQLAlchemy database URL"):
        load(write(tmp_path, DEFAULT_CONFIG))
    monkeypatch.setenv("OOBWATCH_STORE__URL", "sqlite:///x.db")
    with pytest.raises(ConfigError, match="OOBWATCH_STORE__URL_FILE and OOBWATCH_STORE__URL"):
        load(write(tmp_path, DEFAULT_CONFIG))


def test_a_setting_whose_name_ends_in_file_is_set_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OOBWATCH_LEDGER__ANCHOR_FILE", str(tmp_path / "not-yet.jsonl"))
    assert load(write(tmp_path, DEFAULT_CONFIG)).ledger.anchor_file == tmp_path / "not-yet.jsonl"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[dns]\nzone = 'bad_zone!.test'\n",
            "dns.zone: 'bad_zone!.test' is not a valid DNS name",
        ),
        ("[dns]\nport = 'fifty'\n", "dns.port: Input should be a valid integer"),
        ("[dns]\nport = 70000\n", "dns.port: Input should be less than or equal to 65535"),
        ("[dns]\nanswer_ipv4 = ['300.1.1.1']\n", "dns.answer_ipv4.0:"),
        ("[dns]\nlisten = 'localhost'\n", "dns.listen: must be an IP address"),
        ("[dns]\nzoen = 'x.test'\n", "dns.zoen: unknown key"),
        ("[surprise]\nx = 1\n", "surprise: unknown key"),
        (
            "[bursts]\nthreshold = 0\n",
            "bursts.threshold: Input should be greater than or equal to 1",
        ),
        ("[bursts]\ninterval = 60\n", "bursts.interval: Input should be less than or equal to 10"),
        (
            "[alerts]\nurls = ['nosuch://x']\n",
            "alerts.urls.0: nosuch://... : apprise does not recognise",
        ),
        (
            "[[alerts.routes]]\nname = 'a'\nurls = ['nosuch://x']\n",
            "alerts.routes.0.urls.0: nosuch://... : apprise does not recognise",
        ),
        ("[alerts]\nurls = ['no url']\n", "alerts.urls.0: not a notification URL"),
        ("[store]\nurl = 'not a url'\n", "store.url: not a SQLAlchemy database URL"),
        ("[dns\nzone = 1\n", "not valid TOML"),
        (
            "[alerts]\ndedupe_window = 'ten minutes'\n",
            "alerts.dedupe_window: 'ten minutes' is not a duration",
        ),
        (
            "[[alerts.routes]]\nname = 'a'\nescalate_to = 'nobody'\n",
            "alerts: route 'a': escalate_to names no route: 'nobody'",
        ),
        (
            "[[alerts.routes]]\nname = 'a'\n[[alerts.routes]]\nname = 'a'\n",
            "route names must be unique",
        ),
        (
            "[[alerts.routes]]\nname = 'a'\nwebhooks = [{ url = 'https://x.test/h', secret = 'short' }]\n",
            "alerts.routes.0.webhooks.0.secret: String should have at least 16 characters",
        ),
        (
            "[[alerts.routes]]\nname = 'a'\nmatch = { severity = ['urgent'] }\n",
            "alerts.routes.0.match.severity.0:",
        ),
        ("[[ignore]]\nreason = 'x'\ncidr = '300.0.0.0/8'\n", "ignore.0.cidr:"),
        (
            "[[ignore]]\nreason = 'x'\nuser_agent = '(unclosed'\n",
            "ignore.0.user_agent: not a regular expression",
        ),
        ("[heartbeat]\nroute = 'ops'\n", "heartbeat.route names no route: 'ops'"),
    ],
)
def test_bad_config_names_the_key_and_exits_non_zero(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=None) as caught:
        load(path, check_sinks=True)
    assert expected in str(caught.value)
    # `serve` refuses every bad config; other commands all but alert URLs apprise cannot
    # send to (asking apprise costs each command ~0.3 s; only `serve` sends).
    commands = [["serve"]] + ([] if "apprise" in expected else [["list"]])
    for command in commands:
        result = CliRunner().invoke(main, ["--config", str(path), *command])
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("config error: ")
        assert expected in lines[0]


def test_bad_environment_value_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OOBWATCH_DNS__TTL", "-1")
    with pytest.raises(ConfigError, match=r"dns.ttl: Input should be greater than or equal to 0"):
        load(write(tmp_path, DEFAULT_CONFIG))


def test_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "nope.toml"), "list"])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def test_config_from_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, f"[store]\nurl = 'sqlite:///{tmp_path / 'x.db'}'\n")
    monkeypatch.setenv("OOBWATCH_CONFIG", str(path))
    result = CliRunner().invoke(main, ["list", "--json"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "[]"


def test_init_writes_and_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "new.toml"
    runner = CliRunner()
    assert runner.invoke(main, ["init", "--config", str(target)]).exit_code == 0
    assert target.read_text() == DEFAULT_CONFIG
    again = runner.invoke(main, ["init", "--config", str(target)])
    assert again.exit_code != 0
    assert "exists" in again.output


def test_migrate_brings_a_new_store_to_the_newest_schema(tmp_path: Path) -> None:
    config = write(tmp_path, DEFAULT_CONFIG)
    result = CliRunner().invoke(main, ["--config", str(config), "migrate"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"store at revision {HEAD_REVISION}\n"
    assert revision(open_engine(load(config).store.url)) == HEAD_REVISION


def test_routes_ignore_rules_and_durations_become_a_policy(tmp_path: Path) -> None:
    config = load(
        write(
            tmp_path,
            """
[alerts]
urls = ["json://127.0.0.1:9/default"]
dedupe_window = "90s"
[[alerts.routes]]
name = "oncall"
match = { severity = ["high"], sandbox = "prod-*", labels = { team = "evals" } }
pagerduty = { routing_key = "key", url = "http://127.0.0.1:9/pd" }
webhooks = [{ url = "http://127.0.0.1:9/wh", secret = "0123456789abcdef" }]
escalate_after = "15m"
escalate_to = "leads"
[[alerts.routes]]
name = "leads"
urls = ["form://127.0.0.1:9/leads"]
[[ignore]]
reason = "scanner"
cidr = "192.0.2.0/24"
expires = "2027-01-31"
[heartbeat]
route = "leads"
interval = "2m"
""",
        )
    )
    assert config.alerts.dedupe_window == 90_000_000
    assert config.heartbeat.interval == 120_000_000
    policy = config.policy()
    assert list(policy.routes) == ["default", "oncall", "leads"]
    oncall = policy.routes["oncall"]
    assert [sink.key for sink in oncall.sinks] == ["pagerduty", "webhook:0"]
    assert oncall.escalate_after_us == 15 * 60_000_000
    assert oncall.match is not None
    assert oncall.match.sandbox == ("prod-*",)
    [rule] = policy.ignore
    assert str(rule.cidr) == "192.0.2.0/24"
    assert rule.expires_us == 1801353600_000_000


def test_a_list_setting_from_a_file_is_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    urls = tmp_path / "alert-urls"
    urls.write_text('["json://127.0.0.1:9/x"]\n')
    monkeypatch.setenv("OOBWATCH_ALERTS__URLS_FILE", str(urls))
    assert load(write(tmp_path, DEFAULT_CONFIG)).alerts.urls == ["json://127.0.0.1:9/x"]


def test_a_sqlite_without_returning_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.34.1")
    with pytest.raises(ConfigError, match=r"store\.url: SQLite 3\.35 or newer .* has 3\.34\.1"):
        load(write(tmp_path, DEFAULT_CONFIG))
    postgres = "[store]\nurl = 'postgresql+psycopg://oobwatch@db/oobwatch'\n"
    assert load(write(tmp_path, postgres)).store.url.startswith("postgresql")
