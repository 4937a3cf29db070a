"""Started as root, `serve` binds a privileged port, then runs as `[node] user`; else it warns."""

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from oobwatch.config import ConfigError, load
from oobwatch.serve import start
from support import Receiver, Serving, node_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as `serve` on port 53 does")


def privileged_port() -> int:
    """A port under 1024 free on 127.0.0.1 for both UDP and TCP."""
    for port in range(1000, 600, -1):
        with (
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        ):
            try:
                tcp.bind(("127.0.0.1", port))
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port under 1024")


@pytest.fixture
def state() -> Iterator[Path]:
    """A state folder the unprivileged user owns (pytest's own are root's, mode 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="oobwatch-state-"))
    nobody = pwd.getpwnam("nobody")
    os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def ids(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(field) for field in line.split()[1:]]
    raise AssertionError("no Uid line")


def test_root_binds_port_53_s_kind_then_runs_as_the_user(state: Path, receiver: Receiver) -> None:
    port = privileged_port()
    config = node_config(state, receiver.url(), extra="[heartbeat]\nenabled = false\n", node="ns1")
    text = config.read_text().replace('name = "ns1"', 'name = "ns1"\nuser = "nobody"')
    config.write_text(text.replace('.test"\nport = 0', f'.test"\nport = {port}', 1))
    node = Serving(config).start()
    try:
        assert node.ports["dns"] == port
        assert node.process is not None
        assert set(ids(node.process.pid)) == {pwd.getpwnam("nobody").pw_uid}
        command = [sys.executable, "-m", "oobwatch.cli", "--config", str(config)]
        minted = subprocess.run(
            [*command, "mint", "dns", "--sandbox", "sbx", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        name = json.loads(minted.stdout)["value"]
        # The unprivileged node still opens the store: the hit is recorded, then answered.
        for _ in range(20):
            reply = dns.query.udp(
                dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=5
            )
            if reply.answer:
                break
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.answer
    finally:
        node.stop()
    nobody = pwd.getpwnam("nobody").pw_uid
    assert (state / "oobwatch.db").stat().st_uid == nobody
    # The spool's lock too: a later start as that user must be able to take it.
    assert (state / "oobwatch.db.ns1.spool.lock").stat().st_uid == nobody


async def test_root_without_a_user_says_so_once(
    tmp_path: Path, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    config = load(node_config(tmp_path, receiver.url(), extra="[heartbeat]\nenabled = false\n"))
    node = await start(config)
    await node.stop()
    warned = [r for r in caplog.records if "running as root" in r.getMessage()]
    assert len(warned) == 1


async def test_an_unknown_user_is_a_config_error_before_anything_binds(
    tmp_path: Path, receiver: Receiver
) -> None:
    path = node_config(tmp_path, receiver.url(), node="ns1")
    path.write_text(path.read_text().replace('name = "ns1"', 'name = "ns1"\nuser = "no-such-user"'))
    with pytest.raises(ConfigError, match=r"node\.user: there is no user 'no-such-user'"):
        await start(load(path))
