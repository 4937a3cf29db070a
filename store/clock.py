"""Time as the store keeps it: integer microseconds since the Unix epoch, UTC."""

import time
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_us() -> int:
    return time.time_ns() // 1000


def to_iso(time_us: int) -> str:
    """ISO 8601 in UTC with microseconds, e.g. 2026-11-24T07:38:00.123456Z."""
    moment = _EPOCH + timedelta(microseconds=time_us)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def from_iso(text: str) -> int:
    """Microseconds for an ISO 8601 time; a time without an offset is taken as UTC."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    # Integer arithmetic: float seconds would be off by a microsecond now and then.
    return (moment - _EPOCH) // timedelta(microseconds=1)
