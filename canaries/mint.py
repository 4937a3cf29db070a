"""Minting: a new token, its planted value, its row and its ledger event in one transaction."""

import secrets
from collections.abc import Mapping

from sqlalchemy import Engine

from canaries.model import Canary
from canaries.tokens import new_token
from store import ledger, registry
from store.clock import now_us


def dns_name(token: str, zone: str) -> str:
    return f"{token}.{zone}"


def mint(
    engine: Engine,
    *,
    kind: str,
    zone: str,
    sandbox: str,
    node: str,
    location: str = "",
    labels: Mapping[str, str] | None = None,
    severity: str = "high",
    note: str = "",
) -> Canary:
    """Create and record one canary of `kind` for `sandbox`."""
    if kind != "dns":
        raise ValueError(f"minting {kind!r} canaries is not supported yet")
    token = new_token()
    canary = Canary(
        id="cn-" + secrets.token_hex(6),
        token=token,
        kind=kind,
        value=dns_name(token, zone),
        sandbox=sandbox,
        location=location,
        labels=dict(labels or {}),
        severity=severity,
        note=note,
        created_us=now_us(),
    )
    minted = ledger.Event(
        type="canary_minted",
        time_us=canary.created_us,
        node=node,
        canary_id=canary.id,
        sandbox=sandbox,
        data={
            "kind": kind,
            "value": canary.value,
            "location": location,
            "labels": dict(canary.labels),
            "severity": severity,
        },
    )
    with engine.begin() as connection:
        # The ledger append goes first: it takes the write lock before anything is read.
        ledger.append(connection, [minted])
        registry.insert(connection, canary.as_row())
    return canary
