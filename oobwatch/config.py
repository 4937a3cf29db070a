"""Typed configuration: a TOML file, overridden key by key by OOBWATCH_<SECTION>__<KEY>.

Validated once at startup. A bad value is reported as one line naming the
key and the problem, never as a traceback.
"""

import re
import socket
import tomllib
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
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

from alerts.pager import check_url
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


class DnsConfig(Section):
    enabled: bool = True
    zone: str = "canary.example.test"
    listen: str = "127.0.0.1"
    port: Port = 5353
    answer_ipv4: Annotated[list[IPv4Address], Field(max_length=8)] = [IPv4Address("127.0.0.1")]
    answer_ipv6: Annotated[list[IPv6Address], Field(max_length=8)] = []
    ttl: Annotated[int, Field(ge=0, le=86400)] = 0
    nameservers: list[str] = []

    @field_validator("zone")
    @classmethod
    def _zone(cls, zone: str) -> str:
        name = _check_zone(zone)
        # Room for "<token>." plus a few labels of exfiltrated data on the left.
        if len(name) + TOKEN_LENGTH + 1 > 200:
            raise ValueError(f"{zone!r} is too long to leave room for tokens under it")
        return name

    @field_validator("listen")
    @classmethod
    def _listen(cls, listen: str) -> str:
        return _check_listen(listen)


def _check_zone(zone: str) -> str:
    name = zone.rstrip(".").lower()
    labels = name.split(".")
    if not name or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{zone!r} is not a valid DNS name")
    return name


class SmtpConfig(Section):
    enabled: bool = True
    listen: str = "127.0.0.1"
    port: Port = 2525
    domains: list[str] = []
    max_message_bytes: Annotated[int, Field(ge=1024, le=100 * 1024 * 1024)] = 10 * 1024 * 1024
    max_connections_per_source: Annotated[int, Field(ge=1, le=10_000)] = 10
    timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0
    tls_cert: FilePath | None = None
    tls_key: FilePath | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, listen: str) -> str:
        return _check_listen(listen)

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
    listen: str = "127.0.0.1"
    port: Port = 8080
    response: Literal["empty", "404", "pixel"] = "empty"
    max_body_bytes: Annotated[int, Field(ge=1024, le=100 * 1024 * 1024)] = 1024 * 1024

    @field_validator("listen")
    @classmethod
    def _listen(cls, listen: str) -> str:
        return _check_listen(listen)


class AlertsConfig(Section):
    urls: list[str] = []

    @field_validator("urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            problem = check_url(url)
            if problem is not None:
                scheme = url.split("://", 1)[0]
                raise ValueError(f"{scheme}://... : {problem}")
        return urls


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
# apprise URLs (https://github.com/caronc/apprise/wiki); every hit pages each of them.
urls = []
# urls = ["json://127.0.0.1:8099/hook", "slack://token_a/token_b/token_c"]
"""
