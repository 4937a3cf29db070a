"""Typed configuration: a TOML file, overridden key by key by OOBWATCH_<SECTION>__<KEY>.

The file is `--config`, else `OOBWATCH_CONFIG`, else `./oobwatch.toml`; with
none of them there is no configuration, rather than a silent default that
binds and stores somewhere nobody expects. Relative paths in the file (the
SQLite database, the anchor file, TLS files) are relative to the file's
folder, so every command finds the same store from wherever it runs. Each
listener declares its own section (`listeners.*.Options`); this module
composes them. Validated once: a bad value is one line naming the key and
the problem, never a traceback.
"""

import contextlib
import json
import os
import re
import socket
import sqlite3
import tomllib
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    FilePath,
    HttpUrl,
    IPvAnyNetwork,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from alerts.policy import DEFAULT_ROUTE, IgnoreRule, Match, Policy, Route, Sink
from canaries.model import Protocol
from listeners import certificates
from listeners.base import Port
from listeners.burst import BurstOptions
from listeners.dns import DnsOptions
from listeners.guard import StreamOptions
from listeners.http import HttpOptions
from listeners.postgres import PostgresOptions
from listeners.smtp import SmtpOptions
from listeners.ssh import SshOptions
from listeners.tls import TlsOptions

ENV_PREFIX = "OOBWATCH_"
DEFAULT_FILE = Path("oobwatch.toml")
_WILDCARDS = {"0.0.0.0", "::"}  # noqa: S104 - compared with, never bound here
# Keys whose values are paths, resolved against the config file's folder.
_PATH_KEYS = (
    ("ledger", "anchor_file"),
    ("tls", "cert"),
    ("tls", "key"),
    ("tls", "acme_ca_bundle"),
    ("spool", "path"),
)


class ConfigError(ValueError):
    """The configuration cannot be used; the message is one line per problem."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# The oldest SQLite with UPDATE/INSERT ... RETURNING, which the ledger and the outbox use.
SQLITE_NEEDED = (3, 35)


class StoreConfig(Section):
    url: str = "sqlite:///oobwatch.db"

    @field_validator("url")
    @classmethod
    def _parseable(cls, url: str) -> str:
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError) as error:
            raise ValueError(f"not a SQLAlchemy database URL ({error})") from None
        if parsed.get_backend_name() == "sqlite" and sqlite3.sqlite_version_info < SQLITE_NEEDED:
            needed = ".".join(map(str, SQLITE_NEEDED))
            raise ValueError(
                f"SQLite {needed} or newer is needed (UPDATE ... RETURNING); this Python has"
                f" {sqlite3.sqlite_version}: use a newer Python build or PostgreSQL"
            )
        return url


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_US = {"ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}


def _duration_us(value: Any) -> int:
    """Microseconds for "250ms", "60s", "10m", "2h", "1d" or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
        if seconds < 0:
            raise ValueError("must not be negative")
        return int(seconds * 1_000_000)
    found = _DURATION.match(str(value).strip())
    if found is None:
        raise ValueError(f"{value!r} is not a duration such as 30s, 10m or 2h")
    return int(float(found.group(1)) * _UNIT_US[found.group(2)])


Duration = Annotated[int, BeforeValidator(_duration_us)]


_NOTIFY_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")


def _check_apprise(url: str) -> str:
    # Only the shape here: asking apprise loads all of its plugins (~0.3 s), which every
    # CLI call would pay. `serve` asks apprise itself (`sink_problems`) before it starts.
    if not _NOTIFY_URL.match(url):
        raise ValueError("not a notification URL such as json://host/path or slack://...")
    return url


AppriseUrl = Annotated[str, AfterValidator(_check_apprise)]


class MatchConfig(Section):
    severity: list[Literal["low", "medium", "high", "critical"]] | None = None
    sandbox: str | list[str] | None = None
    kind: list[Literal["dns", "email", "url", "credential"]] | None = None
    labels: dict[str, str] = {}


class PagerDutyConfig(Section):
    routing_key: str = Field(min_length=1)
    url: HttpUrl = HttpUrl("https://events.pagerduty.com/v2/enqueue")


class WebhookConfig(Section):
    url: HttpUrl
    secret: str = Field(min_length=16)


class RouteConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$")
    match: MatchConfig = MatchConfig()
    urls: list[AppriseUrl] = []
    pagerduty: PagerDutyConfig | None = None
    webhooks: list[WebhookConfig] = []
    escalate_after: Duration | None = None
    escalate_to: str | None = None


