"""Logging: one line per event, as console text or one JSON object, with stable field names.

Field names follow the Elastic Common Schema where one fits (`@timestamp`,
`log.level`, `log.logger`, `message`, `event.action`, `source.ip`, ...) and
`oobwatch.*` otherwise. A caller adds fields with `extra={"fields": {...}}`.
Every library logs through the same handler (uvicorn, aiosmtpd, httpx,
apscheduler, alembic), with their per-request noise off. Values a sandbox
controlled are data: JSON escapes them, and console lines show control
characters as escapes, so no log line can be forged or split.
"""

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from alerts.render import visible

LogFormat = Literal["console", "json"]
# Per-request or per-connection chatter; their warnings and errors still come through.
_QUIET = (
    "uvicorn.error",
    "uvicorn.access",
    "mail.log",
    "httpx",
    "httpcore",
    "apscheduler",
    "alembic",
    "apprise",
    "asyncio",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "@timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="microseconds"
            ),
            "log.level": record.levelname.lower(),
            "log.logger": record.name,
            "message": record.getMessage(),
        }
        document.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            document["error.type"] = getattr(record.exc_info[0], "__name__", "")
            document["error.stack_trace"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(document, default=str, ensure_ascii=True)


class RateLimit(logging.Filter):
    """At most `burst` records of one kind (logger and message template) per `window` seconds.

    A flood of abusive clients must not turn into a flood of log lines (a full
    disk blinds the node as well as a full descriptor table): past the burst
    the rest of the window is dropped and counted, and the next record of
    that kind that passes says how many were left out.
    """

    def __init__(self, burst: int = 20, window: float = 10.0, kinds: int = 4096) -> None:
        super().__init__()
        self._burst = burst
        self._window = window
        self._kinds = kinds
        # kind -> [window start, passed in this window, dropped since the last one passed]
        self._seen: dict[tuple[str, object], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.msg)
        seen = self._seen.get(kind)
        if seen is None:
            if len(self._seen) >= self._kinds:
                self._seen.clear()
            seen = self._seen[kind] = [record.created, 0, 0]
        elif record.created - seen[0] >= self._window:
            seen[0], seen[1] = record.created, 0
        if seen[1] >= self._burst:
            seen[2] += 1
            return False
        seen[1] += 1
        if seen[2]:
            fields = dict(getattr(record, "fields", None) or {})
            fields["oobwatch.suppressed"] = int(seen[2])
            record.fields = fields
            seen[2] = 0
        return True


class ConsoleFormatter(logging.Formatter):
    """`time level logger: message key=value ...`, control characters escaped."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        line = f"{when} {record.levelname} {record.name}: {record.getMessage()}"
        fields = getattr(record, "fields", None) or {}
        if fields:
            line += " " + " ".join(
                f"{key}={json.dumps(value, default=str)}" for key, value in fields.items()
            )
        line = visible(line)
        if record.exc_info:
            # Exception messages may carry sandbox bytes and newlines too: every line of the
            # trace is escaped and indented, so none of them can pass for a record of its own.
            trace = "".join(traceback.format_exception(*record.exc_info)).rstrip()
            line += "".join("\n    " + visible(part) for part in trace.split("\n"))
        return line


def configure(fmt: LogFormat, level: str, stream: TextIO | None = None) -> None:
    """Send every logger's records to `stream` (stderr) in `fmt`, at `level` and above."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    handler.addFilter(RateLimit())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)


def announce(fmt: LogFormat, text: str, fields: dict[str, Any]) -> None:
    """A line for whoever started the process, on stdout: what is listening where."""
    line = json.dumps({"message": text, **fields}) if fmt == "json" else visible(text)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
