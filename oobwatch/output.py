"""Rendering canaries and ledger entries as JSON, CSV and terminal tables.

Everything a sandbox controlled may be in these values, so CSV cells that a
spreadsheet would run as a formula are neutralised, and table cells show
control characters escaped and rich markup as literal text.
"""

import csv
import io
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from canaries.model import Canary
from store.clock import from_iso, to_iso
from store.ledger import Entry
from store.timeline import Incident

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

TIMELINE_COLUMNS = (
    "seq",
    "time",
    "type",
    "canary_id",
    "sandbox",
    "protocol",
    "source",
    "node",
    "kind",
    "location",
    "qname",
    "qtype",
    "left_labels",
    "decoded",
    "detail",
    "hash",
)


def canary_json(canary: Canary) -> dict[str, Any]:
    return {
        "id": canary.id,
        "token": canary.token,
        "kind": canary.kind,
        "value": canary.value,
        "sandbox": canary.sandbox,
        "location": canary.location,
        "labels": dict(canary.labels),
        "severity": canary.severity,
        "note": canary.note,
        "created_at": to_iso(canary.created_us),
        "expires_at": None if canary.expires_us is None else to_iso(canary.expires_us),
        "retired_at": None if canary.retired_us is None else to_iso(canary.retired_us),
        "format": canary.format or None,
        "path_hint": canary.path_hint or None,
        "files": dict(canary.files) or None,
    }


def alert_json(alert: Mapping[Any, Any]) -> dict[str, Any]:
    def when(value: int | None) -> str | None:
        return None if value is None else to_iso(value)

    return {
        "id": alert["id"],
        "status": alert["status"],
        "canary_id": alert["canary_id"],
        "sandbox": alert["sandbox"],
        "routes": json.loads(alert["routes"]),
        "hit_count": alert["hit_count"],
        "sources": json.loads(alert["sources"]),
        "protocols": json.loads(alert["protocols"]),
        "opened_at": when(alert["opened_us"]),
        "last_hit_at": when(alert["last_hit_us"]),
        "acked_by": alert["acked_by"],
        "acked_at": when(alert["acked_us"]),
        "resolved_at": when(alert["resolved_us"]),
        "escalated_at": when(alert["escalated_us"]),
    }


def event_json(entry: Entry) -> dict[str, Any]:
    """One timeline event: the ledger columns with its evidence lifted to the top level."""
    event: dict[str, Any] = {
        "seq": entry.seq,
        "time": to_iso(entry.time_us),
        "type": entry.type,
        "canary_id": entry.canary_id,
        "sandbox": entry.sandbox,
        "protocol": entry.protocol,
        "source": entry.source,
        "node": entry.node,
    }
    for key, value in entry.evidence.items():
        event.setdefault(key, value)
    event["hash"] = entry.hash
    return event


def entry_from_event(event: dict[str, Any]) -> Entry:
    """An entry back from `event_json` output (for display: the hash fields are not rechecked)."""
    columns = ("seq", "time", "type", "canary_id", "sandbox", "protocol", "source", "node", "hash")
    evidence = {key: value for key, value in event.items() if key not in columns}
    return Entry(
        event["seq"],
        from_iso(event["time"]),
        event["type"],
        event.get("canary_id"),
        event.get("sandbox"),
        event.get("protocol"),
        event.get("source"),
        event.get("node", ""),
        json.dumps(evidence),
        "",
        event.get("hash", ""),
    )