class AlertsConfig(Section):
    urls: list[AppriseUrl] = []
    dedupe_window: Duration = _duration_us("10m")
    digest_every: Duration = _duration_us("5m")
    retry_base: Duration = _duration_us("5s")
    retry_max: Duration = _duration_us("10m")
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 12
    routes: list[RouteConfig] = []

    @model_validator(mode="after")
    def _route_names(self) -> "AlertsConfig":
        names = [route.name for route in self.routes]
        if len(set(names)) != len(names) or DEFAULT_ROUTE in names:
            raise ValueError(f"route names must be unique and not {DEFAULT_ROUTE!r}")
        for route in self.routes:
            if route.escalate_to is not None and route.escalate_to not in {*names, DEFAULT_ROUTE}:
                raise ValueError(
                    f"route {route.name!r}: escalate_to names no route: {route.escalate_to!r}"
                )
            if route.escalate_to == route.name:
                raise ValueError(
                    f"route {route.name!r}: escalate_to names the route itself; "
                    "name another route, or leave it out to escalate to the default route"
                )
        return self


class IgnoreConfig(Section):
    reason: str = Field(min_length=1)
    cidr: IPvAnyNetwork | None = None
    protocol: Protocol | None = None
    user_agent: str | None = None
    expires: datetime | date | None = None

    @field_validator("user_agent")
    @classmethod
    def _regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"not a regular expression: {error}") from None
        return pattern


class HeartbeatConfig(Section):
    enabled: bool = True
    interval: Duration = _duration_us("60s")
    deadline: Duration = _duration_us("10s")
    route: str | None = None


class LedgerConfig(Section):
    anchor_file: Path | None = None
    anchor_route: str | None = None
    anchor_every: Duration = _duration_us("1h")
    verify_every: Duration = _duration_us("1h")

    @property
    def anchored(self) -> bool:
        """Whether heads are saved anywhere outside the database."""
        return self.anchor_file is not None or self.anchor_route is not None


class ApiConfig(StreamOptions):
    """`[api]`: the admin API; never on a listener's port."""

    port: Port = 8787
    max_connections: Annotated[int, Field(ge=1, le=65536)] = 128
    max_connections_per_source: Annotated[int, Field(ge=1, le=65536)] = 16
    # Bodies are small JSON documents; nothing is read of one before its token is checked.
    max_body_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    # Where people reach this API and its console (behind a proxy, say): pages link there.
    public_url: HttpUrl | None = None
    # How long a console sign-in lasts, and a `token login-link` stays usable.
    session_lifetime: Duration = _duration_us("8h")
    login_link_lifetime: Duration = _duration_us("15m")

    @property
    def base_url(self) -> str:
        """The console's address as people reach it, without a trailing slash."""
        if self.public_url is not None:
            return str(self.public_url).rstrip("/")
        host = str(self.listen)
        if host in ("0.0.0.0", "::"):  # noqa: S104 - read, not bound: all addresses
            host = "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"


class TlsConfig(Section):
    """`[tls]`: the certificate TLS listeners serve: files, or ordered from an ACME server;
    without either, a self-signed one for the zone."""

    cert: FilePath | None = None
    key: FilePath | None = None
    acme_directory: HttpUrl | None = None
    acme_email: str = ""
    acme_ca_bundle: FilePath | None = None

    @model_validator(mode="after")
    def _key_with_cert(self) -> "TlsConfig":
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together: set both or neither")
        if self.cert is not None and self.acme_directory is not None:
            raise ValueError("set cert and key, or acme_directory, not both")
        if self.acme_directory is not None and self.acme_directory.scheme != "https":
            raise ValueError("acme_directory must be an https:// URL")
        if self.cert is not None and self.key is not None:
            certificates.from_files(self.cert, self.key)
        return self


class LogConfig(Section):
    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


class SpoolConfig(Section):
    """`[spool]`: where a node journals the hits its store cannot take while it is away."""

    # Default: beside the SQLite database; with PostgreSQL, in $STATE_DIRECTORY (systemd)
    # or the config file's folder.
    path: Path | None = None
    max_bytes: Annotated[int, Field(ge=1024 * 1024, le=1024**4)] = 256 * 1024 * 1024


class TimelineConfig(Section):
    incident_gap: Duration = _duration_us("30m")


