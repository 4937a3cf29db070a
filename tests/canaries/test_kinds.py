"""Each credential format parses with the real format's parser and carries the token where used."""

import base64
import configparser
import hashlib
import io
import json
import netrc
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import psycopg.conninfo
import pytest
import yaml
from dotenv import dotenv_values
from hypothesis import given, settings
from hypothesis import strategies as st

from canaries import kinds
from canaries.find import in_host, scan, split_name
from canaries.tokens import RANDOM_BYTES, TokenKey, new_token

ZONE = "canary.example.test"
TOKEN = new_token(TokenKey(secrets.token_bytes(32)))


def render(fmt: str, port: int = 8080, web: kinds.Web | None = None) -> kinds.Planting:
    planting = kinds.credential(fmt, TOKEN, ZONE, web or kinds.Web(http_port=port))
    assert planting.format == fmt
    assert planting.value == planting.files[planting.path_hint]
    return planting


def host_token(host: str) -> str | None:
    return in_host(host, split_name(ZONE))


def test_netrc(tmp_path: Path) -> None:
    path = tmp_path / ".netrc"
    path.write_text(render("netrc").value)
    path.chmod(0o600)
    [(host, (login, _, password))] = netrc.netrc(str(path)).hosts.items()
    assert host_token(host) == TOKEN
    assert login == "deploy-bot"
    assert scan(password) == {TOKEN}


def test_git_credentials() -> None:
    url = urlsplit(render("git-credentials").value.strip())
    assert url.scheme == "https"
    assert host_token(url.hostname or "") == TOKEN
    assert scan(url.password or "") == {TOKEN}


def test_pgpass_and_postgres_url() -> None:
    host, port, database, user, password = render("pgpass").value.strip().split(":")
    assert (port, database, user) == ("5432", "app_production", "app_rw")
    assert host_token(host) == TOKEN
    assert scan(password) == {TOKEN}
    line = render("postgres-url").value.strip()
    name, _, url = line.partition("=")
    assert name == "DATABASE_URL"
    parsed = psycopg.conninfo.conninfo_to_dict(url)
    assert host_token(str(parsed["host"])) == TOKEN
    assert scan(str(parsed["password"])) == {TOKEN}


def test_env() -> None:
    pairs = dict(
        line.split("=", 1)
        for line in render("env", 80).value.splitlines()
        if line and not line.startswith("#")
    )
    assert scan(pairs["OPENAI_API_KEY"]) == {TOKEN}
    base = urlsplit(pairs["OPENAI_BASE_URL"])
    assert base.port is None
    assert host_token(base.netloc) == TOKEN


def test_aws() -> None:
    planting = render("aws", 18080)
    credentials = configparser.ConfigParser()
    credentials.read_string(planting.files[".aws/credentials"])
    assert credentials["default"]["aws_access_key_id"].startswith("AKIA")
    assert len(credentials["default"]["aws_access_key_id"]) == 20
    assert len(credentials["default"]["aws_secret_access_key"]) == 40
    assert scan(credentials["default"]["aws_secret_access_key"]) == {TOKEN}
    config = configparser.ConfigParser()
    config.read_string(planting.files[".aws/config"])
    endpoint = urlsplit(config["default"]["endpoint_url"])
    assert endpoint.port == 18080
    assert host_token(endpoint.netloc) == TOKEN


def test_kubeconfig() -> None:
    config = yaml.safe_load(render("kubeconfig").value)
    assert config["kind"] == "Config"
    server = urlsplit(config["clusters"][0]["cluster"]["server"])
    assert host_token(server.netloc) == TOKEN
    assert config["users"][0]["user"]["token"] == TOKEN
    assert config["current-context"] == config["contexts"][0]["name"]


def test_ssh_config() -> None:
    lines = dict(line.strip().split(" ", 1) for line in render("ssh-config").value.splitlines())
    assert lines["Host"] == "bastion-prod"
    assert host_token(lines["HostName"]) == TOKEN


def test_docker_config() -> None:
    [(registry, entry)] = json.loads(render("docker-config").value)["auths"].items()
    assert host_token(registry) == TOKEN
    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
    assert user == "ci-bot"
    assert password == TOKEN


def test_mcp() -> None:
    [server] = json.loads(render("mcp").value)["mcpServers"].values()
    assert host_token(urlsplit(server["url"]).netloc) == TOKEN
    assert scan(server["headers"]["Authorization"]) == {TOKEN}


def test_openai() -> None:
    pairs = dotenv_values(stream=io.StringIO(render("openai").value))
    key = pairs["OPENAI_API_KEY"] or ""
    assert key.startswith("sk-proj-")
    assert scan(key) == {TOKEN}
    base = urlsplit(pairs["OPENAI_BASE_URL"] or "")
    assert base.path == "/v1"
    assert host_token(base.netloc) == TOKEN
    assert render("openai").value == render("openai").value


