"""Using a planted credential trips its canary: a DNS lookup of its host and an HTTP request with its secret.

Every format is exercised by resolving its host against the DNS listener and
sending its secret the way its client would; curl, git and boto3 are also
driven for real, pointed at the listeners on 127.0.0.1.
"""

import asyncio
import configparser
import contextlib
import io
import json
import netrc
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dns.asyncquery
import dns.message
import httpx
import psycopg.conninfo
import pytest
import yaml
from dotenv import dotenv_values
from sqlalchemy import Engine

from canaries.kinds import CREDENTIAL_FORMATS, Web
from canaries.model import Canary
from support import (
    ZONE,
    Node,
    hits,
    plant_canary,
    resolving,
    run_dns,
    run_http,
    run_tls,
    served_ca,
)


@contextlib.asynccontextmanager
async def listeners(engine: Engine) -> AsyncIterator[tuple[Node, Node]]:
    async with run_dns(engine) as dns_node, run_http(engine) as http_node:
        yield dns_node, http_node


def use(canary: Canary, scratch: Path) -> tuple[str, dict[str, Any]]:
    """The host a client of this format resolves, and the HTTP request it would send, if any."""
    files = canary.files
    text = canary.value
    if canary.format == "netrc":
        (scratch / ".netrc").write_text(text)
        [(host, (login, _, password))] = netrc.netrc(str(scratch / ".netrc")).hosts.items()
        return host, {"auth": (login, password)}
    if canary.format == "git-credentials":
        url = urlsplit(text.strip())
        return url.hostname or "", {"auth": (url.username, url.password)}
    if canary.format == "pgpass":
        return text.split(":")[0], {}
    if canary.format == "postgres-url":
        return str(psycopg.conninfo.conninfo_to_dict(text.split("=", 1)[1].strip())["host"]), {}
    if canary.format == "env":
        pairs = dict(
            line.split("=", 1)
            for line in text.splitlines()
            if "=" in line and not line.startswith("#")
        )
        base = urlsplit(pairs["OPENAI_BASE_URL"])
        return base.hostname or "", {
            "headers": {"Authorization": f"Bearer {pairs['OPENAI_API_KEY']}"},
            "path": "/v1/models",
        }
    if canary.format == "aws":
        config = configparser.ConfigParser()
        config.read_string(files[".aws/config"])
        return urlsplit(config["default"]["endpoint_url"]).hostname or "", {"path": "/"}
    if canary.format == "kubeconfig":
        config = yaml.safe_load(text)
        server = urlsplit(config["clusters"][0]["cluster"]["server"])
        token = config["users"][0]["user"]["token"]
        return server.hostname or "", {
            "headers": {"Authorization": f"Bearer {token}"},
            "path": "/api",
        }
    if canary.format in ("ssh-config", "ssh-key"):
        return next(line.split()[1] for line in text.splitlines() if "HostName" in line), {}
    if canary.format == "docker-config":
        [(registry, entry)] = json.loads(text)["auths"].items()
        return registry, {"headers": {"Authorization": f"Basic {entry['auth']}"}, "path": "/v2/"}
    if canary.format == "mcp":
        [server] = json.loads(text)["mcpServers"].values()
        url = urlsplit(server["url"])
        return url.hostname or "", {
            "headers": server["headers"],
            "path": url.path,
            "method": "POST",
        }
    if canary.format == "openai":
        pairs = dotenv_values(stream=io.StringIO(text))
        base = urlsplit(pairs["OPENAI_BASE_URL"] or "")
        return base.hostname or "", {
            "headers": {"Authorization": f"Bearer {pairs['OPENAI_API_KEY']}"},
            "path": f"{base.path}/models",
        }
    if canary.format == "anthropic":
        env = json.loads(text)["env"]
        return urlsplit(env["ANTHROPIC_BASE_URL"]).hostname or "", {
            "headers": {"x-api-key": env["ANTHROPIC_API_KEY"], "anthropic-version": "2023-06-01"},
            "path": "/v1/messages",
            "method": "POST",
        }
    if canary.format == "github":
        [(host, entry)] = yaml.safe_load(text).items()
        return host, {
            "headers": {"Authorization": f"token {entry['oauth_token']}"},
            "path": "/api/v3/user",
        }
    raise AssertionError(canary.format)


