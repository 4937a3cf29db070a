"""Rendering views as JSON, CSV and terminal tables, for the CLI and the API's CSV answers.

Everything a sandbox controlled may be in these values, so CSV cells that a
spreadsheet would run as a formula are neutralised, and table cells show
control characters escaped and rich markup as literal text.
"""

import csv
import io
import json
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from pydantic import BaseModel

from alerts.render import visible
from oobwatch.views import AlertView, Bundle, CanaryView, EventView, IncidentView, detail

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

TIMELINE_COLUMNS = (
    "seq",
    "time",
    "type",
    "canary_id",
    "sandbox",
    "protocol",
    "source_ip",
    "source_port",
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


def as_json(value: BaseModel | Sequence[BaseModel]) -> str:
    if isinstance(value, BaseModel):
        return value.model_dump_json(indent=2)
    return json.dumps([item.model_dump(mode="json") for item in value], indent=2)


def json_chunks(chunks: Iterable[Sequence[BaseModel]]) -> Iterator[str]:
    """`as_json` of every item of `chunks`, the same text, a chunk at a time."""
    started = False
    for chunk in chunks:
        for item in chunk:
            text = json.dumps(item.model_dump(mode="json"), indent=2).replace("\n", "\n  ")
            yield (",\n  " if started else "[\n  ") + text
            started = True
    yield "\n]" if started else "[]"


def csv_chunks(chunks: Iterable[Sequence[EventView]]) -> Iterator[str]:
    """`timeline_csv` of every event of `chunks`, the same text, a chunk at a time."""
    header = True
    for chunk in chunks:
        yield timeline_csv(chunk, header)
        header = False
    if header:
        yield timeline_csv([])


def spreadsheet_safe(value: Any) -> str:
    """A CSV cell that no spreadsheet will evaluate."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return "'" + text if text.startswith(_FORMULA_START) else text


def timeline_csv(events: Iterable[EventView], header: bool = True) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    if header:
        writer.writerow(TIMELINE_COLUMNS)
    for event in events:
        row = event.model_dump()
        rest = {key: value for key, value in row.items() if key not in TIMELINE_COLUMNS}
        row["detail"] = rest or None
        writer.writerow([spreadsheet_safe(row.get(column)) for column in TIMELINE_COLUMNS])
    return out.getvalue()


def incidents_csv(rows: Sequence[IncidentView]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(INCIDENT_COLUMNS)
    for row in rows:
        values = row.model_dump()
        writer.writerow([spreadsheet_safe(values[column]) for column in INCIDENT_COLUMNS])
    return out.getvalue()


def plant_archive(bundle: Bundle) -> bytes:
    """A plant bundle as a .tar.gz: its files under `home/` (mode 0600), as `plant --into`
    would write them, and `manifest.json` beside that folder, never inside it: the
    manifest says which files are canaries, so it must not be planted with them."""
    out = io.BytesIO()
    moment = time.time()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:

        def add(name: str, data: bytes, mode: int) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, moment
            archive.addfile(info, io.BytesIO(data))

        for path, text in sorted(bundle.files.items()):
            add(f"home/{path}", text.encode(), 0o600)
        manifest = [canary.model_dump(mode="json") for canary in bundle.canaries]
        add("manifest.json", json.dumps(manifest, indent=2).encode(), 0o600)
    return out.getvalue()


def escaped(value: Any) -> str:
    """Text with control characters shown as escapes, for a terminal."""
    if value is None:
        return ""
    return visible(value if isinstance(value, str) else json.dumps(value, sort_keys=True))


def _console() -> Any:
    from rich.console import Console

    # Piped output has no terminal width to fit; keep rows on one line for grep.
    return Console(width=None if sys.stdout.isatty() else 240, highlight=False)


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A table that folds long cells rather than cutting them: ids and names must stay whole."""
    # rich is imported here: JSON and CSV output never need it.
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(Text(escaped(cell)) for cell in row))
    _console().print(table)


def print_lines(lines: Iterable[str]) -> None:
    """Plain lines, each escaped: no markup is interpreted."""
    for line in lines:
        sys.stdout.write(escaped(line) + "\n")
    sys.stdout.flush()


