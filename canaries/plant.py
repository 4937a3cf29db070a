"""Planting a sandbox: a realistic bundle of canaries written where such files really live.

Files are created exclusively, never overwritten: a path that already exists,
whoever wrote it, is skipped, and no canary is minted for it. Running plant
twice into the same directory therefore leaves everything in place.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from canaries import kinds
from canaries.mint import mint
from canaries.model import Canary
from canaries.tokens import new_token

BUNDLE = (
    "netrc",
    "git-credentials",
    "pgpass",
    "aws",
    "kubeconfig",
    "ssh-config",
    "docker-config",
    "env",
    "mcp",
)
CONTACTS = "project/CONTACTS.md"


@dataclass(frozen=True, slots=True)
class Planted:
    """What one plant run minted and wrote, and which paths it left alone."""

    canaries: list[Canary] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def plant(
    engine: Engine,
    *,
    into: Path,
    sandbox: str,
    zone: str,
    node: str,
    http_port: int,
    labels: Mapping[str, str] | None = None,
) -> Planted:
    """Mint the bundle for `sandbox` and write it under `into`."""
    result = Planted()
    for fmt in BUNDLE:
        paths = list(kinds.credential(fmt, new_token(), zone, http_port).files)
        taken = [path for path in paths if (into / path).exists()]
        if taken:
            result.skipped.extend(taken)
            continue
        canary = mint(
            engine,
            kind="credential",
            fmt=fmt,
            zone=zone,
            sandbox=sandbox,
            node=node,
            location=paths[0],
            labels=labels,
            http_port=http_port,
        )
        for path, text in canary.files.items():
            _write(into, path, text)
        result.canaries.append(canary)
    if (into / CONTACTS).exists():
        result.skipped.append(CONTACTS)
        return result

    def contact(kind: str) -> Canary:
        return mint(
            engine,
            kind=kind,
            zone=zone,
            sandbox=sandbox,
            node=node,
            location=CONTACTS,
            labels=labels,
            http_port=http_port,
        )

    escalation, runbook = contact("email"), contact("url")
    _write(
        into,
        CONTACTS,
        "# Contacts\n\n"
        "Production incidents: page the on-call rotation, then mail the escalation list.\n\n"
        f"- Escalation: {escalation.value}\n"
        f"- Runbook: {runbook.value}\n",
    )
    result.canaries.extend([escalation, runbook])
    return result


def _write(into: Path, relative: str, text: str) -> None:
    path = into / relative
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # "x": never replace a file, even one created since the existence check.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
