"""`oobwatch doctor` against a running node and a real parent zone (NSD) that delegates to it."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.clock import now_us
from store.ledger import Event
from store.spool import Spool
from support import Receiver, Serving, node_config, store_with

ZONE = "canary.example.test"
PARENT = "example.test"


def free_port() -> int:
    """A port free on 127.0.0.1 for both TCP and UDP."""
    while True:
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with (
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
                contextlib.suppress(OSError),
            ):
                udp.bind(("127.0.0.1", port))
                return port


class Parent:
    """NSD serving `example.test`, which delegates (or, broken, does not) `canary.example.test`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def serve(self, delegation: str) -> None:
        self.stop()
        (self.folder / "zone").write_text(
            f"$ORIGIN {PARENT}.\n$TTL 60\n"
            "@ IN SOA ns hostmaster 1 3600 600 86400 60\n"
            "@ IN NS ns\nns IN A 127.0.0.1\n" + delegation,
            encoding="ascii",
        )
        config = self.folder / "nsd.conf"
        config.write_text(
            f"""server:
  ip-address: 127.0.0.1@{self.port}
  do-ip6: no
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: "{self.folder}"
  pidfile: "{self.folder}/nsd.pid"
  database: ""
  zonelistfile: "{self.folder}/zone.list"
  xfrdfile: "{self.folder}/xfrd.state"
  xfrdir: "{self.folder}"
  logfile: "{self.folder}/nsd.log"
remote-control:
  control-enable: no
zone:
  name: {PARENT}
  zonefile: "zone"
""",
            encoding="ascii",
        )
        nsd = shutil.which("nsd") or "/usr/sbin/nsd"
        self.process = subprocess.Popen([nsd, "-d", "-c", str(config)], start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError("NSD did not start")

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.process = None


@pytest.fixture
def parent(tmp_path: Path) -> Iterator[Parent]:
    if shutil.which("nsd") is None and not Path("/usr/sbin/nsd").exists():
        pytest.fail("NSD is not installed; `make test` installs it with apt-get")
    folder = tmp_path / "parent"
    folder.mkdir()
    server = Parent(folder)
    yield server
    server.stop()


def doctor(config: Path, *args: str) -> tuple[int, list[dict[str, object]]]:
    command = [sys.executable, "-m", "oobwatch.cli", "--config", str(config), "doctor", "--json"]
    result = subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=120, check=False
    )
    return result.returncode, json.loads(result.stdout)


def by_name(checks: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {str(check["check"]): check for check in checks}


def test_a_delegated_running_node_passes_and_a_broken_delegation_fails(
    tmp_path: Path, parent: Parent, receiver: Receiver
) -> None:
    ports = {name: free_port() for name in ("dns", "smtp", "http", "api")}
    config = node_config(tmp_path, receiver.url("json", "/page"), node="ns1")
    text = config.read_text()
    for name, port in ports.items():
        text = text.replace(f"[{name}]\n", f"[{name}]\nport = {port}\n", 1)
    config.write_text(text.replace("port = 0\n", ""))
    glue = "canary IN NS ns1.canary\nns1.canary IN A 127.0.0.1\n"
    parent.serve(glue)
    node = Serving(config).start()
    try:
        resolver = f"127.0.0.1:{parent.port}"
        code, checks = doctor(config, "--resolver", resolver, "--send-test-page")
        found = by_name(checks)
        assert code == 0, checks
        assert all(set(check) == {"check", "ok", "detail"} for check in checks)
        for name, port in ports.items():
            assert found[f"listen {name} tcp 127.0.0.1:{port}"]["detail"] == "in use, answering"
        assert found[f"listen dns udp 127.0.0.1:{ports['dns']}"]["ok"] is True
        assert "ns1.canary.example.test 127.0.0.1" in str(found["delegation"]["detail"])
        assert found["glue"]["ok"] is True
        assert found["schema"]["ok"] is True
        assert found["spool"]["ok"] is True
        assert found["test page default/apprise:0"]["detail"] == "delivered"
        assert any(b"test page" in r.body for r in receiver.requests)

        # Delegated elsewhere: the node is not among the zone's servers.
        parent.serve("canary IN NS ns1.canary\nns1.canary IN A 192.0.2.53\n")
        code, checks = doctor(config, "--resolver", resolver)
        assert code == 1
        assert by_name(checks)["delegation"]["ok"] is False
        assert "none is this node's (127.0.0.1)" in str(by_name(checks)["delegation"]["detail"])

        # Not delegated at all.
        parent.serve("")
        code, checks = doctor(config, "--resolver", resolver)
        assert code == 1
        assert "not delegated" in str(by_name(checks)["delegation"]["detail"])
    finally:
        node.stop()


def test_what_doctor_finds_wrong_without_a_node(
    tmp_path: Path, parent: Parent, receiver: Receiver
) -> None:
    parent.serve("canary IN NS ns1.canary\nns1.canary IN A 127.0.0.1\n")
    config = node_config(tmp_path, receiver.url("json", "/page"))
    resolver = f"127.0.0.1:{parent.port}"
    # A spool with events waiting: they are not in the ledger until a node replays them.
    spool = Spool(tmp_path / "oobwatch.db.n1.spool", 1024 * 1024)
    spool.add([Event(type="hit", time_us=1, node="n1")])
    spool.close()
    code, checks = doctor(config, "--resolver", resolver)
    found = by_name(checks)
    assert code == 1
    assert found["spool"]["ok"] is False
    assert "1 events" in str(found["spool"]["detail"])
    # The store was never migrated: doctor says so rather than migrating it.
    assert found["schema"]["ok"] is False
    assert "oobwatch migrate" in str(found["schema"]["detail"])
    # A config that does not load is one failing check, named.
    config.write_text(config.read_text().replace('zone = "canary.example.test"', "zone = 5"))
    code, checks = doctor(config, "--resolver", resolver)
    assert code == 1
    assert checks[0]["check"] == "config"
    assert checks[0]["ok"] is False
    assert "dns.zone" in str(checks[0]["detail"])


def test_a_clock_behind_the_ledger_fails(tmp_path: Path, parent: Parent) -> None:
    parent.serve("canary IN NS ns1.canary\nns1.canary IN A 127.0.0.1\n")
    ahead = Event(type="hit", time_us=now_us() + 3_600_000_000, node="elsewhere")
    config, engine = store_with(tmp_path, [ahead], "[dns]\nzone = 'canary.example.test'\n")
    engine.dispose()
    code, checks = doctor(config, "--resolver", f"127.0.0.1:{parent.port}")
    clock = by_name(checks)["clock"]
    assert code == 1
    assert clock["ok"] is False
    assert "behind" in str(clock["detail"])
