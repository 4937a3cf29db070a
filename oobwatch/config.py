"""Typed configuration: a TOML file, overridden key by key by OOBWATCH_<SECTION>__<KEY>.

Validated once at startup. A bad value is reported as one line naming the
key and the problem, never as a traceback.
"""

import re
import socket
import tomllib
from datetime import UTC, date, datetime
from ipaddress import IPv4Address, IPv6Address, ip_address
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
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from alerts.policy import DEFAULT_ROUTE, IgnoreRule, Match, Policy, Route, Sink
from alerts.sinks import check_url
from canaries.tokens import TOKEN_LENGTH

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
Port = Annotated[int, Field(ge=0, le=65535)]


class ConfigError(ValueError):
    """The configuration cannot be used; the message is one line per problem."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(Section):
    url: str = "sqlite:///./oobwatch.db"

    @field_validator("url")
    @classmethod
    def _parseable(cls, url: str) -> str:
        try:
            make_url(url)
        except ArgumentError as error:
            raise ValueError(f"not a SQLAlchemy database URL ({error})") from None
        return url


def _check_listen(address: str) -> str:
    try:
        ip_address(address)
    except ValueError:
        raise ValueError("must be an IP address to bind, such as 127.0.0.1 or ::") from None
    return address


ListenAddress = Annotated[str, AfterValidator(_check_listen)]


class DnsConfig(Section):
    enabled: bool = True
    zone: str = "canary.example.test"
    listen: ListenAddress = "127.0.0.1"
    port: Port = 5353
    # Few records per answer keep every answer small: no amplification.
    answer_ipv4: Annotated[list[IPv4Address], Field(max_length=4)] = [IPv4Address("127.0.0.1")]
    answer_ipv6: Annotated[list[IPv6Address], Field(max_length=4)] = []
    ttl: Annotated[int, Field(ge=0, le=86400)] = 0
    nameservers: Annotated[list[str], Field(max_length=2)] = []

    @field_validator("zone")
    @classmethod
    def _zone(cls, zone: str) -> str:
        name = _check_zone(zone)
        # Room for "<token>." plus a few labels of exfiltrated data on the left.
        if len(name) + TOKEN_LENGTH + 1 > 200:
            raise ValueError(f"{zone!r} is too long to leave room for tokens under it")
        return name

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, names: list[str]) -> list[str]:
        return [_check_zone(name) for name in names]


def _check_zone(zone: str) -> str:
    name = zone.rstrip(".").lower()
    labels = name.split(".")
    if not name or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{zone!r} is not a valid DNS name")
    return name


class SmtpConfig(Section):
    enabled: bool = True
    listen: ListenAddress = "127.0.0.1"
    port: Port = 2525
    domains: list[str] = []
    max_message_bytes: Annotated[int, Field(ge=1024, le=100 * 1024 * 1024)] = 10 * 1024 * 1024
    max_connections_per_source: Annotated[int, Field(ge=1, le=10_000)] = 10
    timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0
    tls_cert: FilePath | None = None
    tls_key: FilePath | None = None

    @field_validator("domains")
    @classmethod
    def _domains(cls, domains: list[str]) -> list[str]:
        return [_check_zone(domain) for domain in domains]

    @model_validator(mode="after")
    def _key_with_cert(self) -> "SmtpConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        return self


class HttpConfig(Section):
    enabled: bool = True
    listen: ListenAddress = "127.0.0.1"
    port: Port = 8080
    response: Literal["empty", "404", "pixel"] = "empty"
    max_body_bytes: Annotated[int, Field(ge=1024, le=100 * 1024 * 1024)] = 1024 * 1024


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


def _check_apprise(url: str) -> str:
    problem = check_url(url)
    if problem is not None:
        raise ValueError(f"{url.split('://', 1)[0]}://... : {problem}")
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
        return self


class IgnoreConfig(Section):
    reason: str = Field(min_length=1)
    cidr: IPvAnyNetwork | None = None
    protocol: Literal["dns", "smtp", "http"] | None = None
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


class ApiConfig(Section):
    enabled: bool = True
    listen: ListenAddress = "127.0.0.1"
    port: Port = 8787


class TimelineConfig(Section):
    incident_gap: Duration = _duration_us("30m")


class NodeConfig(Section):
    name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=64)


class Config(BaseSettings):
    """The whole configuration of one oobwatch node."""

    model_config = SettingsConfigDict(
        env_prefix="OOBWATCH_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    node: NodeConfig = NodeConfig()
    store: StoreConfig = StoreConfig()
    dns: DnsConfig = DnsConfig()
    smtp: SmtpConfig = SmtpConfig()
    http: HttpConfig = HttpConfig()
    alerts: AlertsConfig = AlertsConfig()
    ignore: list[IgnoreConfig] = []
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    ledger: LedgerConfig = LedgerConfig()
    timeline: TimelineConfig = TimelineConfig()
    api: ApiConfig = ApiConfig()

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


def load(path: Path | None) -> Config:
    """Read `path` (if any), apply environment overrides, validate; raise ConfigError."""
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None

    class FromFile(Config):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            if path is None:
                return (init_settings, env_settings)
            return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, path))

    try:
        return FromFile()
    except ValidationError as error:
        raise ConfigError("\n".join(_describe(problem) for problem in error.errors())) from None


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

[store]
# SQLAlchemy URL. SQLite for one node; PostgreSQL (postgresql+psycopg://...) for several.
url = "sqlite:///./oobwatch.db"

[dns]
# The zone delegated to this server (NS records at your registrar point here).
zone = "canary.example.test"
listen = "127.0.0.1"                  # 0.0.0.0 or :: in production
port = 5353                           # UDP and TCP; 53 in production
answer_ipv4 = ["127.0.0.1"]           # A answers for every name in the zone: this node's address
answer_ipv6 = []                      # AAAA answers
ttl = 0                               # keep 0 so every lookup reaches this server, not a cache
# nameservers = ["ns1.canary.example.test"]   # NS/SOA names; default ns1.<zone>

[smtp]
# Mail for <token>@<zone> and anything@<token>.<zone> is a hit; everything else gets 550.
listen = "127.0.0.1"                  # 0.0.0.0 or :: in production
port = 2525                           # 25 in production (point the zone's MX here)
domains = []                          # default: the DNS zone and every name under it
max_message_bytes = 10485760
max_connections_per_source = 10
timeout = 30.0                        # seconds of silence before a session is dropped
# tls_cert = "/etc/oobwatch/mail.pem"  # STARTTLS when both are set
# tls_key = "/etc/oobwatch/mail.key"

[http]
# Any request carrying a token (Host, path, query, headers, cookies, body) is a hit.
listen = "127.0.0.1"
port = 8080                           # 80 in production
response = "empty"                    # what everyone gets back: "empty" 200, "404", or "pixel"
max_body_bytes = 1048576

[alerts]
# The default route: apprise URLs (https://github.com/caronc/apprise/wiki) paged
# for every hit that matches no route below.
urls = []
# urls = ["json://127.0.0.1:8099/hook", "slack://token_a/token_b/token_c"]
dedupe_window = "10m"                 # further hits of a canary fold into its open alert
digest_every = "5m"                   # a follow-up summarising folded hits, while open
retry_base = "5s"                     # failed deliveries retry with exponential backoff + jitter
retry_max = "10m"
max_attempts = 12                     # then the delivery is recorded failed and escalated

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
# Copies of the chain head outside the database, so a rewritten chain is caught:
# anchor_file = "/var/lib/oobwatch/anchors.jsonl"   # append-only JSON lines
# anchor_route = "audit"              # a route (apprise URLs, webhooks) that receives the head
anchor_every = "1h"
verify_every = "1h"                   # a broken chain pages heartbeat.route

[api]
# The admin API (tokens from `oobwatch token create`); never on a listener's port.
enabled = true
listen = "127.0.0.1"
port = 8787

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