def spreadsheet_safe(value: Any) -> str:
    """A CSV cell that no spreadsheet will evaluate."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return "'" + text if text.startswith(_FORMULA_START) else text


def timeline_csv(entries: Iterable[Entry], header: bool = True) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(TIMELINE_COLUMNS)
    for entry in entries:
        event = event_json(entry)
        detail = {key: value for key, value in event.items() if key not in TIMELINE_COLUMNS}
        event["detail"] = detail or None
        writer.writerow([spreadsheet_safe(event.get(column)) for column in TIMELINE_COLUMNS])
    return out.getvalue()


def terminal_safe(value: Any) -> Text:
    """Literal text for a table cell: no markup, control characters escaped."""
    if value is None:
        return Text("")
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    escaped = "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )
    return Text(escaped)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A table that folds long cells rather than cutting them: ids and names must stay whole."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(terminal_safe(cell) for cell in row))
    # Piped output has no terminal width to fit; keep rows on one line for grep.
    Console(width=None if sys.stdout.isatty() else 240).print(table)


def detail(entry: Entry) -> str:
    """One line saying what an entry is about, from its evidence."""
    data = entry.evidence
    if entry.type == "hit" and entry.protocol == "dns":
        text = f"{data.get('qtype', '')} {data.get('qname', '')}"
        return text + (f" decoded={data['decoded']!r}" if data.get("decoded") else "")
    if entry.type == "hit" and entry.protocol == "smtp":
        if data.get("trigger") == "leaked":
            return f"token leaked in mail {data.get('subject', '')!r}"
        return f"RCPT {data.get('rcpt', '')} from {data.get('mail_from', '')}"
    if entry.type == "hit" and entry.protocol == "http":
        return f"{data.get('method', '')} {data.get('target', '')} (in {', '.join(data.get('found_in', []))})"
    if entry.type == "evidence":
        return f"mail {data.get('subject', '')!r}, {data.get('size', 0)} bytes"
    if entry.type in ("alert_sent", "alert_failed"):
        text = f"{data.get('purpose')} via {data.get('route')}/{data.get('target')}, attempt {data.get('attempt')}"
        return text + (f": {data['error']}" if data.get("error") else "")
    if entry.type == "alert_opened":
        return f"alert {data.get('alert_id')} to {', '.join(data.get('routes', []))}"
    if entry.type.startswith("alert_"):
        extra = {key: value for key, value in data.items() if key != "alert_id"}
        return f"alert {data.get('alert_id')} {json.dumps(extra, sort_keys=True)}"
    if entry.type == "suppressed":
        return f"hit {data.get('hit_seq')} not paged: {data.get('reason')}"
    if entry.type.startswith("heartbeat_"):
        return f"{data.get('listener')} listener"
    return str(data.get("value", ""))


def timeline_rows(entries: Iterable[Entry]) -> Iterable[list[Any]]:
    for entry in entries:
        yield [
            to_iso(entry.time_us),
            entry.type,
            entry.canary_id,
            entry.sandbox,
            entry.protocol,
            entry.source,
            detail(entry),
        ]


TABLE_COLUMNS = ("time", "type", "canary", "sandbox", "protocol", "source", "detail")


def print_timeline(entries: Sequence[Entry], fmt: str, stream: bool, header: bool = True) -> None:
    """Entries as a JSON array, CSV or a table; streamed as JSON lines or plain rows when following."""
    if fmt == "csv":
        sys.stdout.write(timeline_csv(entries, header=header))
    elif fmt == "json" and stream:
        for entry in entries:
            print(json.dumps(event_json(entry)))
    elif fmt == "json":
        print(json.dumps([event_json(entry) for entry in entries], indent=2))
    elif stream:
        for row in timeline_rows(entries):
            print("  ".join(str(terminal_safe(cell)) for cell in row))
    else:
        print_table("timeline", TABLE_COLUMNS, timeline_rows(entries))
    sys.stdout.flush()


INCIDENT_COLUMNS = (
    "id",
    "sandbox",
    "first",
    "last",
    "hits",
    "channels",
    "sources",
    "canaries",
    "alerts",
    "acked_by",
)


def incident_json(incident: Incident) -> dict[str, Any]:
    opened = [e.evidence.get("alert_id") for e in incident.entries if e.type == "alert_opened"]
    acked = [e.evidence.get("by") for e in incident.entries if e.type == "alert_acked"]
    return {
        "id": incident.id,
        "sandbox": incident.sandbox,
        "first": to_iso(incident.first_us),
        "last": to_iso(incident.last_us),
        "hits": len(incident.hits),
        "channels": incident.channels,
        "sources": incident.sources,
        "canaries": incident.canaries,
        "alerts": opened,
        "acked_by": acked,
        "follow_up": [
            {"time": to_iso(e.time_us), "type": e.type, "detail": detail(e)}
            for e in incident.follow_up
        ],
    }


def incidents_csv(rows: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(INCIDENT_COLUMNS)
    for row in rows:
        writer.writerow([spreadsheet_safe(row[column]) for column in INCIDENT_COLUMNS])
    return out.getvalue()


def print_incidents(rows: Sequence[dict[str, Any]], fmt: str) -> None:
    """Incidents, as `incident_json` rows, in `fmt`."""
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return
    if fmt == "csv":
        sys.stdout.write(incidents_csv(rows))
        return
    print_table(
        "incidents",
        INCIDENT_COLUMNS,
        ([row[column] for column in INCIDENT_COLUMNS] for row in rows),
    )


def print_incident_story(incident: Incident, fmt: str) -> None:
    """One incident hit by hit, each with its evidence."""
    summary = incident_json(incident)
    if fmt == "json":
        summary["events"] = [event_json(entry) for entry in incident.entries]
        print(json.dumps(summary, indent=2))
        return
    console = Console(width=None if sys.stdout.isatty() else 240)
    console.print(
        terminal_safe(
            f"Incident {incident.id}: sandbox {incident.sandbox}, {summary['hits']} hits "
            f"from {summary['first']} to {summary['last']}"
        )
    )
    console.print(
        terminal_safe(
            f"channels {', '.join(incident.channels)}; sources {', '.join(incident.sources)}; "
            f"canaries {', '.join(incident.canaries)}"
        )
    )
    for entry in incident.entries:
        console.print(
            terminal_safe(
                f"\n{to_iso(entry.time_us)}  {entry.type}  {entry.protocol or ''}  {entry.source or ''}  {detail(entry)}"
            )
        )
        if entry.type == "hit":
            for key, value in sorted(entry.evidence.items()):
                console.print(terminal_safe(f"    {key}: {json.dumps(value, ensure_ascii=False)}"))
