"""Saved ledger heads kept outside the database: an append-only file of JSON lines.

Whoever can rewrite the database can recompute every hash in it; they
cannot also rewrite copies of the head that were sent elsewhere. A chain
that was truncated and rebuilt no longer contains the saved heads.
"""

import json
import os
from pathlib import Path

from store.clock import to_iso


def save(path: Path, seq: int, digest: str, node: str, time_us: int) -> None:
    """Append one head, flushed to disk before returning."""
    line = json.dumps({"seq": seq, "hash": digest, "node": node, "time": to_iso(time_us)})
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def load(path: Path) -> list[tuple[int, str]]:
    """Every saved (seq, hash); raises ValueError naming a malformed line."""
    heads = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            saved = json.loads(line)
            heads.append((int(saved["seq"]), str(saved["hash"])))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} line {number} is not a saved head: {error}") from None
    return heads
