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

With a `Spool`, a batch the store cannot take (PostgreSQL away, SQLite
locked by another process) after a short bound goes to the spool instead,
and its callers get placeholder entries (a negative `seq`, no hash): durable
locally, so answered. While anything waits there, new batches follow it in,
to keep their order, and the writer tries the store again every second;
what it replays reaches the subscribers (the pager) as it is appended. A
later event that names a placeholder as its `hit_seq` gets the real one.
"""

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

from sqlalchemy import Connection, Engine, insert, select
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError

from store import ledger
from store.clock import now_us, to_iso
from store.ledger import Entry, Event
from store.schema import spool_replays
from store.spool import Spool, Spooled, SpoolFull

log = logging.getLogger(__name__)

Done = Callable[[Entry | None], None]
Subscriber = Callable[[Sequence[Entry]], None]
T = TypeVar("T")

_STOP = object()
_ATTEMPTS = 5
# With a spool: tries of a batch before it is spooled, so an outage does not hold answers.
_SPOOL_ATTEMPTS = 2
_UNAVAILABLE = (OperationalError, InterfaceError)
# What a spooled event itself can cause; anything else is retried, never left out.
_ABOUT_THE_DATA = (IntegrityError, DataError, TypeError, ValueError)
# While events wait in the spool: how often the store is tried again, how many per transaction.
REPLAY_EVERY_SECONDS = 1.0
REPLAY_BATCH = 500
# Placeholders whose ledger seq is remembered, for evidence that names them later.
_SEQS_KEPT = 65536

SpoolChange = Literal["spooling", "full", "replayed"]


@dataclass(frozen=True, slots=True)
class _Job:
    """Store work to run on the writer's thread, and where its outcome goes."""

    work: Callable[[], Any]
    outcome: "asyncio.Future[Any]"


class NotDurable(Exception):
    """The ledger could not commit an event: whoever waits on it must not answer as if it had."""


class _Unavailable(Exception):
    """The store did not take a transaction within the tries allowed."""


