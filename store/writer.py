"""Group commit: one thread appends queued events to the ledger in batches.

Listeners must not answer a canary hit before it is durable, and one commit
per hit would cap them at the database's commit rate. Events submitted while
a transaction runs wait in a queue and all go into the next one, so the
commit rate bounds batches, not hits. Completion callbacks and subscribers
run on the asyncio loop, never on the writer thread.

Other store work that takes the write lock can run on the same thread, in
turn between batches (`call`): on SQLite, where the whole database has one
write lock, two threads of one process taking it in turn would otherwise
meet in SQLite's busy handler, which sleeps 1, 2, 5, 10 ms... between tries,
and every hit waiting behind would wait that long.
"""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from store import ledger
from store.ledger import Entry, Event

log = logging.getLogger(__name__)

Done = Callable[[Entry | None], None]
Subscriber = Callable[[Sequence[Entry]], None]
T = TypeVar("T")

_STOP = object()
_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class _Job:
    """Store work to run on the writer's thread, and where its outcome goes."""

    work: Callable[[], Any]
    outcome: "asyncio.Future[Any]"


class NotDurable(Exception):
    """The ledger could not commit an event: whoever waits on it must not answer as if it had."""


class LedgerWriter:
    """Appends events from any coroutine or callback, many per transaction."""

    def __init__(self, engine: Engine, max_batch: int = 1000) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Event, Done | None] | _Job | object] = (
            queue.SimpleQueue()
        )
        self._subscribers: list[Subscriber] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches = 0
        self.appended = 0
        self.failed = 0
        # Rows committed in the current and in the last whole second, for /metrics.
        self._second = 0
        self._second_rows = 0
        self._last_second_rows = 0

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
        """Append `events` and return their entries once committed; raise NotDurable if not."""
        return await append_through(self.submit, events)

    async def call(self, work: Callable[[], T]) -> T:
        """Run `work` on the writer's thread between two batches; its result or its error."""
        assert self._thread is not None, "the writer is not running"
        outcome: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put(_Job(work, outcome))
        return await outcome

    @property
    def rows_per_second(self) -> int:
        """Rows committed in the last whole second."""
        second = int(time.monotonic())
        if second == self._second:
            return self._last_second_rows
        return self._second_rows if second == self._second + 1 else 0

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            if isinstance(first, _Job):
                self._do(first)
                continue
            batch = [first]
            job = None
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                if isinstance(item, _Job):
                    job = item
                    break
                batch.append(item)
            self._commit(batch)  # type: ignore[arg-type]
            if job is not None:
                self._do(job)
        self._refuse_the_rest()

    def _refuse_the_rest(self) -> None:
        """What came after the stop is not committed: say so, so nobody waits for ever."""
        assert self._loop is not None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Job):
                error = NotDurable("the ledger writer has stopped")
                self._loop.call_soon_threadsafe(_settle, item.outcome, None, error)
            elif isinstance(item, tuple):
                lost: list[Entry | None] = [None]
                self._loop.call_soon_threadsafe(self._deliver, [item], lost)

    def _do(self, job: _Job) -> None:
        assert self._loop is not None
        try:
            result = job.work()
        except Exception as error:
            self._loop.call_soon_threadsafe(_settle, job.outcome, None, error)
        else:
            self._loop.call_soon_threadsafe(_settle, job.outcome, result, None)

    def _commit(self, batch: list[tuple[Event, Done | None]]) -> None:
        entries = self._append([event for event, _ in batch])
        committed = [entry for entry in entries if entry is not None]
        self.failed += len(entries) - len(committed)
        if committed:
            self.batches += 1
            self.appended += len(committed)
            second = int(time.monotonic())
            if second != self._second:
                rolled = second == self._second + 1
                self._last_second_rows = self._second_rows if rolled else 0
                self._second, self._second_rows = second, 0
            self._second_rows += len(committed)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, batch, entries)

    def _append(self, events: list[Event]) -> list[Entry | None]:
        """Append in one transaction, retrying while the store is busy or away.

        An error that is not about the store's availability is about the data:
        then each event is tried on its own, so one bad event cannot cost the
        others their place in the ledger.
        """
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with self._engine.begin() as connection:
                    return list(ledger.append(connection, events))
            except OperationalError:
                log.exception("ledger append failed (attempt %d of %d)", attempt, _ATTEMPTS)
                time.sleep(0.05 * 2**attempt)
            except Exception:
                log.exception("ledger append of %d events failed", len(events))
                if len(events) == 1:
                    return [None]
                return [entry for event in events for entry in self._append([event])]
        return [None] * len(events)

    def _deliver(self, batch: list[tuple[Event, Done | None]], entries: list[Entry | None]) -> None:
        for (_, done), entry in zip(batch, entries, strict=True):
            if done is not None:
                done(entry)
        committed = [entry for entry in entries if entry is not None]
        if not committed:
            return
        for subscriber in self._subscribers:
            try:
                subscriber(committed)
            except Exception:
                log.exception("ledger subscriber %r failed", subscriber)


def _settle(outcome: "asyncio.Future[Any]", result: Any, error: Exception | None) -> None:
    if outcome.done():
        return
    if error is None:
        outcome.set_result(result)
    else:
        outcome.set_exception(error)


async def append_through(
    submit: Callable[[Event, Done], None], events: Sequence[Event]
) -> list[Entry]:
    """Submit `events` through `submit`; the entry that accounts for each, in order, once
    all are committed, or NotDurable."""
    if not events:
        return []
    finished = asyncio.get_running_loop().create_future()
    results: list[Entry | None] = [None] * len(events)
    missing = len(events)

    def done_for(place: int) -> Done:
        def done(entry: Entry | None) -> None:
            nonlocal missing
            if finished.done():
                return
            if entry is None:
                finished.set_exception(NotDurable("the ledger could not commit the event"))
                return
            results[place] = entry
            missing -= 1
            if not missing:
                finished.set_result(None)

        return done

    for place, event in enumerate(events):
        submit(event, done_for(place))
    await finished
    return [entry for entry in results if entry is not None]
