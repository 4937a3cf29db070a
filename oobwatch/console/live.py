"""Hits as they arrive: a server-sent event stream for the console's live tables.

Each stream reads the ledger after the last row it sent, four times a
second (an indexed read of the rows after a seq), so a hit recorded by any
node sharing the store shows within a second: about 0.2 s on average. A
stream ends when its session does (checked every few seconds), after
`STREAM_SECONDS` (the browser reconnects, resuming after the last row), or
when `MAX_STREAMS` are open already, or `MAX_STREAMS_PER_TOKEN` for its
token (it says `busy` and ends, and the page tries again later: sessions
cannot pin the API's connections). More than `MAX_ROWS` rows in one poll are
a flood: the newest are sent, with a `skipped` event saying older ones were
left to the timeline.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from sqlalchemy import Engine

from oobwatch.operations import Operations
from oobwatch.output import escaped
from oobwatch.views import EventView, Filters, detail
from store import sessions

POLL_SECONDS = 0.25
SESSION_CHECK_SECONDS = 5.0
STREAM_SECONDS = 300.0
KEEPALIVE_SECONDS = 15.0
MAX_STREAMS = 32
# One token (however many sessions sign in with it) cannot take every place.
MAX_STREAMS_PER_TOKEN = 8
# Rows sent per poll at most: a flood of hits is summarised by the page, not streamed whole.
MAX_ROWS = 200


class Streams:
    """How many live streams are open, node-wide and per token, against their caps."""

    def __init__(self, cap: int = MAX_STREAMS, per_token: int = MAX_STREAMS_PER_TOKEN) -> None:
        self.cap = cap
        self.per_token = per_token
        self.open: dict[str, int] = {}

    def take(self, token_id: str) -> bool:
        held = self.open.get(token_id, 0)
        if sum(self.open.values()) >= self.cap or held >= self.per_token:
            return False
        self.open[token_id] = held + 1
        return True

    def give_back(self, token_id: str) -> None:
        self.open[token_id] -= 1
        if not self.open[token_id]:
            del self.open[token_id]


def as_message(event: EventView) -> str:
    # Escaped as the pages escape them: a direction override must not reorder a live row.
    payload = {
        "seq": event.seq,
        "time": event.time,
        "type": event.type,
        "sandbox": escaped(event.sandbox),
        # The name itself, for the link: the escaped one names another sandbox.
        "sandbox_name": event.sandbox,
        "protocol": event.protocol,
        "source": escaped(event.source_ip),
        "canary": event.canary_id,
        "detail": escaped(detail(event)),
    }
    return f"id: {event.seq}\nevent: row\ndata: {json.dumps(payload)}\n\n"


async def stream(
    operations: Operations,
    engine: Engine,
    session: str,
    token_id: str,
    filters: Filters,
    streams: Streams,
    stopping: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[str]:
    """The stream's text, from `filters.after` on, until the node is `stopping`. Its place
    among `streams` is taken once it runs, so a client gone before then holds none; over
    the cap it says `busy` and ends."""
    if not streams.take(token_id):
        yield "event: busy\ndata: {}\n\n"
        return
    try:
        started = checked = sent = clock()
        after = filters.after or 0
        yield "retry: 2000\n\n"
        while not stopping() and clock() - started < STREAM_SECONDS:
            if clock() - checked >= SESSION_CHECK_SECONDS:
                checked = clock()
                if await asyncio.to_thread(sessions.find, engine, session) is None:
                    yield "event: ended\ndata: {}\n\n"
                    return
            asked = filters.model_copy(update={"after": after, "last": MAX_ROWS + 1})
            events = await asyncio.to_thread(operations.timeline, asked)
            if len(events) > MAX_ROWS:
                events = events[1:]
                yield "event: skipped\ndata: {}\n\n"
            for event in events:
                after = max(after, event.seq)
                yield as_message(event)
            if events:
                sent = clock()
            elif clock() - sent >= KEEPALIVE_SECONDS:
                sent = clock()
                yield ": keepalive\n\n"
            await asyncio.sleep(POLL_SECONDS)
    finally:
        streams.give_back(token_id)
