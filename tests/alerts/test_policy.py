import ipaddress
import re

import pytest

from alerts.policy import DEFAULT_ROUTE, Facts, IgnoreRule, Match, Policy, Route, Sink
from store.ledger import Entry

NOW = 1_800_000_000_000_000


def facts(**overrides: object) -> Facts:
    values: dict[str, object] = {
        "canary_id": "cn-1",
        "sandbox": "prod-eu1",
        "kind": "credential",
        "severity": "high",
        "labels": {"team": "evals", "env": "prod"},
        "protocol": "http",
        "source_ip": "192.0.2.44",
        "user_agent": "Mozilla/5.0 SafeLinks",
    }
    return Facts(**(values | overrides))  # type: ignore[arg-type]


SINK = (Sink("apprise:0", "apprise", "json://x"),)
POLICY = Policy(
    {
        DEFAULT_ROUTE: Route(DEFAULT_ROUTE, SINK),
        "oncall": Route("oncall", SINK, Match(severity=("high", "critical"), sandbox=("prod-*",))),
        "evals": Route(
            "evals", SINK, Match(labels={"team": "evals"}, kind=("credential", "email"))
        ),
        "dns-only": Route("dns-only", SINK, Match(kind=("dns",))),
    }
)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, ["oncall", "evals"]),
        ({"severity": "low"}, ["evals"]),
        ({"sandbox": "staging-1"}, ["evals"]),
        ({"kind": "dns", "labels": {}}, ["oncall", "dns-only"]),
        ({"kind": "url", "labels": {}, "severity": "low"}, [DEFAULT_ROUTE]),
    ],
)
def test_every_matching_route_fires_else_the_default(
    overrides: dict[str, object], expected: list[str]
) -> None:
    assert [route.name for route in POLICY.routes_for(facts(**overrides))] == expected


@pytest.mark.parametrize(
    ("rule", "overrides", "suppressed"),
    [
        (IgnoreRule("scanner", cidr=ipaddress.ip_network("192.0.2.0/24")), {}, True),
        (IgnoreRule("scanner", cidr=ipaddress.ip_network("198.51.100.0/24")), {}, False),
        (
            IgnoreRule("scanner", cidr=ipaddress.ip_network("192.0.2.0/24")),
            {"source_ip": None},
            False,
        ),
        (IgnoreRule("links", protocol="http", user_agent=re.compile("(?i)safelinks")), {}, True),
        (IgnoreRule("links", protocol="dns", user_agent=re.compile("(?i)safelinks")), {}, False),
        (IgnoreRule("links", user_agent=re.compile("(?i)safelinks")), {"user_agent": None}, False),
        (IgnoreRule("old", protocol="http", expires_us=NOW), {}, False),
        (IgnoreRule("current", protocol="http", expires_us=NOW + 1), {}, True),
    ],
)
def test_ignore_rules(rule: IgnoreRule, overrides: dict[str, object], suppressed: bool) -> None:
    policy = Policy(POLICY.routes, [rule])
    assert (policy.suppressed_by(facts(**overrides), NOW) is rule) is suppressed


def test_facts_from_a_hit_entry() -> None:
    entry = Entry(
        1,
        NOW,
        "hit",
        "cn-9",
        "sbx",
        "smtp",
        "[2001:db8::1]:25",
        "n",
        '{"kind": "email", "severity": "critical", "labels": {"a": "b"}}',
        "0" * 64,
        "f" * 64,
    )
    assert Facts.of(entry) == Facts(
        "cn-9", "sbx", "email", "critical", {"a": "b"}, "smtp", "2001:db8::1", None
    )
