"""The SSH listener with real clients (OpenSSH, asyncssh): a planted key or password, tried,
names its canary; every attempt is refused."""

import asyncio
import os
import shutil
import socket
import subprocess
from pathlib import Path

import asyncssh
import pytest
from sqlalchemy import Engine

from support import hits, plant_canary, run_ssh, settle, ssh_host_key


def known_hosts(path: Path, port: int) -> Path:
    public = asyncssh.import_private_key(ssh_host_key()).export_public_key().decode().strip()
    path.write_text(f"[127.0.0.1]:{port} {public}\n")
    return path


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH is not installed")
async def test_openssh_with_the_planted_config_and_key_is_known_by_the_key(
    engine: Engine, tmp_path: Path
) -> None:
    canary = plant_canary(engine, "credential", fmt="ssh-key")
    for name, text in canary.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o600)
    # A key of the agent's own, offered too: it is on the record with the hit.
    own = tmp_path / "own_key"
    own.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    own.chmod(0o600)
    async with run_ssh(engine) as node:
        # The agent changes the host and port (and would the user): the key still names it.
        done = await asyncio.to_thread(
            subprocess.run,
            [
                "ssh",
                "-F",
                str(tmp_path / ".ssh/config"),
                "-o",
                "IdentitiesOnly=yes",
                "-i",
                str(own),
                "-i",
                str(tmp_path / ".ssh/id_ed25519_prod"),
                "-o",
                "HostName=127.0.0.1",
                "-o",
                "User=root",
                "-o",
                f"Port={node.port}",
                "-o",
                "BatchMode=yes",
                "-o",
                f"UserKnownHostsFile={known_hosts(tmp_path / 'known_hosts', node.port)}",
                "-o",
                "ConnectTimeout=10",
                "bastion-prod",
                "true",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        )
        await settle(lambda: bool(hits(engine)))
    assert done.returncode == 255
    assert "Permission denied" in done.stderr
    listed = await asyncio.to_thread(
        subprocess.run,
        ["ssh-keygen", "-lf", str(tmp_path / ".ssh/id_ed25519_prod.pub")],
        capture_output=True,
        text=True,
        check=True,
    )
    fingerprint = listed.stdout.split()[1]
    [hit] = hits(engine)
    assert hit.canary_id == canary.id
    assert hit.protocol == "ssh"
    assert hit.evidence["key_fingerprint"] == fingerprint
    assert hit.evidence["username"] == "root"
    assert hit.evidence["method"] == "publickey"
    assert hit.evidence["client_version"].startswith("SSH-2.0-OpenSSH")
    # Every key the connection offered is on the record: before the hit, or as its evidence.
    offered = [attempt["key_fingerprint"] for attempt in hit.evidence["attempts_before"]]
    offered += [e.evidence["key_fingerprint"] for e in hits(engine, "evidence")]
    assert asyncssh.read_private_key(own).get_fingerprint("sha256") in offered


async def test_a_password_with_a_token_is_refused_and_recorded(engine: Engine) -> None:
    canary = plant_canary(engine, "credential", fmt="netrc")
    async with run_ssh(engine) as node:
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect(
                "127.0.0.1",
                node.port,
                username="deploy",
                password=canary.token,
                known_hosts=None,
                client_keys=None,
                preferred_auth="password",
            )
    [hit] = hits(engine)
    assert hit.canary_id == canary.id
    assert hit.evidence["method"] == "password"
    assert hit.evidence["found_in"] == ["password"]
    assert hit.evidence["password_length"] == len(canary.token)
    # The planted secret itself is kept (it carries the token); no other password would be.
    assert hit.evidence["password"] == canary.token


async def test_bytes_that_are_not_ssh_and_silent_clients_are_cut_off(engine: Engine) -> None:
    canary = plant_canary(engine, "credential", fmt="netrc")
    async with run_ssh(engine, login_timeout=1.0, max_connections_per_source=4) as node:
        guard = node.context.connections
        assert guard is not None
        junk = socket.create_connection(("127.0.0.1", node.port), timeout=5)
        junk.sendall(b"GET / HTTP/1.1\r\n\r\n" * 10)
        silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(6)]
        # Within the cap of four from one source (the junk one held a slot as they came).
        await settle(lambda: guard.open == 3)
        assert guard.open == 3
        assert guard.refused["source"] >= 2
        await settle(lambda: guard.open == 0, 8)
        assert guard.open == 0
        for sock in [junk, *silent]:
            sock.close()
        # A real attempt still lands afterwards.
        with pytest.raises(asyncssh.PermissionDenied):
            await asyncssh.connect(
                "127.0.0.1",
                node.port,
                username="x",
                password=canary.token,
                known_hosts=None,
                client_keys=None,
            )
    assert [hit.canary_id for hit in hits(engine)] == [canary.id]


@pytest.mark.parametrize("kex", ["rsa2048-sha256", "diffie-hellman-group18-sha512"])
async def test_key_exchanges_costly_for_the_server_are_not_offered(
    engine: Engine, kex: str
) -> None:
    """A client cannot make the node generate an RSA key or a large DH group per handshake."""
    async with run_ssh(engine) as node:
        with pytest.raises(asyncssh.KeyExchangeFailed):
            await asyncssh.connect(
                "127.0.0.1", node.port, kex_algs=[kex], known_hosts=None, username="x"
            )
