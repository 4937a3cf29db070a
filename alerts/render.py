"""Page text for a hit. Everything the sandbox controlled is quoted and truncated."""

import json
from typing import Any

from store.clock import to_iso
from store.ledger import Entry

LIMIT = 200

_EVIDENCE_KEYS = (
    "qname",
    "qtype",
    "transport",
    "decoded",
    "trigger",
    "rcpt",
    "mail_from",
    "helo",
    "subject",
    "method",
    "target",
    "user_agent",
    "found_in",
)


def quote(value: Any, limit: int = LIMIT) -> str:
    """A JSON string literal: control characters escaped, non-ASCII as \\u, cut at `limit`."""
    text = str(value)
    if len(text) > limit:
        return json.dumps(text[:limit]) + f" (+{len(text) - limit} chars)"
    return json.dumps(text)


def title(entry: Entry) -> str:
    protocol = (entry.protocol or "?").upper()
    return f"oobwatch: {protocol} hit on canary {entry.canary_id} (sandbox {quote(entry.sandbox)})"


def body(entry: Entry) -> str:
    data = entry.evidence
    lines = [
        f"canary: {entry.canary_id}",
        f"kind: {data.get('kind')}",
        f"sandbox: {quote(entry.sandbox)}",
        f"location: {quote(data.get('location', ''))}",
        f"labels: {quote(json.dumps(data.get('labels', {}), sort_keys=True))}",
        f"source: {quote(entry.source)}",
        f"time: {to_iso(entry.time_us)}",
        f"node: {quote(entry.node)}",
    ]
    lines += [f"{key}: {quote(data[key])}" for key in _EVIDENCE_KEYS if data.get(key) is not None]
    lines.append(f"ledger: seq {entry.seq} hash {entry.hash[:16]}")
    return "\n".join(lines)
