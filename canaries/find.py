"""Finding a token in what a sandbox sent out: plain functions over strings.

A DNS name, a mail domain or an HTTP Host carries a token at one position
only: the label directly under the zone apex (`<token>.<zone>`, with any
labels to its left, as in `x.y.<token>.<zone>`). Matching by position rather than by searching the
whole name means a token smuggled elsewhere in a junk name never matches,
and the answer to any name costs one dictionary lookup. Free text (a mail
body, a header, a query string, a secret) is scanned instead, for well-formed
tokens that stand alone. Whether a candidate is a token is the index's call:
only it holds the key that checks them, and the canaries minted before checks
were keyed.
"""

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote_plus


@dataclass(frozen=True, slots=True)
class NameMatch:
    """A name under the zone: the label where a token would be, and the labels left of it."""

    candidate: str
    left: tuple[str, ...]


def split_name(name: str) -> tuple[str, ...]:
    """Lowercase labels of a dotted name, ignoring a trailing dot."""
    return tuple(name.rstrip(".").lower().split(".")) if name.strip(".") else ()


APEX = NameMatch("", ())


def locate(labels: tuple[str, ...], zone: tuple[str, ...]) -> NameMatch | None:
    """Where a lowercase name sits: None outside `zone`, APEX for the apex itself."""
    depth = len(zone)
    position = len(labels) - depth - 1
    if position < -1 or labels[position + 1 :] != zone:
        return None
    if position == -1:
        return APEX
    return NameMatch(labels[position], tuple(labels[:position]))


@dataclass(frozen=True, slots=True)
class AddressMatch:
    """Where a mail address under the zone would carry a token."""

    candidate: str
    form: str  # "local" for <token>@<zone>, "domain" for anything@...<token>.<zone>


def in_address(address: str, zone: tuple[str, ...]) -> AddressMatch | None:
    """The token position of `address`: its local part at the apex, else its domain."""
    local, at, domain = address.strip().strip("<>").rpartition("@")
    if not at or not local:
        return None
    match = locate(split_name(domain), zone)
    if match is None:
        return None
    if match is APEX:
        return AddressMatch(local.lower(), "local")
    return AddressMatch(match.candidate, "domain")


def in_domains(domain: str, domains: tuple[tuple[str, ...], ...]) -> bool:
    """True when `domain` is one of `domains` or a name under one of them."""
    labels = split_name(domain)
    return any(locate(labels, parent) is not None for parent in domains)


# Tokens in free text (bodies, headers, URLs, secrets) must stand alone: the
# characters either side may not be base32, so no window of a longer random
# string is mistaken for one.
_TOKEN_IN_TEXT = re.compile(r"(?<![a-z2-7])[a-z2-7]{26}(?![a-z2-7])")


def scan(text: str) -> set[str]:
    """Every well-formed token standing alone anywhere in `text`, lowercased."""
    return set(_TOKEN_IN_TEXT.findall(text.lower()))


def in_host(host: str, zone: tuple[str, ...]) -> str | None:
    """The candidate token of an HTTP Host header value (port and brackets ignored)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    match = locate(split_name(name), zone)
    return None if match is None or match is APEX else match.candidate


def basic_credentials(value: str) -> str:
    """The user:password of a Basic Authorization value, decoded; '' if it is not one."""
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        return base64.b64decode(encoded.strip() + "==", validate=False).decode("utf-8", "replace")
    except ValueError:
        return ""


def in_request(
    host: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body_head: str,
    zone: tuple[str, ...],
) -> dict[str, list[str]]:
    """Every token in an HTTP request, each with where it was seen.

    The Host is matched by position; the path and query (percent-decoded),
    every header (Authorization Basic decoded too) and the start of the body
    are scanned.
    """
    found: dict[str, list[str]] = {}

    def note(tokens: set[str], where: str) -> None:
        for token in tokens:
            found.setdefault(token, []).append(where)

    candidate = in_host(host, zone)
    if candidate is not None:
        note({candidate}, "host")
    path, _, query = target.partition("?")
    note(scan(unquote_plus(path)), "path")
    note(scan(unquote_plus(query)), "query")
    for name, value in headers:
        lowered = name.lower()
        if lowered == "host":
            continue
        note(scan(value) | scan(basic_credentials(value)), f"header:{lowered}")
    note(scan(body_head), "body")
    return found
