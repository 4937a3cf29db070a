"""Planting a sandbox: a realistic bundle of canaries written where such files really live.

Minting a bundle and writing it are apart, so a bundle minted on a remote
node is written by the same code as a local one. The caller says which
paths are present already: no canary is minted for them. Files are created
exclusively, never overwritten, so a path that appeared meanwhile is skipped
too. Running plant twice into the same directory leaves everything in place.
"""

import contextlib
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine

from canaries import kinds
from canaries.kinds import Web
from canaries.mint import mint
from canaries.model import Canary
from canaries.tokens import TOKEN_LENGTH

BUNDLE = (
    "netrc",
    "git-credentials",
    "pgpass",
    "aws",
    "kubeconfig",
    "ssh-key",
    "docker-config",
    "env",
    "mcp",
    "openai",
    "anthropic",
    "github",
)
CONTACTS = "project/CONTACTS.md"


@dataclass(frozen=True, slots=True)
class Planted:
    """What one plant run minted, the files to write, and which paths it left alone."""

    canaries: list[Canary] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def _paths(fmt: str) -> list[str]:
    """Where a credential format's files live, which does not depend on the token, zone or port."""
    return list(kinds.credential(fmt, "a" * TOKEN_LENGTH, "example.invalid", Web()).files)


def bundle_paths() -> list[str]:
    """Every path a bundle may write, relative to the home directory it is planted in."""
    return [*(path for fmt in BUNDLE for path in _paths(fmt)), CONTACTS]


def present_in(into: Path, paths: Iterable[str]) -> list[str]:
    return [path for path in paths if (into / path).exists()]


def plant(
    engine: Engine,
    *,
    sandbox: str,
    zone: str,
    node: str,
    web: Web,
    labels: Mapping[str, str] | None = None,
    present: Collection[str] = (),
) -> Planted:
    """Mint the bundle for `sandbox`, leaving out every file whose path is `present`."""
    result = Planted()
    for fmt in BUNDLE:
        paths = _paths(fmt)
        taken = [path for path in paths if path in present]
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
            web=web,
        )
        result.files.update(canary.files)
        result.canaries.append(canary)
    if CONTACTS in present:
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
            web=web,
        )

    escalation, runbook = contact("email"), contact("url")
    result.files[CONTACTS] = (
        "# Contacts\n\n"
        "Production incidents: page the on-call rotation, then mail the escalation list.\n\n"
        f"- Escalation: {escalation.value}\n"
        f"- Runbook: {runbook.value}\n"
    )
    result.canaries.extend([escalation, runbook])
    return result


def write(into: Path, files: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """Create each file under `into` (mode 0600), never replacing one; (written, skipped).

    A bundle from a remote node is data: a path that would leave `into` (`..`,
    absolute, through a symlink, even one swapped in meanwhile) or that cannot
    be created is skipped, and the others are still written.
    """
    written, skipped = [], []
    into.mkdir(parents=True, exist_ok=True)
    root = os.open(into, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for relative, text in files.items():
            parts = Path(relative).parts
            if not parts or Path(relative).is_absolute() or ".." in parts:
                skipped.append(relative)
                continue
            try:
                _create(root, parts, text)
            except (OSError, ValueError):
                skipped.append(relative)
                continue
            written.append(relative)
    finally:
        os.close(root)
    return written, skipped


def _create(root: int, parts: tuple[str, ...], text: str) -> None:
    """Walk down from the directory `root` without following any link, then create the file."""
    directory = os.dup(root)
    try:
        for part in parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=directory)
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
            os.close(directory)
            directory = inner
        # O_EXCL: never replace a file, even one created since the caller looked.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        descriptor = os.open(parts[-1], flags, 0o600, dir_fd=directory)
    finally:
        os.close(directory)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
