"""Alert policy, pure: which routes a hit pages, which ignore rule (if any) suppresses it.

Every route whose match fits a hit fires (not only the first), because
routes usually mean different audiences (on-call, the owning team, a SIEM
webhook) and a hit that concerns two of them should reach both. A hit that
matches no route goes to the default route, `[alerts] urls`.
"""

import fnmatch
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from store.ledger import Entry

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_ROUTE = "default"


@dataclass(frozen=True, slots=True)
class Facts:
    """What routing and ignore rules look at in a hit."""

    canary_id: str
    sandbox: str
    kind: str
    severity: str
    labels: Mapping[str, str]
    protocol: str
    source_ip: str | None
    user_agent: str | None

    @classmethod
    def of(cls, entry: Entry) -> "Facts":
        data = entry.evidence
        host = entry.source_ip
        return cls(
            canary_id=entry.canary_id or "",
            sandbox=entry.sandbox or "",
            kind=str(data.get("kind", "")),
            severity=str(data.get("severity", "")),
            labels={str(k): str(v) for k, v in dict(data.get("labels") or {}).items()},
            protocol=entry.protocol or "",
            source_ip=host,
            user_agent=data.get("user_agent"),
        )


@dataclass(frozen=True, slots=True)
class Match:
    """Conditions a route matches on; an empty condition matches anything."""

    severity: tuple[str, ...] = ()
    sandbox: tuple[str, ...] = ()
    kind: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def fits(self, facts: Facts) -> bool:
        return (
            (not self.severity or facts.severity in self.severity)
            and (
                not self.sandbox or any(fnmatch.fnmatchcase(facts.sandbox, p) for p in self.sandbox)
            )
            and (not self.kind or facts.kind in self.kind)
            and all(facts.labels.get(key) == value for key, value in self.labels.items())
        )


@dataclass(frozen=True, slots=True)
class Sink:
    """One place a route delivers to; `key` names it within its route."""

    key: str
    kind: str  # "apprise", "pagerduty" or "webhook"
    url: str
    secret: str = ""


@dataclass(frozen=True, slots=True)
class Route:
    """A named set of sinks, what it matches, and whom it escalates to."""

    name: str
    sinks: tuple[Sink, ...]
    match: Match | None = None
    escalate_after_us: int | None = None
    escalate_to: str | None = None


@dataclass(frozen=True, slots=True)
class IgnoreRule:
    """Hits that match every given condition are recorded but do not page, until `expires_us`."""

    reason: str
    cidr: IpNetwork | None = None
    protocol: str | None = None
    user_agent: re.Pattern[str] | None = None
    expires_us: int | None = None

    def suppresses(self, facts: Facts, now_us: int) -> bool:
        if self.expires_us is not None and now_us >= self.expires_us:
            return False
        if self.protocol is not None and facts.protocol != self.protocol:
            return False
        if self.cidr is not None:
            try:
                if ipaddress.ip_address(facts.source_ip or "") not in self.cidr:
                    return False
            except ValueError:
                return False
        return self.user_agent is None or bool(self.user_agent.search(facts.user_agent or ""))

    def describe(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "cidr": None if self.cidr is None else str(self.cidr),
            "protocol": self.protocol,
            "user_agent": None if self.user_agent is None else self.user_agent.pattern,
        }


@dataclass(frozen=True, slots=True)
class Policy:
    """Routes (the default one included) and ignore rules, validated at startup."""

    routes: Mapping[str, Route]
    ignore: Sequence[IgnoreRule] = ()

    def routes_for(self, facts: Facts) -> list[Route]:
        matched = [r for r in self.routes.values() if r.match is not None and r.match.fits(facts)]
        return matched or [self.routes[DEFAULT_ROUTE]]

    def suppressed_by(self, facts: Facts, now_us: int) -> IgnoreRule | None:
        return next((rule for rule in self.ignore if rule.suppresses(facts, now_us)), None)
