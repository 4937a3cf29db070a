"""Minting: a new token, what to plant, its row and its ledger event in one transaction.

Tokens are checked under the deployment's token key, which lives in the store
so that every node minting into it, and every listener reading it, agree.
"""

import secrets
from collections.abc import Mapping

from sqlalchemy import Engine

from canaries import kinds
from canaries.model import HEARTBEAT_SANDBOX, Canary
from canaries.tokens import TokenKey, new_token
from store import deployment, ledger, registry
from store.clock import now_us

# The name the token key is kept under among the store's deployment secrets.
KEY_NAME = "token-key"


def token_key(engine: Engine) -> TokenKey:
    """This deployment's token key, made by the first node that asks for it."""
    return TokenKey(deployment.secret(engine, KEY_NAME))


def plan(
    kind: str, token: str, zone: str, *, web: kinds.Web, fmt: str | None, scheme: str | None = None
) -> kinds.Planting:
    """What to plant for a canary of `kind` with `token`."""
    if fmt is not None and kind != "credential":
        raise ValueError("--format applies to credential canaries only")
    if scheme is not None and kind != "url":
        raise ValueError("--scheme applies to url canaries only")
    if kind == "dns":
        return kinds.dns(token, zone)
    if kind == "email":
        return kinds.email(token, zone)
    if kind == "url":
        return kinds.url(token, zone, web, scheme or "http")
    if kind == "credential":
        if fmt is None:
            raise ValueError("credential canaries need a format")
        return kinds.credential(fmt, token, zone, web)
    raise ValueError(f"unknown canary kind {kind!r}")


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
    fmt: str | None = None,
    web: kinds.Web | None = None,
    scheme: str | None = None,
    heartbeat: bool = False,
) -> Canary:
    """Create and record one canary of `kind` for `sandbox`."""
    if not sandbox.strip():
        raise ValueError("a canary needs a sandbox name (it is what incidents group by)")
    if (sandbox == HEARTBEAT_SANDBOX) != heartbeat:
        raise ValueError(f"sandbox {HEARTBEAT_SANDBOX!r} is reserved for the built-in self-test")
    token = new_token(token_key(engine))
    planting = plan(kind, token, zone, web=web or kinds.Web(), fmt=fmt, scheme=scheme)
    canary = Canary(
        id="cn-" + secrets.token_hex(6),
        token=token,
        kind=kind,
        value=planting.value,
        sandbox=sandbox,
        location=location,
        labels=dict(labels or {}),
        severity=severity,
        note=note,
        created_us=now_us(),
        format=planting.format,
        path_hint=planting.path_hint,
        files=planting.files,
    )
    minted = ledger.Event(
        type="canary_minted",
        time_us=canary.created_us,
        node=node,
        canary_id=canary.id,
        sandbox=sandbox,
        data={
            "kind": kind,
            "format": planting.format,
            "value": canary.value if kind != "credential" else planting.path_hint,
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


def retire(engine: Engine, canary_id: str, *, node: str, by: str) -> tuple[Canary, bool] | None:
    """Retire a canary once: it stays known, and a hit on it still records and pages.

    Returns the canary and whether it was retired already (then nothing
    changes and nothing is recorded), or None if there is no such canary.
    """
    moment = now_us()
    with engine.begin() as connection:
        found = registry.retire(connection, canary_id, moment)
        if found is None:
            return None
        row, already = found
        if not already:
            ledger.append(
                connection,
                [
                    ledger.Event(
                        "canary_retired", moment, node, canary_id, row["sandbox"], data={"by": by}
                    )
                ],
            )
    return Canary.from_row(row), already