class LedgerWriter:
    """Appends events from any coroutine or callback, many per transaction."""

    def __init__(self, engine: Engine, max_batch: int = 1000, spool: Spool | None = None) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self.spool = spool
        self._attempts = _ATTEMPTS if spool is None else _SPOOL_ATTEMPTS
        self._retry_at = 0.0
        self._seqs: OrderedDict[int, int] = OrderedDict()
        self._spool_watchers: list[Callable[[SpoolChange, int], None]] = []
        self.spooled = 0
        self.replayed = 0
        # Set while the spool refuses events (the store away, the spool full or unwritable).
        self.spool_full = False
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

    def watch_spool(self, watcher: Callable[[SpoolChange, int], None]) -> None:
        """Call `watcher` on the loop when spooling starts (with how many events), when the
        spool fills (how many were refused first) and when it has all been replayed (how many)."""
        self._spool_watchers.append(watcher)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Commit what is queued, then end the thread (and close the spool)."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        if self.spool is not None:
            self.spool.close()

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
    def recording(self) -> bool:
        """Whether an event submitted now would be recorded: the thread runs and, if the
        store is away, the spool takes it."""
        return self._thread is not None and self._thread.is_alive() and not self.spool_full

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
            # Tried on every turn (at most once a second), first what a previous run left:
            # store work arriving all the time must not keep the spool from being replayed.
            waiting = not self._replay()
            try:
                first = self._queue.get(timeout=REPLAY_EVERY_SECONDS if waiting else None)
            except queue.Empty:
                self._replay()
                continue
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
            try:
                self._commit(batch)  # type: ignore[arg-type]
            except Exception:
                # Nothing may end this thread: every hit after it would wait for ever.
                log.exception("ledger writer: a batch of %d events failed", len(batch))
                assert self._loop is not None
                lost: list[Entry | None] = [None] * len(batch)
                self._loop.call_soon_threadsafe(self._deliver, batch, lost)  # type: ignore[arg-type]
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
        if not self._replay():
            # The store is away: the work would only wait out its timeouts in front of hits.
            error = NotDurable("the store is away; events wait in the spool")
            self._loop.call_soon_threadsafe(_settle, job.outcome, None, error)
            return
        try:
            result = job.work()
        except Exception as error:
            self._loop.call_soon_threadsafe(_settle, job.outcome, None, error)
        else:
            self._loop.call_soon_threadsafe(_settle, job.outcome, result, None)

    def _commit(self, batch: list[tuple[Event, Done | None]]) -> None:
        events = [event for event, _ in batch]
        if not self._replay():
            entries = self._to_spool(events)
        else:
            try:
                entries = self._append(events)
            except _Unavailable:
                entries = self._to_spool(events)
        committed = [entry for entry in entries if entry is not None and entry.seq > 0]
        self.failed += sum(1 for entry in entries if entry is None)
        if all(entry is not None for entry in entries):
            self.spool_full = False  # recorded, in the store or the spool: there is room again
        if committed:
            self.batches += 1
            self.appended += len(committed)
            self._count(len(committed))
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, batch, entries)

    def _count(self, rows: int) -> None:
        second = int(time.monotonic())
        if second != self._second:
            rolled = second == self._second + 1
            self._last_second_rows = self._second_rows if rolled else 0
            self._second, self._second_rows = second, 0
        self._second_rows += rows

    def _append(self, events: list[Event]) -> list[Entry | None]:
        """Append in one transaction, retrying while the store is busy or away; _Unavailable
        when it stays so.

        An error that is not about the store's availability is about the data:
        then each event is tried on its own, so one bad event cannot cost the
        others their place in the ledger.
        """
        for attempt in range(1, self._attempts + 1):
            try:
                with self._engine.begin() as connection:
                    return list(ledger.append(connection, [self._named(e) for e in events]))
            except _UNAVAILABLE:
                log.exception("ledger append failed (attempt %d of %d)", attempt, self._attempts)
                if attempt < self._attempts:
                    time.sleep(0.05 * 2**attempt)
            except Exception:
                log.exception("ledger append of %d events failed", len(events))
                if len(events) == 1:
                    return [None]
                return [entry for event in events for entry in self._one(event)]
        raise _Unavailable

    def _one(self, event: Event) -> list[Entry | None]:
        try:
            return self._append([event])
        except _Unavailable:
            return self._to_spool([event])

    def _to_spool(self, events: list[Event]) -> list[Entry | None]:
        """Journal `events` for a later replay; placeholder entries for them, or None each."""
        spool = self.spool
        if spool is None:
            return [None] * len(events)
        first = not spool.pending
        # A hit replayed already is named by its ledger seq from now on.
        events = [self._named(event) for event in events]
        try:
            numbers = spool.add(events)
        except (SpoolFull, OSError) as error:
            # Full, or its disk is (or failing): the same to a client, to /readyz and to on-call.
            log.error(
                "SPOOL REFUSES: %d events neither recorded nor spooled: %s", len(events), error
            )
            if not self.spool_full:
                self._tell("full", len(events))
            self.spool_full = True
            return [None] * len(events)
        self.spooled += len(events)
        if first:
            log.error(
                "the store is away: spooling events to %s until it is back",
                spool.path,
                extra={"fields": {"event.action": "spooling"}},
            )
            self._tell("spooling", len(events))
        return [_placeholder(number, event) for number, event in zip(numbers, events, strict=True)]

    def _replay(self) -> bool:
        """Append what waits in the spool, in order, if the store takes it; True once empty."""
        spool = self.spool
        if spool is None or not spool.pending:
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            return self._replay_spool(spool)
        except Exception:
            log.exception("replaying the spool at %s failed; trying again", spool.path)
            self._retry_at = time.monotonic() + REPLAY_EVERY_SECONDS
            return False

    def _replay_spool(self, spool: Spool) -> bool:
        replayed = 0
        size = REPLAY_BATCH
        while spool.pending:
            chunk = spool.unreplayed(size)
            if not chunk:
                log.error("%d spooled events cannot be read back", spool.pending)
                self.failed += spool.pending
                spool.set_aside()
                break
            try:
                with self._engine.begin() as connection:
                    entries, seqs = self._replay_chunk(connection, chunk)
            except _UNAVAILABLE as error:
                log.warning("the store is still away (%s); %d events wait", error, spool.pending)
                self._retry_at = time.monotonic() + REPLAY_EVERY_SECONDS
                return False
            except _ABOUT_THE_DATA:
                # Not the store's availability: find the record, so the rest still get in.
                if size > 1:
                    log.exception("replay of %d spooled events failed; one by one", len(chunk))
                    size = 1
                    continue
                log.exception(
                    "spooled event %s cannot be appended; left out", spool.key(chunk[0].number)
                )
                self.failed += 1
                spool.replayed(chunk[0])
                size = REPLAY_BATCH
                continue
            spool.replayed(chunk[-1])
            for number, seq in seqs:
                self._remember(number, seq)
            replayed += len(entries)
            self.replayed += len(entries)
            self.appended += len(entries)
            self._count(len(entries))
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._publish, entries)
        self.spool_full = False
        log.warning(
            "the store is back: %d spooled events are in the ledger",
            replayed,
            extra={"fields": {"event.action": "spool-replayed"}},
        )
        self._tell("replayed", replayed)
        return True

    def _replay_chunk(
        self, connection: Connection, chunk: list[Spooled]
    ) -> tuple[list[Entry], list[tuple[int, int]]]:
        """Append the records of `chunk` not in the ledger yet; their entries, and the ledger
        seq of every record of it."""
        spool = self.spool
        assert spool is not None
        keys = [spool.key(record.number) for record in chunk]
        query = select(spool_replays.c.key, spool_replays.c.seq)
        found = connection.execute(query.where(spool_replays.c.key.in_(keys)))
        known = {key: seq for key, seq in found}
        entries, rows = [], []
        seqs: dict[int, int] = {}
        now = now_us()
        for record, key in zip(chunk, keys, strict=True):
            if key in known:  # appended by a replay cut off before it could say so
                seqs[record.number] = known[key]
                continue
            event = self._named(record.event, connection, seqs)
            data = {**event.data, "spooled": True, "received_at": to_iso(event.time_us)}
            [entry] = ledger.append(connection, [replace(event, time_us=now, data=data)])
            entries.append(entry)
            seqs[record.number] = entry.seq
            rows.append({"key": key, "seq": entry.seq})
        if rows:
            connection.execute(insert(spool_replays), rows)
        return entries, list(seqs.items())

    def _named(
        self,
        event: Event,
        connection: Connection | None = None,
        fresh: dict[int, int] | None = None,
    ) -> Event:
        """`event`, with the ledger seq of the placeholder its `hit_seq` names, where known."""
        named = event.data.get("hit_seq")
        if not isinstance(named, int) or named >= 0:
            return event
        number = -named
        seq = (fresh or {}).get(number, self._seqs.get(number))
        if seq is None and connection is not None and self.spool is not None:
            key = self.spool.key(number)
            query = select(spool_replays.c.seq).where(spool_replays.c.key == key)
            seq = connection.execute(query).scalar()
        if seq is None:
            return event
        return replace(event, data={**event.data, "hit_seq": seq})

    def _remember(self, number: int, seq: int) -> None:
        self._seqs[number] = seq
        if len(self._seqs) > _SEQS_KEPT:
            self._seqs.popitem(last=False)

    def _tell(self, change: SpoolChange, count: int) -> None:
        assert self._loop is not None
        for watcher in self._spool_watchers:
            self._loop.call_soon_threadsafe(watcher, change, count)

    def _deliver(self, batch: list[tuple[Event, Done | None]], entries: list[Entry | None]) -> None:
        for (_, done), entry in zip(batch, entries, strict=True):
            if done is not None:
                done(entry)
        # Placeholders reach the ledger, and so the subscribers, when they are replayed.
        self._publish([entry for entry in entries if entry is not None and entry.seq > 0])

    def _publish(self, committed: list[Entry]) -> None:
        if not committed:
            return
        for subscriber in self._subscribers:
            try:
                subscriber(committed)
            except Exception:
                log.exception("ledger subscriber %r failed", subscriber)


def _placeholder(number: int, event: Event) -> Entry:
    """What a spooled event's callers get: its own fields, a seq of minus its spool number,
    no place in the chain yet."""
    return ledger.entry_of(event, -number, ledger.canonical(event.data), "", "")


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