class NodeConfig(Section):
    name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=64)
    # Started as root: the user to become once every port is bound.
    user: str | None = Field(default=None, min_length=1, max_length=32)


class Config(Section):
    """The whole configuration of one oobwatch node."""

    node: NodeConfig = NodeConfig()
    store: StoreConfig = StoreConfig()
    dns: DnsOptions = DnsOptions()
    smtp: SmtpOptions = SmtpOptions()
    http: HttpOptions = HttpOptions()
    https: TlsOptions = TlsOptions()
    postgres: PostgresOptions = PostgresOptions()
    ssh: SshOptions = SshOptions()
    tls: TlsConfig = TlsConfig()
    bursts: BurstOptions = BurstOptions()
    alerts: AlertsConfig = AlertsConfig()
    ignore: list[IgnoreConfig] = []
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    ledger: LedgerConfig = LedgerConfig()
    timeline: TimelineConfig = TimelineConfig()
    spool: SpoolConfig = SpoolConfig()
    api: ApiConfig = ApiConfig()
    log: LogConfig = LogConfig()
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        """The file this configuration was read from."""
        return self._source

    @property
    def spool_path(self) -> Path:
        """Where this node's spool is."""
        if self.spool.path is not None:
            return self.spool.path
        # Named for the node: two nodes sharing a folder (or a SQLite file) never share one.
        node = re.sub(r"[^A-Za-z0-9._-]", "_", self.node.name)
        url = make_url(self.store.url)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            return Path(f"{url.database}.{node}.spool")
        folder = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        name = f"oobwatch-{node}.spool"
        if folder:
            return Path(folder) / name
        return (self._source.parent if self._source else Path.cwd()) / name

    def tcp_ports(self) -> list[tuple[str, str, int]]:
        """Every TCP port the node listens on, as (key, address, port); DNS takes its port
        on TCP as well as UDP."""
        wanted = [
            (f"{name}.port", options.listen, options.port)
            for name in ("dns", "smtp", "http", "https", "postgres", "ssh", "api")
            if (options := getattr(self, name)).enabled
        ]
        if self.smtp.enabled and self.smtp.tls_port is not None:
            wanted.append(("smtp.tls_port", self.smtp.listen, self.smtp.tls_port))
        return wanted

    @model_validator(mode="after")
    def _distinct_ports(self) -> "Config":
        bound: list[tuple[str, str, int]] = []
        for key, listen_at, at in self.tcp_ports():
            if at == 0:
                continue
            for other, listen, port in bound:
                overlap = listen == listen_at or bool({listen, listen_at} & _WILDCARDS)
                if port == at and overlap:
                    raise ValueError(f"{key} {at} on {listen_at} is also {other}")
            bound.append((key, listen_at, at))
        return self

    @model_validator(mode="after")
    def _named_routes(self) -> "Config":
        routes = {r.name for r in self.alerts.routes} | {DEFAULT_ROUTE}
        named = (
            ("heartbeat.route", self.heartbeat.route),
            ("ledger.anchor_route", self.ledger.anchor_route),
        )
        for key, route in named:
            if route is not None and route not in routes:
                raise ValueError(f"{key} names no route: {route!r}")
        return self

    def policy(self) -> Policy:
        """Routes (with the default route from `alerts.urls`) and ignore rules."""
        routes = {DEFAULT_ROUTE: Route(DEFAULT_ROUTE, _sinks(self.alerts.urls, None, []))}
        for route in self.alerts.routes:
            sandbox = route.match.sandbox
            match = Match(
                severity=tuple(route.match.severity or ()),
                sandbox=tuple([sandbox] if isinstance(sandbox, str) else sandbox or ()),
                kind=tuple(route.match.kind or ()),
                labels=dict(route.match.labels),
            )
            routes[route.name] = Route(
                route.name,
                _sinks(route.urls, route.pagerduty, route.webhooks),
                match,
                route.escalate_after,
                route.escalate_to,
            )
        ignore = [
            IgnoreRule(
                reason=rule.reason,
                cidr=rule.cidr,
                protocol=rule.protocol,
                user_agent=None if rule.user_agent is None else re.compile(rule.user_agent),
                expires_us=_expiry_us(rule.expires),
            )
            for rule in self.ignore
        ]
        return Policy(routes, ignore)


