"""What gets planted for each kind of canary: pure rendering from a token.

Credential canaries look like the files a person keeps in a home directory.
Each names a host under the zone (so using it makes the client resolve a
canary name) and carries the token in its secret (so a client that speaks
HTTP sends it to the HTTP listener). Tokens in secrets always stand between
non-base32 characters, so the text scanner finds them.
"""

import base64
import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Literal, get_args

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
    "openai",
    "anthropic",
    "github",
    "ssh-key",
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


@dataclass(frozen=True, slots=True)
class Web:
    """Where planted URLs point: the HTTP port, the HTTPS port when the HTTPS listener runs,
    and the PostgreSQL port.

    Over HTTPS a planted host is `<token>.<zone>` itself: the one name under the zone that a
    wildcard certificate for `*.<zone>` (ACME's, or the self-signed one) covers, so a client
    that checks the certificate accepts it and goes on to send the secret.
    """

    http_port: int = 80
    https_port: int | None = None
    # The serving certificate, for clients a planted file can tell to trust it (self-signed).
    ca_pem: str | None = None
    # Where planted database credentials point (the PostgreSQL listener's port).
    postgres_port: int = 5432

    def http(self, host: str) -> str:
        port = self.http_port
        return f"http://{host}" if port == 80 else f"http://{host}:{port}"

    def https(self, token: str, zone: str) -> str:
        assert self.https_port is not None
        return f"https://{self.authority(token, zone)}"

    def authority(self, token: str, zone: str) -> str:
        """`<token>.<zone>`, with the HTTPS port unless it is 443."""
        port = self.https_port
        return f"{token}.{zone}" if port in (None, 443) else f"{token}.{zone}:{port}"

    def base(self, host: str, token: str, zone: str) -> str:
        """An HTTPS URL when the HTTPS listener runs, else plain HTTP to `host`."""
        return self.https(token, zone) if self.https_port is not None else self.http(host)


def dns(token: str, zone: str) -> Planting:
    return Planting(f"{token}.{zone}")


def email(token: str, zone: str) -> Planting:
    return Planting(f"{token}@{zone}")


def url(token: str, zone: str, web: Web, scheme: str = "http") -> Planting:
    path = random.Random(token).choice(_URL_PATHS)  # noqa: S311 - decoration, not secrecy
    if scheme == "https":
        if web.https_port is None:
            raise ValueError("an https URL needs the HTTPS listener: set [https] enabled = true")
        return Planting(web.https(token, zone) + path)
    return Planting(web.http(f"{token}.{zone}") + path)


def credential(fmt: str, token: str, zone: str, web: Web) -> Planting:
    """Render credential format `fmt`; the first file is the primary one."""
    if fmt not in CREDENTIAL_FORMATS:
        raise ValueError(
            f"unknown credential format {fmt!r}; one of {', '.join(CREDENTIAL_FORMATS)}"
        )
    files = _RENDERERS[fmt](token, zone, web)
    path_hint, value = next(iter(files.items()))
    return Planting(value, path_hint, fmt, files)


def _netrc(token: str, zone: str, _web: Web) -> dict[str, str]:
    return {
        ".netrc": f"machine artifacts.{token}.{zone}\n  login deploy-bot\n  password {token}\n",
    }


def _git_credentials(token: str, zone: str, web: Web) -> dict[str, str]:
    host = web.authority(token, zone) if web.https_port is not None else f"git.{token}.{zone}"
    return {".git-credentials": f"https://ci-bot:{token}@{host}\n"}


def _pgpass(token: str, zone: str, web: Web) -> dict[str, str]:
    return {".pgpass": f"db.{token}.{zone}:{web.postgres_port}:app_production:app_rw:{token}\n"}


def _postgres_url(token: str, zone: str, web: Web) -> dict[str, str]:
    host = f"db.{token}.{zone}:{web.postgres_port}"
    url = f"postgresql://app_rw:{token}@{host}/app_production?sslmode=prefer"
    return {"project/.env.production": f"DATABASE_URL={url}\n"}


def _env(token: str, zone: str, web: Web) -> dict[str, str]:
    return {
        "project/.env": (
            "# local overrides, do not commit\n"
            f"OPENAI_API_KEY=sk-proj-{token}\n"
            f"OPENAI_BASE_URL={web.base(f'api.{token}.{zone}', token, zone)}/v1\n"
            "LOG_LEVEL=info\n"
        )
    }


