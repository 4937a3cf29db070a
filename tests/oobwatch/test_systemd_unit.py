"""The systemd unit stays hardened: systemd's own audit of it, offline."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).parents[2] / "deploy" / "systemd" / "oobwatch.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing")
def test_systemd_rates_the_unit_ok() -> None:
    audit = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(
        r"Overall exposure level for oobwatch\.service: ([0-9.]+) (\w+)", audit.stdout
    )
    assert found is not None, audit.stdout + audit.stderr
    assert float(found.group(1)) <= 2.0
    assert found.group(2) == "OK"
    text = UNIT.read_text()
    for setting in (
        "DynamicUser=yes",
        "StateDirectory=oobwatch",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ):
        assert setting in text.splitlines()