TABLE_COLUMNS = ("time", "type", "canary", "sandbox", "protocol", "source", "detail")


def _source(event: EventView) -> str:
    if event.source_ip is None:
        return ""
    host = f"[{event.source_ip}]" if ":" in event.source_ip else event.source_ip
    return host if event.source_port is None else f"{host}:{event.source_port}"


def timeline_rows(events: Iterable[EventView]) -> Iterable[list[Any]]:
    for event in events:
        yield [
            event.time,
            event.type,
            event.canary_id,
            event.sandbox,
            event.protocol,
            _source(event),
            detail(event),
        ]


def print_timeline(
    events: Sequence[EventView], fmt: str, stream: bool, header: bool = True
) -> None:
    """Events as a JSON array, CSV or a table; streamed as JSON lines or plain rows when following."""
    if fmt == "csv":
        sys.stdout.write(timeline_csv(events, header=header))
    elif fmt == "json" and stream:
        for event in events:
            sys.stdout.write(event.model_dump_json() + "\n")
    elif fmt == "json":
        sys.stdout.write(as_json(events) + "\n")
    elif stream:
        print_lines("  ".join(escaped(cell) for cell in row) for row in timeline_rows(events))
    else:
        print_table("timeline", TABLE_COLUMNS, timeline_rows(events))
    sys.stdout.flush()


def print_incidents(rows: Sequence[IncidentView], fmt: str) -> None:
    if fmt == "json":
        sys.stdout.write(as_json(rows) + "\n")
    elif fmt == "csv":
        sys.stdout.write(incidents_csv(rows))
    else:
        print_table(
            "incidents",
            INCIDENT_COLUMNS,
            ([getattr(row, column) for column in INCIDENT_COLUMNS] for row in rows),
        )


def print_incident_story(incident: IncidentView, fmt: str) -> None:
    """One incident hit by hit, each with its evidence."""
    if fmt == "json":
        sys.stdout.write(as_json(incident) + "\n")
        return
    hits = f"{incident.hits} hit" + ("" if incident.hits == 1 else "s")
    lines = [
        f"Incident {incident.id}: sandbox {incident.sandbox}, {hits} "
        f"from {incident.first} to {incident.last}",
        f"channels {', '.join(incident.channels)}; sources {', '.join(incident.sources)}; "
        f"canaries {', '.join(incident.canaries)}",
    ]
    for event in incident.events:
        lines.append("")
        lines.append(
            f"{event.time}  {event.type}  {event.protocol or ''}  {_source(event)}  {detail(event)}"
        )
        if event.type == "hit":
            for key, value in sorted(event.evidence.items()):
                lines.append(f"    {key}: {json.dumps(value, ensure_ascii=False)}")
    if incident.events_cut:
        lines += [
            "",
            f"(the first events and every alert event; `timeline --sandbox {incident.sandbox}"
            f" --since {incident.first}` lists every one)",
        ]
    print_lines(lines)


def print_canaries(canaries: Sequence[CanaryView], show_files: bool) -> None:
    print_table(
        "canaries",
        ("id", "kind", "sandbox", "location", "value", "state", "hits", "last hit", "created"),
        (
            (
                c.id,
                c.kind if c.format is None else f"{c.kind}/{c.format}",
                c.sandbox,
                c.location,
                c.path_hint if c.kind == "credential" else c.value,
                c.state,
                c.hits,
                c.last_hit_at or "",
                c.created_at,
            )
            for c in canaries
        ),
    )
    if show_files:
        for canary in canaries:
            print_files(canary)


def print_files(canary: CanaryView) -> None:
    for path, text in (canary.files or {}).items():
        print_lines([f"--- {canary.id} ~/{path}", *text.splitlines()])


def print_alerts(alerts: Sequence[AlertView]) -> None:
    print_table(
        "alerts",
        (
            "id",
            "status",
            "canary",
            "sandbox",
            "hits",
            "opened",
            "last hit",
            "acked by",
            "undelivered",
        ),
        (
            (
                a.id,
                a.status,
                a.canary_id,
                a.sandbox,
                a.hit_count,
                a.opened_at,
                a.last_hit_at,
                a.acked_by,
                a.undelivered or None,
            )
            for a in alerts
        ),
    )