def _aws(token: str, zone: str, web: Web) -> dict[str, str]:
    draw = random.Random(token)  # noqa: S311 - decoration, not secrecy
    key_id = "AKIA" + "".join(draw.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
    tail = "".join(draw.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0189+") for _ in range(13))
    return {
        ".aws/credentials": (
            f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {token}/{tail}\n"
        ),
        ".aws/config": (
            "[default]\nregion = us-east-1\noutput = json\n"
            f"endpoint_url = {web.base(f's3.{token}.{zone}', token, zone)}\n"
        ),
    }


def _kubeconfig(token: str, zone: str, web: Web) -> dict[str, str]:
    if web.https_port is None:
        server, trust = f"https://k8s.{token}.{zone}:6443", "    insecure-skip-tls-verify: true\n"
    else:
        # kubectl sends its token only to a server it trusts: a self-signed one is named
        # here; an ACME one is trusted already.
        server, trust = web.https(token, zone), ""
        if web.ca_pem:
            ca = base64.b64encode(web.ca_pem.encode()).decode()
            trust = f"    certificate-authority-data: {ca}\n"
    return {
        ".kube/config": (
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- cluster:\n{trust}"
            f"    server: {server}\n  name: prod-eu1\n"
            "contexts:\n- context:\n    cluster: prod-eu1\n    namespace: default\n"
            "    user: deploy\n  name: prod-eu1\n"
            "current-context: prod-eu1\n"
            "preferences: {}\n"
            f"users:\n- name: deploy\n  user:\n    token: {token}\n"
        )
    }


def _ssh_config(token: str, zone: str, _web: Web) -> dict[str, str]:
    return {
        ".ssh/config": (
            "Host bastion-prod\n"
            f"  HostName bastion.{token}.{zone}\n"
            "  User deploy\n  Port 22\n  IdentityFile ~/.ssh/id_ed25519\n"
            "  StrictHostKeyChecking accept-new\n"
        )
    }


def _docker_config(token: str, zone: str, web: Web) -> dict[str, str]:
    auth = base64.b64encode(f"ci-bot:{token}".encode()).decode()
    registry = (
        web.authority(token, zone) if web.https_port is not None else f"registry.{token}.{zone}"
    )
    config = {"auths": {registry: {"auth": auth}}}
    return {".docker/config.json": json.dumps(config, indent=2) + "\n"}


def _mcp(token: str, zone: str, web: Web) -> dict[str, str]:
    server = {
        "type": "http",
        "url": web.base(f"mcp.{token}.{zone}", token, zone) + "/mcp",
        "headers": {"Authorization": f"Bearer {token}"},
    }
    config = json.dumps({"mcpServers": {"internal-tools": server}}, indent=2) + "\n"
    # Where clients read it: Claude Code a project's .mcp.json, Cursor ~/.cursor/mcp.json.
    return {"project/.mcp.json": config, ".cursor/mcp.json": config}


_KEY_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# Digits outside base32: one at least every _RUN characters keeps any window of
# the decoration (with a short suffix after it) from reading as a second token.
_BREAKS = "0189"
_RUN = 20


def _tail(token: str, size: int) -> str:
    """Decoration after a key's token, the same for the same token."""
    draw = random.Random(f"tail:{token}")  # noqa: S311 - decoration, not secrecy
    chars: list[str] = []
    run = 0
    for _ in range(size):
        char = draw.choice(_BREAKS if run == _RUN else _KEY_CHARS)
        run = 0 if char in _BREAKS else run + 1
        chars.append(char)
    return "".join(chars)


def _openai(token: str, zone: str, web: Web) -> dict[str, str]:
    # What the official SDKs read: OPENAI_API_KEY and OPENAI_BASE_URL, from a dotenv file.
    return {
        "project/.env.local": (
            f"OPENAI_API_KEY=sk-proj-{token}_{_tail(token, 40)}\n"
            f"OPENAI_BASE_URL={web.base(f'api.{token}.{zone}', token, zone)}/v1\n"
            "OPENAI_ORG_ID=org-platform\n"
        )
    }


def _anthropic(token: str, zone: str, web: Web) -> dict[str, str]:
    # Claude Code's user settings: its `env` is set for every session (and the SDKs read it).
    settings = {
        "env": {
            "ANTHROPIC_BASE_URL": web.base(f"api.{token}.{zone}", token, zone),
            "ANTHROPIC_API_KEY": f"sk-ant-api03-{token}-{_tail(token, 60)}AA",
        },
        "permissions": {"allow": ["Bash(git status)", "Read(./**)"]},
    }
    return {".claude/settings.json": json.dumps(settings, indent=2) + "\n"}


def _github(token: str, zone: str, web: Web) -> dict[str, str]:
    # gh's hosts file: a GitHub Enterprise host with its token (gh asks https://<host>/api/v3/).
    host = web.authority(token, zone) if web.https_port is not None else f"github.{token}.{zone}"
    return {
        ".config/gh/hosts.yml": (
            f"{host}:\n"
            f"    oauth_token: github_pat_{token}_{_tail(token, 59)}\n"
            "    user: ci-bot\n"
            "    git_protocol: https\n"
        )
    }


def ssh_key(token: str) -> Ed25519PrivateKey:
    """The SSH key an `ssh-key` canary plants, derived from its token: the SSH listener knows
    a canary by the fingerprint of the public key a client offers (SSH names no host)."""
    return Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(f"ssh-key:{token}".encode()).digest()
    )


def ssh_fingerprint(token: str) -> str:
    """The fingerprint of an `ssh-key` canary's key, as `ssh-keygen -lf` prints it."""
    line = (
        ssh_key(token)
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _ssh_key(token: str, zone: str, _web: Web) -> dict[str, str]:
    key = ssh_key(token)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return {
        ".ssh/config": (
            "Host bastion-prod\n"
            f"  HostName bastion.{token}.{zone}\n"
            "  User deploy\n  Port 22\n  IdentityFile ~/.ssh/id_ed25519_prod\n"
            "  IdentitiesOnly yes\n  StrictHostKeyChecking accept-new\n"
        ),
        ".ssh/id_ed25519_prod": private,
        ".ssh/id_ed25519_prod.pub": f"{public} deploy@bastion-prod\n",
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
    "openai": _openai,
    "anthropic": _anthropic,
    "github": _github,
    "ssh-key": _ssh_key,
}
