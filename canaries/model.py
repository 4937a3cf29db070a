"""What a canary is: a token planted somewhere, with where and why."""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

Kind = Literal["dns", "email", "url", "credential"]
Severity = Literal["low", "medium", "high", "critical"]
KINDS: tuple[str, ...] = get_args(Kind)
# The channel a hit came in by, as listeners record it (`tls`: a ClientHello; `https`: a request
# inside a completed handshake).
Protocol = Literal["dns", "smtp", "http", "https", "tls", "postgres", "mcp", "ssh"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
# The built-in self-test canaries live here; their hits never open incidents.
HEARTBEAT_SANDBOX = "oobwatch-heartbeat"
SEVERITIES: tuple[str, ...] = get_args(Severity)


@dataclass(frozen=True, slots=True)
class Canary:
    """A minted canary. Retired or expired canaries still match and still page."""

    id: str
    token: str
    kind: str
    value: str
    sandbox: str
    location: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    severity: str = "high"
    note: str = ""
    created_us: int = 0
    expires_us: int | None = None
    retired_us: int | None = None
    format: str = ""
    path_hint: str = ""
    files: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> "Canary":
        return cls(
            id=row["id"],
            token=row["token"],
            kind=row["kind"],
            value=row["value"],
            sandbox=row["sandbox"],
            location=row["location"],
            labels=json.loads(row["labels"]),
            severity=row["severity"],
            note=row["note"],
            created_us=row["created_us"],
            expires_us=row["expires_us"],
            retired_us=row["retired_us"],
            format=row["format"],
            path_hint=row["path_hint"],
            files=json.loads(row["files"]),
        )

    def as_row(self) -> dict[str, Any]:
        row = {name: getattr(self, name) for name in self.__slots__}
        row["labels"] = json.dumps(dict(self.labels), sort_keys=True)
        row["files"] = json.dumps(dict(self.files))
        return row
