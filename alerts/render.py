"""Page text: one line saying what happened, then details, escaped for each sink's format.

Values the sandbox controlled (query names, mail addresses and subjects,
URLs, user agents, decoded data) are truncated and defanged in every format:
`@` and `<`/`>` are neutralised so they cannot mention a channel or user
(`@channel`, `<!here>`), and `://` and `.` are bracketed so no chat client
turns them into links. Then each format escapes its own syntax.
"""

import html
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from store import bursts
from store.clock import to_iso
from store.ledger import Entry

Format = Literal["text", "markdown", "html"]
LIMIT = 200

_ATTACKER_KEYS = (
    "qname",
    "qtype",
    "decoded",
    "rcpt",
    "mail_from",
    "helo",
    "subject",
    "method",
    "target",
    "host",
    "user_agent",
    "sni",
    "alpn",
    "ja4",
    "user",
    "database",
    "application_name",
    "provider",
    "endpoint",
)
_VERBS = {
    "dns": "DNS lookup of",
    "smtp": "Mail to",
    "http": "HTTP request for",
    "https": "HTTPS request for",
    "tls": "TLS connection to",
    "postgres": "PostgreSQL login with",
    "mcp": "MCP request to",
}
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|>~<])")


@dataclass(frozen=True, slots=True)
class Line:
    """One detail: a label, its value, and whether the sandbox controlled the value."""

    label: str
    value: str
    untrusted: bool = False


@dataclass(frozen=True, slots=True)
class Message:
    """A page before formatting."""

    title: str
    headline: str
    lines: list[Line] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "headline": self.headline,
            "lines": [[line.label, line.value, line.untrusted] for line in self.lines],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Message":
        lines = [Line(label, value, untrusted) for label, value, untrusted in data["lines"]]
        return cls(data["title"], data["headline"], lines)


def plural(count: int, noun: str) -> str:
    """`1 hit`, `2 hits`, `12,000 hits`."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def truncate(value: Any, limit: int = LIMIT) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else f"{text[:limit]}… (+{len(text) - limit} chars)"


def visible(text: str) -> str:
    """Control and other unprintable characters shown as escapes (`\\n`, `\\x1b`)."""
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def defang(text: str) -> str:
    """Neutralise mentions and links; make control characters visible."""
    return (
        visible(text)
        .replace("://", "[://]")
        .replace(".", "[.]")
        .replace("@", "[@]")
        .replace("<", "\u2039")  # single angle quotation marks: look alike, never markup
        .replace(">", "\u203a")
    )


def quote(value: Any, limit: int = LIMIT) -> str:
    """A sandbox-controlled value as it may appear in any page."""
    return defang(truncate(value, limit))


def for_hit(entry: Entry, alert_id: str, console_url: str | None = None) -> Message:
    """The first page of an alert: what happened, in one line, then the evidence, and where
    the console shows its incident when `console_url` (`[api] public_url`) is set."""
    data = entry.evidence
    protocol = entry.protocol or "?"
    where = f", planted at {data['location']}" if data.get("location") else ""
    source_ip = entry.source_ip or "?"
    if bursts.burst_of(data) is not None:
        headline = (
            f"Burst: {bursts.summary(entry.canary_id, data)} (sandbox {entry.sandbox}{where})"
        )
    elif data.get("trigger") == "leaked":
        headline = f"Token of canary {entry.canary_id} (sandbox {entry.sandbox}{where}) leaked in mail from {source_ip}"
    else:
        verb = _VERBS.get(protocol, f"{protocol.upper()} hit on")
        headline = (
            f"{verb} canary {entry.canary_id} (sandbox {entry.sandbox}{where}) from {source_ip}"
        )
    lines = [
        Line("alert", alert_id),
        Line("canary", f"{entry.canary_id} ({data.get('kind')}, severity {data.get('severity')})"),
        Line("labels", truncate(data.get("labels", {}))),
        Line("source", f"{entry.source_ip or ''} port {entry.source_port}"),
        Line("time", to_iso(entry.time_us)),
        Line("node", entry.node),
    ]
    lines += [Line(key, truncate(data[key]), True) for key in _ATTACKER_KEYS if data.get(key)]
    burst = bursts.burst_of(data)
    if burst is not None and burst.get("data"):
        carried = [sample.get("data") for sample in burst["data"] if isinstance(sample, dict)]
        lines.append(Line("data", truncate(carried), True))
    lines.append(Line("ledger", f"seq {entry.seq} hash {entry.hash[:16]}"))
    if console_url is not None:
        lines.append(Line("incident", f"{console_url}/ui/alerts/{alert_id}"))
    return Message(
        f"oobwatch: {protocol.upper()} canary hit, sandbox {entry.sandbox}", headline, lines
    )


def render(message: Message, fmt: Format) -> tuple[str, str]:
    """Title and body of `message` in `fmt`, every value escaped for it."""
    if fmt == "html":
        cell = _html
        body = (
            "<p><b>"
            + html.escape(message.headline)
            + "</b></p>\n<ul>\n"
            + "".join(
                f"<li>{html.escape(line.label)}: {cell(line)}</li>\n" for line in message.lines
            )
            + "</ul>"
        )
        return message.title, body
    if fmt == "markdown":
        body = f"**{_markdown(message.headline)}**\n\n" + "\n".join(
            f"- {_markdown(line.label)}: {_markdown_value(line)}" for line in message.lines
        )
        return message.title, body
    body = (
        message.headline
        + "\n\n"
        + "\n".join(
            f"{line.label}: {defang(line.value) if line.untrusted else line.value}"
            for line in message.lines
        )
    )
    return message.title, body


def _html(line: Line) -> str:
    return (
        "<code>" + html.escape(defang(line.value)) + "</code>"
        if line.untrusted
        else html.escape(line.value)
    )


def _markdown(text: str) -> str:
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _markdown_value(line: Line) -> str:
    return _markdown(defang(line.value)) if line.untrusted else _markdown(line.value)
