"""Group commit: one thread appends queued events to the ledger in batches.

Listeners must not answer a canary hit before it is durable, and one commit
per hit would cap them at the database's commit rate. Events submitted while
a transaction runs wait in a queue and all go into the next one, so the
commit rate bounds batches, not hits. Completion callbacks and subscribers
run on the asyncio loop, never on the writer thread.
"""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from store import ledger
from store.ledger import Entry, Event

log = logging.getLogger(__name__)

Done = Callable[[Entry | None], None]
Subscriber = Callable[[Sequence[Entry]], None]

_STOP = object()
_ATTEMPTS = 5


class LedgerWriter:
    """Appends events from any coroutine or callback, many per transaction."""

    def __init__(self, engine: Engine, max_batch: int = 1000) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Event, Done | None] | object] = queue.SimpleQueue()
        self._subscribers: list[Subscriber] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.appended = 0
        self.failed = 0

    def subscribe(self, subscriber: Subscriber) -> None:
        """Call `subscriber` on the loop with every committed batch."""
        self._subscribers.append(subscriber)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Commit what is queued, then end the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def submit(self, event: Event, done: Done | None = None) -> None:
        """Queue `event`; `done` gets its entry once committed, or None if it could not be."""
        self._queue.put((event, done))

    async def append(self, *events: Event) -> list[Entry]:
        """Append `events` and return their entries once committed."""
        loop = asyncio.get_running_loop()
        results: list[Entry] = []
        finished = loop.create_future()

        def done(entry: Entry | None) -> None:
            if entry is None:
                if not finished.done():
                    finished.set_exception(RuntimeError("the ledger could not commit the event"))
                return
            results.append(entry)
            if len(results) == len(events) and not finished.done():
                finished.set_result(None)

        for event in events:
            self.submit(event, done)
        await finished
        return sorted(results, key=lambda entry: entry.seq)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)  # type: ignore[arg-type]

    def _commit(self, batch: list[tuple[Event, Done | None]]) -> None:
        events = [event for event, _ in batch]
        entries: list[Entry] | None = None
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with self._engine.begin() as connection:
                    entries = ledger.append(connection, events)
                break
            except OperationalError:
                log.exception("ledger append failed (attempt %d of %d)", attempt, _ATTEMPTS)
                time.sleep(0.05 * 2**attempt)
        if entries is None:
            self.failed += len(batch)
        else:
            self.batches += 1
            self.appended += len(entries)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, batch, entries)

    def _deliver(self, batch: list[tuple[Event, Done | None]], entries: list[Entry] | None) -> None:
        for index, (_, done) in enumerate(batch):
            if done is not None:
                done(None if entries is None else entries[index])
        if entries is None:
            return
        for subscriber in self._subscribers:
            try:
                subscriber(entries)
            except Exception:
                log.exception("ledger subscriber %r failed", subscriber)