@pytest.mark.parametrize("fmt", CREDENTIAL_FORMATS)
async def test_using_each_format_trips_its_canary(
    sqlite_engine: Engine, tmp_path: Path, fmt: str
) -> None:
    async with listeners(sqlite_engine) as (dns_node, http_node):
        canary = plant_canary(
            sqlite_engine, "credential", fmt=fmt, web=Web(http_port=http_node.port)
        )
        host, http = use(canary, tmp_path)
        reply = await dns.asyncquery.udp(
            dns.message.make_query(host, "A"), "127.0.0.1", port=dns_node.port, timeout=5
        )
        assert reply.answer
        if http:
            method = http.pop("method", "GET")
            path = http.pop("path", "/")
            headers = {"Host": host, **http.pop("headers", {})}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_node.port}") as client:
                await client.request(method, path, headers=headers, **http)
    recorded = hits(sqlite_engine)
    assert {entry.canary_id for entry in recorded} == {canary.id}
    assert recorded[0].protocol == "dns"
    if http:
        assert [entry.protocol for entry in recorded] == ["dns", "http"]
        # The secret itself was seen, not just the host.
        assert len(recorded[1].evidence["found_in"]) >= 2 or fmt == "aws"


async def run(*command: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode or 0, output.decode(errors="replace")


async def git_ls_remote(home: Path, url: str, *settings: str) -> str:
    """`git ls-remote url` as an agent with HOME `home` runs it, the url's host at 127.0.0.1."""
    parts = urlsplit(url)
    resolve = f"http.curloptResolve={parts.hostname}:{parts.port}:127.0.0.1"
    options = [word for setting in (*settings, resolve) for word in ("-c", setting)]
    _, output = await run(
        "git",
        *options,
        "ls-remote",
        url,
        env={"HOME": str(home), "GIT_TERMINAL_PROMPT": "0", "PATH": "/usr/bin:/bin"},
    )
    return output


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_with_the_planted_netrc(sqlite_engine: Engine, tmp_path: Path) -> None:
    async with run_http(sqlite_engine) as node:
        canary = plant_canary(sqlite_engine, "credential", fmt="netrc")
        (tmp_path / ".netrc").write_text(canary.value)
        host = canary.value.split()[1]
        code, output = await run(
            "curl",
            "-sS",
            "--netrc-file",
            str(tmp_path / ".netrc"),
            "--resolve",
            f"{host}:{node.port}:127.0.0.1",
            f"http://{host}:{node.port}/artifacts/release.tar.gz",
        )
        assert code == 0, output
    [hit] = hits(sqlite_engine)
    assert hit.canary_id == canary.id
    assert hit.evidence["found_in"] == ["host", "header:authorization"]
    assert hit.evidence["user_agent"].startswith("curl/")


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
async def test_git_sends_the_stored_credential_when_challenged(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    async with run_http(sqlite_engine) as node:
        canary = plant_canary(sqlite_engine, "credential", fmt="git-credentials")
        planted = urlsplit(canary.value.strip())
        host = planted.hostname or ""
        # The planted line names https; git's store matches on scheme and port, so the
        # test listener's plain-HTTP port is written in the same line shape.
        store = tmp_path / "git-credentials"
        store.write_text(f"http://{planted.username}:{planted.password}@{host}:{node.port}\n")
        output = await git_ls_remote(
            tmp_path,
            f"http://{host}:{node.port}/platform/infra.git",
            f"credential.helper=store --file={store}",
        )
    recorded = hits(sqlite_engine)
    assert {entry.canary_id for entry in recorded} == {canary.id}, output
    assert recorded[0].evidence["found_in"] == ["host"]
    assert ["host", "header:authorization"] in [entry.evidence["found_in"] for entry in recorded]
    assert recorded[-1].evidence["user_agent"].startswith("git/")


async def test_boto3_with_the_planted_aws_files(
    sqlite_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boto3 = pytest.importorskip("boto3")
    async with run_http(sqlite_engine) as node:
        canary = plant_canary(sqlite_engine, "credential", fmt="aws", web=Web(http_port=node.port))
        for path, text in canary.files.items():
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(text)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / ".aws/config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / ".aws/credentials"))
        for name in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_ENDPOINT_URL",
        ):
            monkeypatch.delenv(name, raising=False)

        def list_buckets() -> None:
            client = boto3.session.Session().client("s3")
            with contextlib.suppress(Exception):  # the canary answers nothing S3 understands
                client.list_buckets()

        with resolving(f".{ZONE}"):
            await asyncio.to_thread(list_buckets)
    recorded = hits(sqlite_engine)
    assert recorded
    assert {entry.canary_id for entry in recorded} == {canary.id}
    key_id = configparser.ConfigParser()
    key_id.read_string(canary.files[".aws/credentials"])
    authorization = dict(recorded[0].evidence["headers"])["authorization"]
    # The SigV4 signature names the planted key id: boto3 loaded the planted files.
    assert key_id["default"]["aws_access_key_id"] in authorization


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
async def test_git_over_https_verifies_our_certificate_and_sends_the_planted_secret(
    engine: Engine, tmp_path: Path
) -> None:
    async with run_tls(engine) as node:
        web = Web(https_port=node.port, ca_pem=served_ca())
        canary = plant_canary(engine, "credential", fmt="git-credentials", web=web)
        planted = urlsplit(canary.value.strip())
        host = planted.hostname or ""
        # The planted file as it is: git's store matches it on scheme, host and port.
        (tmp_path / ".git-credentials").write_text(canary.value)
        (tmp_path / "ca.pem").write_text(served_ca())
        output = await git_ls_remote(
            tmp_path,
            f"https://{host}:{node.port}/platform/infra.git",
            "credential.helper=store",
            f"http.sslCAInfo={tmp_path / 'ca.pem'}",
        )
    recorded = hits(engine)
    assert {entry.canary_id for entry in recorded} == {canary.id}, output
    assert recorded[0].protocol == "tls"
    https = [entry for entry in recorded if entry.protocol == "https"]
    # Challenged once, git went on with the stored secret over the verified connection.
    assert ["host", "header:authorization"] in [entry.evidence["found_in"] for entry in https]
    assert https[-1].evidence["user_agent"].startswith("git/")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
async def test_kubectl_trusts_the_planted_ca_and_sends_its_bearer_token(
    engine: Engine, tmp_path: Path
) -> None:
    async with run_tls(engine) as node:
        web = Web(https_port=node.port, ca_pem=served_ca())
        canary = plant_canary(engine, "credential", fmt="kubeconfig", web=web)
        config = yaml.safe_load(canary.value)
        cluster = config["clusters"][0]["cluster"]
        name = urlsplit(cluster["server"]).hostname
        # kubectl resolves with Go's own resolver: reach loopback, and still ask for (and
        # verify) the planted name, as it would after resolving it.
        cluster["server"] = f"https://127.0.0.1:{node.port}"
        cluster["tls-server-name"] = name
        (tmp_path / "config").write_text(yaml.safe_dump(config))
        _, output = await run(
            "kubectl",
            "--kubeconfig",
            str(tmp_path / "config"),
            "--request-timeout=10s",
            "get",
            "pods",
            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        )
    assert "x509" not in output, output
    recorded = hits(engine)
    https = [entry for entry in recorded if entry.protocol == "https"]
    assert https, output
    assert {entry.canary_id for entry in recorded} == {canary.id}
    assert "header:authorization" in https[0].evidence["found_in"]
    assert "kubectl" in (https[0].evidence["user_agent"] or "")


@contextlib.asynccontextmanager
async def connect_proxy(port: int) -> AsyncIterator[tuple[int, list[str]]]:
    """An HTTP CONNECT proxy on 127.0.0.1 that tunnels every request to `port`: how a client
    that resolves names itself (Go's, as gh is) reaches a planted host here. Yields its port
    and the targets it was asked for."""
    asked: list[str] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        asked.append(head.split()[1].decode())
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(tunnel, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], asked
    finally:
        server.close()


@pytest.mark.skipif(shutil.which("gh") is None, reason="gh is not installed")
async def test_gh_with_the_planted_hosts_file_sends_its_token(
    engine: Engine, tmp_path: Path
) -> None:
    async with run_tls(engine) as node, connect_proxy(node.port) as (proxy, asked):
        # As in production, on 443 (gh takes no port in a host name): the proxy brings
        # the connection to the test listener's port.
        canary = plant_canary(
            engine, "credential", fmt="github", web=Web(https_port=443, ca_pem="unused")
        )
        config = tmp_path / "gh"
        config.mkdir()
        (config / "hosts.yml").write_text(canary.value)
        [host] = yaml.safe_load(canary.value)
        (tmp_path / "ca.pem").write_text(served_ca())
        _, output = await run(
            "gh",
            "api",
            "--hostname",
            host,
            "user",
            env={
                "PATH": "/usr/bin:/bin",
                "HOME": str(tmp_path),
                "GH_CONFIG_DIR": str(config),
                "GH_NO_UPDATE_NOTIFIER": "1",
                "HTTPS_PROXY": f"http://127.0.0.1:{proxy}",
                "SSL_CERT_FILE": str(tmp_path / "ca.pem"),
            },
        )
    assert asked == [f"{host}:443"], output
    recorded = hits(engine)
    assert {entry.canary_id for entry in recorded} == {canary.id}, output
    [request] = [entry for entry in recorded if entry.protocol == "https"]
    assert request.evidence["target"] == "/api/v3/user"
    assert "header:authorization" in request.evidence["found_in"]
    assert request.evidence["user_agent"].startswith("GitHub CLI")


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
async def test_a_registry_client_with_the_planted_docker_config_sends_its_auth(
    engine: Engine, tmp_path: Path
) -> None:
    """skopeo (containers/image, which reads ~/.docker/config.json as docker does) asks the
    planted registry, is challenged, and answers with the planted credential."""
    async with run_tls(engine) as node, connect_proxy(node.port) as (proxy, asked):
        canary = plant_canary(
            engine, "credential", fmt="docker-config", web=Web(https_port=443, ca_pem="unused")
        )
        (tmp_path / ".docker").mkdir()
        (tmp_path / ".docker/config.json").write_text(canary.value)
        [registry] = json.loads(canary.value)["auths"]
        (tmp_path / "ca.pem").write_text(served_ca())
        _, output = await run(
            "skopeo",
            "inspect",
            f"docker://{registry}/platform/api:latest",
            env={
                "PATH": "/usr/bin:/bin",
                "HOME": str(tmp_path),
                "HTTPS_PROXY": f"http://127.0.0.1:{proxy}",
                "SSL_CERT_FILE": str(tmp_path / "ca.pem"),
                "REGISTRY_AUTH_FILE": str(tmp_path / "missing-auth.json"),
            },
        )
    assert f"{registry}:443" in asked, output
    requests = [entry for entry in hits(engine) if entry.protocol == "https"]
    assert {entry.canary_id for entry in requests} == {canary.id}, output
    assert any("header:authorization" in entry.evidence["found_in"] for entry in requests), output