def _sinks(
    urls: list[str], pagerduty: PagerDutyConfig | None, webhooks: list[WebhookConfig]
) -> tuple[Sink, ...]:
    found = [Sink(f"apprise:{n}", "apprise", url) for n, url in enumerate(urls)]
    if pagerduty is not None:
        found.append(Sink("pagerduty", "pagerduty", str(pagerduty.url), pagerduty.routing_key))
    found += [
        Sink(f"webhook:{n}", "webhook", str(hook.url), hook.secret)
        for n, hook in enumerate(webhooks)
    ]
    return tuple(found)


def _expiry_us(expires: datetime | date | None) -> int | None:
    if expires is None:
        return None
    if not isinstance(expires, datetime):
        expires = datetime.combine(expires, datetime.min.time())
    if expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    return int(expires.timestamp() * 1_000_000)


def sink_problems(config: Config) -> list[str]:
    """Alert URLs apprise cannot send to, each as `key: problem`."""
    from alerts.sinks import check_url

    keyed = [(f"alerts.urls.{n}", url) for n, url in enumerate(config.alerts.urls)]
    for r, route in enumerate(config.alerts.routes):
        keyed += [(f"alerts.routes.{r}.urls.{n}", url) for n, url in enumerate(route.urls)]
    problems = []
    for key, url in keyed:
        problem = check_url(url)
        if problem is not None:
            problems.append(f"{key}: {url.split('://', 1)[0]}://... : {problem}")
    return problems


def find(explicit: Path | None) -> Path:
    """The config file: `explicit` (from --config or OOBWATCH_CONFIG), else ./oobwatch.toml."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"config file {explicit} does not exist")
        return explicit
    if DEFAULT_FILE.is_file():
        return DEFAULT_FILE
    raise ConfigError(
        f"no config file: none given with --config or OOBWATCH_CONFIG, and no {DEFAULT_FILE} "
        f"in {Path.cwd()}; `oobwatch init` writes one"
    )


def load(path: Path, check_sinks: bool = False) -> Config:
    """Read `path`, apply environment overrides, validate; raise ConfigError.

    With `check_sinks`, also ask apprise whether it can send to every alert URL.
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    except OSError as error:
        raise ConfigError(f"config file {path}: {error.strerror}") from None
    folder = path.resolve().parent
    _resolve_paths(raw, folder)
    _overlay(raw, _environment(os.environ))
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError("\n".join(_describe(problem) for problem in error.errors())) from None
    config._source = path.resolve()
    problems = sink_problems(config) if check_sinks else []
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def _resolve_paths(raw: dict[str, Any], folder: Path) -> None:
    for section, key in _PATH_KEYS:
        values = raw.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str):
            # `~user` with no such user stays as written: the validator names the key.
            with contextlib.suppress(RuntimeError):
                values[key] = str(folder / Path(values[key]).expanduser())
    store = raw.get("store")
    if isinstance(store, dict) and isinstance(store.get("url"), str):
        try:
            url = make_url(store["url"])
        except (ArgumentError, ValueError):
            return  # the validator names the key
        database = url.database
        if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
            return
        if not Path(database).is_absolute():
            relative = url.set(database=str(folder / database))
            store["url"] = relative.render_as_string(hide_password=False)


def _environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """`OOBWATCH_<SECTION>__<KEY>=value` as nested keys; JSON for lists and tables.

    `OOBWATCH_<SECTION>__<KEY>_FILE=path` reads the value from a file (a
    container's secret), its final newline dropped.
    """
    found: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = name.removeprefix(ENV_PREFIX).lower().split("__")
        from_file = name.endswith("_FILE") and _field(path) is None
        if from_file:
            path[-1] = path[-1].removesuffix("_file")
            if name.removesuffix("_FILE") in environ:
                raise ConfigError(f"{name} and {name.removesuffix('_FILE')} are both set")
            try:
                value = Path(value).read_text(encoding="utf-8").removesuffix("\n")
            except (OSError, UnicodeDecodeError) as error:
                raise ConfigError(f"{name}: cannot read {value}: {error}") from None
        parsed: Any = value
        # A secret for a text setting is text, whatever it starts with.
        text_setting = from_file and _field(path) is str
        if not text_setting and value.lstrip()[:1] in ("[", "{"):
            # Not JSON: left as text, and the validator names the key.
            with contextlib.suppress(ValueError, RecursionError):
                parsed = json.loads(value)
        target = found
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                break
        else:
            target[path[-1]] = parsed
    return found


