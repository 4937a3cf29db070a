"""An aggregate hit: one ledger row that accounts for many hits of one canary.

Past a threshold, a burst of one canary's hits is recorded as aggregate rows
(type `hit`, with a `burst` object in the data) instead of a row per hit. A
row says how many hits it counts, when, from which sources, over which
protocols, and the data they carried up to a bound, with running totals of
the whole burst. Everything that counts hits counts an aggregate as its
`count`; this module is the one place that reads the format.
"""

from collections.abc import Mapping
from typing import Any

KEY = "burst"
# The aggregate marker as it appears in a row's canonical JSON: a key the listeners set,
# never a string from the sandbox (whose quotes canonical JSON escapes).
MARKER = '"burst":{'
_NOUNS = {"dns": "lookups", "http": "requests", "smtp": "messages"}


def burst_of(data: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The aggregate part of a hit's data, or None for a single hit."""
    burst = data.get(KEY)
    return burst if isinstance(burst, Mapping) else None


def hits_in(data: Mapping[str, Any]) -> int:
    """How many hits a hit row accounts for: 1, or an aggregate's count."""
    burst = burst_of(data)
    if burst is None:
        return 1
    count = burst.get("count")
    return count if isinstance(count, int) and count >= 0 else 0


def sources_of(data: Mapping[str, Any]) -> list[str]:
    """The source addresses an aggregate lists by name."""
    burst = burst_of(data) or {}
    return [str(source) for source in burst.get("sources") or {}]


def protocols_of(data: Mapping[str, Any]) -> list[str]:
    burst = burst_of(data) or {}
    return [str(protocol) for protocol in burst.get("protocols") or {}]


def facts_of(data: Mapping[str, Any]) -> list[tuple[str, str, str]] | None:
    """Every (source, protocol, user agent) an aggregate counts; [] when it counted more
    than it could list; None for a single hit."""
    burst = burst_of(data)
    if burst is None:
        return None
    if burst.get("other_facts"):
        return []
    listed = burst.get("facts") or []
    return [(str(fact[0]), str(fact[1]), str(fact[2])) for fact in listed if len(fact) == 4]


def summary(canary_id: str | None, data: Mapping[str, Any]) -> str:
    """One line for a burst so far, from the running totals of its latest row."""
    burst = burst_of(data) or {}
    total: Mapping[str, Any] = burst.get("total") or {}
    protocols = list(burst.get("protocols") or {})
    noun = _NOUNS.get(protocols[0], "hits") if len(protocols) == 1 else "hits"
    hits = int(total.get("hits", 0))
    sources = int(total.get("sources", 0))
    span = max(0, int(burst.get("last_us", 0)) - int(total.get("first_us", 0))) / 1e6
    text = (
        f"{hits:,} {noun} of canary {canary_id} from {sources:,} "
        f"source{'' if sources == 1 else 's'} in {span:,.1f} s"
    )
    carried = int(total.get("data_bytes", 0))
    if carried:
        text += f"; {size(carried)} of data, first {size(int(total.get('kept_bytes', 0)))} kept"
    return text


def size(count: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