def test_anthropic() -> None:
    env = json.loads(render("anthropic").value)["env"]
    assert env["ANTHROPIC_API_KEY"].startswith("sk-ant-api03-")
    assert scan(env["ANTHROPIC_API_KEY"]) == {TOKEN}
    assert host_token(urlsplit(env["ANTHROPIC_BASE_URL"]).netloc) == TOKEN


def test_github() -> None:
    [(host, entry)] = yaml.safe_load(render("github").value).items()
    assert host_token(host) == TOKEN
    assert entry["oauth_token"].startswith("github_pat_")
    assert scan(entry["oauth_token"]) == {TOKEN}
    assert entry["git_protocol"] == "https"


def test_ssh_key_is_an_openssh_key_known_by_its_fingerprint() -> None:
    planting = render("ssh-key")
    config = dict(line.strip().split(" ", 1) for line in planting.files[".ssh/config"].splitlines())
    assert host_token(config["HostName"]) == TOKEN
    assert config["IdentityFile"] == "~/.ssh/id_ed25519_prod"
    assert planting.files[".ssh/id_ed25519_prod"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    public = planting.files[".ssh/id_ed25519_prod.pub"].split()
    assert public[0] == "ssh-ed25519"
    digest = base64.b64encode(hashlib.sha256(base64.b64decode(public[1])).digest()).decode()
    assert kinds.ssh_fingerprint(TOKEN) == "SHA256:" + digest.rstrip("=")
    # The same key from the same token (OpenSSH's file format has a random check word).
    again = render("ssh-key").files
    assert again[".ssh/id_ed25519_prod.pub"] == planting.files[".ssh/id_ed25519_prod.pub"]


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=RANDOM_BYTES, max_size=RANDOM_BYTES))
def test_no_key_decoration_reads_as_another_token(random_part: bytes) -> None:
    token = base64.b32encode(random_part + b"\0\0").decode().rstrip("=").lower()
    for fmt in ("openai", "anthropic", "github"):
        assert scan(kinds.credential(fmt, token, ZONE, kinds.Web()).value) == {token}


def test_every_format_is_covered() -> None:
    assert set(kinds.CREDENTIAL_FORMATS) == {
        "ssh-key",
        "openai",
        "anthropic",
        "github",
        "netrc",
        "git-credentials",
        "pgpass",
        "postgres-url",
        "env",
        "aws",
        "kubeconfig",
        "ssh-config",
        "docker-config",
        "mcp",
    }


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown credential format"):
        kinds.credential("nope", TOKEN, ZONE, kinds.Web())


def test_email_and_url() -> None:
    assert kinds.email(TOKEN, ZONE).value == f"{TOKEN}@{ZONE}"
    url = urlsplit(kinds.url(TOKEN, ZONE, kinds.Web()).value)
    assert (url.scheme, url.netloc) == ("http", f"{TOKEN}.{ZONE}")
    assert url.path.startswith("/")
    assert urlsplit(kinds.url(TOKEN, ZONE, kinds.Web(http_port=8080)).value).port == 8080


def test_https_urls_need_the_https_listener_and_name_the_token_host() -> None:
    with pytest.raises(ValueError, match=r"set \[https\] enabled = true"):
        kinds.url(TOKEN, ZONE, kinds.Web(), "https")
    url = urlsplit(kinds.url(TOKEN, ZONE, kinds.Web(https_port=443), "https").value)
    assert (url.scheme, url.netloc) == ("https", f"{TOKEN}.{ZONE}")
    url = urlsplit(kinds.url(TOKEN, ZONE, kinds.Web(https_port=8443), "https").value)
    assert (url.hostname, url.port) == (f"{TOKEN}.{ZONE}", 8443)


@pytest.mark.parametrize(
    "fmt",
    [
        "git-credentials",
        "env",
        "aws",
        "kubeconfig",
        "docker-config",
        "mcp",
        "openai",
        "anthropic",
        "github",
    ],
)
def test_https_clients_are_pointed_at_the_https_listener(fmt: str) -> None:
    """With HTTPS on, every format whose client speaks HTTPS names `<token>.<zone>`, which the
    wildcard certificate covers, on the HTTPS port."""
    planting = render(fmt, web=kinds.Web(http_port=8080, https_port=8443, ca_pem="CA"))
    planted = "".join(planting.files.values())
    assert f"{TOKEN}.{ZONE}:8443" in planted
    assert "http://" not in planted


def test_a_kubeconfig_names_a_self_signed_ca_and_skips_no_verification() -> None:
    ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    config = yaml.safe_load(render("kubeconfig", web=kinds.Web(https_port=443, ca_pem=ca)).value)
    cluster = config["clusters"][0]["cluster"]
    assert base64.b64decode(cluster["certificate-authority-data"]).decode() == ca
    assert "insecure-skip-tls-verify" not in cluster
    assert cluster["server"] == f"https://{TOKEN}.{ZONE}"
    # A publicly trusted (ACME) certificate needs neither.
    config = yaml.safe_load(render("kubeconfig", web=kinds.Web(https_port=443)).value)
    assert set(config["clusters"][0]["cluster"]) == {"server"}
