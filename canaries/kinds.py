"""What gets planted for each kind of canary: pure rendering from a token.

Credential canaries look like the files a person keeps in a home directory.
Each names a host under the zone (so using it makes the client resolve a
canary name) and carries the token in its secret (so a client that speaks
HTTP sends it to the HTTP listener). Tokens in secrets always stand between
non-base32 characters, so the text scanner finds them.
"""

import base64
import json
import random
from dataclasses import dataclass, field
from typing import Literal, get_args

CredentialFormat = Literal[
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
]
CREDENTIAL_FORMATS: tuple[str, ...] = get_args(CredentialFormat)

_URL_PATHS = ("/internal/runbook", "/wiki/oncall", "/docs/deploy", "/admin/status", "/reports/q3")


@dataclass(frozen=True, slots=True)
class Planting:
    """The text to plant for one canary, and where it usually lives."""

    value: str
    path_hint: str = ""
    format: str = ""
    files: dict[str, str] = field(default_factory=dict)


def http_base(host: str, port: int) -> str:
    return f"http://{host}" if port == 80 else f"http://{host}:{port}"


def dns(token: str, zone: str) -> Planting:
    return Planting(f"{token}.{zone}")


def email(token: str, zone: str) -> Planting:
    return Planting(f"{token}@{zone}")


def url(token: str, zone: str, http_port: int) -> Planting:
    path = random.Random(token).choice(_URL_PATHS)  # noqa: S311 - decoration, not secrecy
    return Planting(http_base(f"{token}.{zone}", http_port) + path)


def credential(fmt: str, token: str, zone: str, http_port: int) -> Planting:
    """Render credential format `fmt`; the first file is the primary one."""
    if fmt not in CREDENTIAL_FORMATS:
        raise ValueError(
            f"unknown credential format {fmt!r}; one of {', '.join(CREDENTIAL_FORMATS)}"
        )
    files = _RENDERERS[fmt](token, zone, http_port)
    path_hint, value = next(iter(files.items()))
    return Planting(value, path_hint, fmt, files)


def _netrc(token: str, zone: str, _port: int) -> dict[str, str]:
    return {
        ".netrc": f"machine artifacts.{token}.{zone}\n  login deploy-bot\n  password {token}\n",
    }


def _git_credentials(token: str, zone: str, _port: int) -> dict[str, str]:
    return {".git-credentials": f"https://ci-bot:{token}@git.{token}.{zone}\n"}


def _pgpass(token: str, zone: str, _port: int) -> dict[str, str]:
    return {".pgpass": f"db.{token}.{zone}:5432:app_production:app_rw:{token}\n"}


def _postgres_url(token: str, zone: str, _port: int) -> dict[str, str]:
    url = f"postgresql://app_rw:{token}@db.{token}.{zone}:5432/app_production?sslmode=prefer"
    return {"project/.env.production": f"DATABASE_URL={url}\n"}


def _env(token: str, zone: str, port: int) -> dict[str, str]:
    return {
        "project/.env": (
            "# local overrides, do not commit\n"
            f"OPENAI_API_KEY=sk-proj-{token}\n"
            f"OPENAI_BASE_URL={http_base(f'api.{token}.{zone}', port)}/v1\n"
            "LOG_LEVEL=info\n"
        )
    }


def _aws(token: str, zone: str, port: int) -> dict[str, str]:
    draw = random.Random(token)  # noqa: S311 - decoration, not secrecy
    key_id = "AKIA" + "".join(draw.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
    tail = "".join(draw.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0189+") for _ in range(13))
    return {
        ".aws/credentials": (
            f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {token}/{tail}\n"
        ),
        ".aws/config": (
            "[default]\nregion = us-east-1\noutput = json\n"
            f"endpoint_url = {http_base(f's3.{token}.{zone}', port)}\n"
        ),
    }


def _kubeconfig(token: str, zone: str, _port: int) -> dict[str, str]:
    server = f"https://k8s.{token}.{zone}:6443"
    return {
        ".kube/config": (
            "apiVersion: v1\nkind: Config\n"
            "clusters:\n- cluster:\n    insecure-skip-tls-verify: true\n"
            f"    server: {server}\n  name: prod-eu1\n"
            "contexts:\n- context:\n    cluster: prod-eu1\n    namespace: default\n"
            "    user: deploy\n  name: prod-eu1\n"
            "current-context: prod-eu1\n"
            "preferences: {}\n"
            f"users:\n- name: deploy\n  user:\n    token: {token}\n"
        )
    }


def _ssh_config(token: str, zone: str, _port: int) -> dict[str, str]:
    return {
        ".ssh/config": (
            "Host bastion-prod\n"
            f"  HostName bastion.{token}.{zone}\n"
            "  User deploy\n  Port 22\n  IdentityFile ~/.ssh/id_ed25519\n"
            "  StrictHostKeyChecking accept-new\n"
        )
    }


def _docker_config(token: str, zone: str, _port: int) -> dict[str, str]:
    auth = base64.b64encode(f"ci-bot:{token}".encode()).decode()
    config = {"auths": {f"registry.{token}.{zone}": {"auth": auth}}}
    return {".docker/config.json": json.dumps(config, indent=2) + "\n"}


def _mcp(token: str, zone: str, port: int) -> dict[str, str]:
    server = {
        "type": "http",
        "url": http_base(f"mcp.{token}.{zone}", port) + "/mcp",
        "headers": {"Authorization": f"Bearer {token}"},
    }
    return {
        "project/.mcp.json": json.dumps({"mcpServers": {"internal-tools": server}}, indent=2) + "\n"
    }


_RENDERERS = {
    "netrc": _netrc,
    "git-credentials": _git_credentials,
    "pgpass": _pgpass,
    "postgres-url": _postgres_url,
    "env": _env,
    "aws": _aws,
    "kubeconfig": _kubeconfig,
    "ssh-config": _ssh_config,
    "docker-config": _docker_config,
    "mcp": _mcp,
}
