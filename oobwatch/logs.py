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