def _field(path: list[str]) -> Any:
    """The type of the setting `path` names, or None when it names none (so that a `_FILE`
    ending of a setting's own name, `ledger.anchor_file`, is not taken for a file to read)."""
    model: Any = Config
    for part in path:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return None
        model = fields[part].annotation
    return model


def _overlay(base: dict[str, Any], over: Mapping[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _overlay(base[key], value)
        else:
            base[key] = value


def _describe(problem: Any) -> str:
    key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
    message = str(problem["msg"]).removeprefix("Value error, ")
    if problem["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{key}: {message}"


DEFAULT_CONFIG = """\
# oobwatch configuration. Every key can be overridden by an environment
# variable OOBWATCH_<SECTION>__<KEY>, e.g. OOBWATCH_DNS__PORT=53.

[node]
# name = "oob-1"                      # recorded with every event; default: the host name
# user = "oobwatch"                   # started as root: become this user once ports are bound

[store]
# SQLAlchemy URL. SQLite for one node; PostgreSQL (postgresql+psycopg://...) for several.
# A relative SQLite path is relative to this file's folder.
url = "sqlite:///oobwatch.db"

[dns]
# The zone delegated to this server (NS records at your registrar point here).
zone = "canary.example.test"
listen = "127.0.0.1"                  # 0.0.0.0 or :: in production
port = 5353                           # UDP and TCP; 53 in production
answer_ipv4 = ["127.0.0.1"]           # A answers for every name in the zone: this node's address
answer_ipv6 = []                      # AAAA answers
ttl = 0                               # keep 0 so every lookup reaches this server, not a cache
# nameservers = ["ns1.canary.example.test"]   # NS/SOA names; default ns1.<zone>
# Every listener that takes connections (dns over TCP, smtp, http, api) has the same bounds:
# max_connections = 256               # in all (smtp 64, http 512, api 128)
# max_connections_per_source = 32     # per IPv4 address or IPv6 /64 (smtp 10, api 16)
# max_connections_per_network = 128   # per IPv4 /24 or IPv6 /48; default 4 x per source
# timeout = 10.0                      # seconds for a frame, head or body to arrive, a reply to be read
# eviction_grace = 1.0                # a connection silent this long may be closed for a newcomer (smtp 10)

[smtp]
# Mail for <token>@<zone> and anything@<token>.<zone> is a hit; everything else gets 550.
listen = "127.0.0.1"                  # 0.0.0.0 or :: in production
port = 2525                           # 25 in production (point the zone's MX here)
domains = []                          # default: the DNS zone and every name under it
max_message_bytes = 10485760          # advertised as SIZE; larger messages get 552
max_buffered_bytes = 134217728        # messages being received hold at most this (2 x each)
max_connections = 64
max_connections_per_source = 10
timeout = 30.0                        # seconds of silence before a session is dropped
# tls_port = 4650                     # implicit TLS, 465 in production; STARTTLS is always offered

[http]
# Any request carrying a token (Host, path, query, headers, cookies, body) is a hit.
listen = "127.0.0.1"
port = 8080                           # 80 in production
response = "empty"                    # what everyone gets back: "empty" 200, "404", or "pixel"
max_body_bytes = 1048576

[https]
# A TLS ClientHello whose SNI names a canary is a hit, before any certificate is seen.
enabled = false
listen = "127.0.0.1"
port = 8443                           # 443 in production

[postgres]
# A planted .pgpass or database URL, used: the StartupMessage (user, database, TLS server name)
# and the password are checked for tokens; every login fails with 28P01.
enabled = false
listen = "127.0.0.1"
port = 15432                          # 5432 in production
auth = "cleartext"                    # or "scram-sha-256" for clients that require it

[ssh]
# A planted SSH key (ssh-key canaries) or password, tried: the offered key's fingerprint, the
# username and passwords are checked; every attempt is refused.
enabled = false
listen = "127.0.0.1"
port = 2222                           # 22 in production

[tls]
# The certificate [https], SMTP's and PostgreSQL's TLS serve; without one, a self-signed one for the zone,
# kept in the store. Files are read again when they change.
# cert = "/etc/oobwatch/tls.pem"      # PEM, chain allowed
# key = "/etc/oobwatch/tls.key"
# Or ordered for <zone> and *.<zone>, proved by this node's own DNS (DNS-01), renewed 30 days
# before expiry; with several nodes on one store, one orders and all serve it.
# acme_directory = "https://acme-v02.api.letsencrypt.org/directory"
# acme_email = "security@example.com"
# acme_ca_bundle = ""                # PEM to trust a private ACME server's own HTTPS

[bursts]
# A leaked token makes every query a hit. Past the threshold, a canary's hits fold into one
# aggregate row an interval (count, sources, the data they carried): nothing is dropped, the
# ledger grows by a bounded number of rows a second, and other canaries' hits are not delayed.
threshold = 100                       # hits recorded one by one per canary per window
window = 60.0                         # seconds
interval = 0.1                        # seconds between aggregate rows; folded hits wait for theirs
keep_bytes = 65536                    # carried data kept per canary per window; the rest is hashed
max_waiting = 4096                    # answers held for rows not yet committed; past it, counted only

[alerts]
# The default route: apprise URLs (https://github.com/caronc/apprise/wiki) paged
# for every hit that matches no route below.
urls = []
# urls = ["json://127.0.0.1:8099/hook", "slack://token_a/token_b/token_c"]
dedupe_window = "10m"                 # further hits of a canary fold into its open alert
digest_every = "5m"                   # a follow-up summarising folded hits, while open
retry_base = "5s"                     # failed deliveries retry with exponential backoff + jitter:
retry_max = "10m"                     # waits of at most 5s, 10s, 20s ... doubling up to retry_max,
max_attempts = 12                     # each 50-100% of that; then escalated or dead-lettered.
# Time budget: a delivery is tried max_attempts times over the sum of the waits between its
# attempts. The defaults above give 11 waits (5+10+20+40+80+160+320+600+600+600+600 s), so a
# page is retried for at most 3035 s ~ 51 min (25-51 min with the jitter) before it is given up.
# Given up, it is escalated once to another route (the route's escalate_to, else the default
# route); with no other route, or when that copy fails too, it is dead-lettered: shown by
# `oobwatch alerts list` and `oobwatch_outbox_dead`, and noticed to heartbeat.route.

# Every route whose match fits a hit fires; empty conditions match anything.
# [[alerts.routes]]
# name = "oncall"
# match = { severity = ["high", "critical"], sandbox = "prod-*", kind = ["credential", "email"], labels = { team = "evals" } }
# urls = ["slack://...", "mailto://..."]
# pagerduty = { routing_key = "..." }          # Events API v2; url = "..." to override
# webhooks = [{ url = "https://siem.example/hook", secret = "at least 16 characters" }]
# escalate_after = "15m"                       # unacknowledged -> escalate_to
# escalate_to = "security-leads"

# Hits matching every condition of a rule are recorded but do not page.
# [[ignore]]
# cidr = "192.0.2.0/24"
# protocol = "http"
# user_agent = "(?i)safelinks"
# reason = "mail link scanner"
# expires = "2027-01-31"

[ledger]
# Copies of the chain head outside the database, so a rewritten chain is caught
# (one is written at start, then every anchor_every, and by `oobwatch ledger anchor`):
# anchor_file = "anchors.jsonl"       # append-only JSON lines; relative to this file
# anchor_route = "audit"              # a route (apprise URLs, webhooks) that receives the head
anchor_every = "1h"
verify_every = "1h"                   # a broken chain pages heartbeat.route

[spool]
# Hits the store cannot take (PostgreSQL away, SQLite locked by another process) are
# journalled here, fsync'd before they are answered, and replayed once it is back.
# path = "oobwatch.spool"             # default: <database>.<node>.spool, else in $STATE_DIRECTORY
max_bytes = 268435456                 # full: hits go unanswered, and heartbeat.route is paged

[api]
# The admin API and the web console at /ui/ (tokens from `oobwatch token create`);
# never on a listener's port.
enabled = true
listen = "127.0.0.1"
port = 8787
# public_url = "https://oob.example.com"  # where people reach it: pages link incidents there
session_lifetime = "8h"               # a console sign-in

[log]
format = "console"                    # or "json": one JSON object per line (ECS field names)
level = "info"

[timeline]
incident_gap = "30m"                  # a sandbox quiet this long ends an incident

[heartbeat]
# Every interval each listener is probed over the network with a built-in canary;
# a listener whose hit is not recorded within the deadline pages heartbeat.route.
enabled = true
interval = "60s"
deadline = "10s"
# route = "ops"                       # default: the default route
"""
