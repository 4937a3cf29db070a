"""The pager: the node's alert work on its asyncio loop.

A commit that holds hits wakes the dispatcher (hits -> alerts -> outbox
rows) at once if one of them may open an alert, and within FOLD_DELAY_SECONDS
if each only folds into an alert already open, then in chunks of FOLD_CHUNK:
on SQLite a dispatch runs on the ledger writer's thread, where the next hits
wait for it, and a stream of hits of planted canaries would otherwise put one
in front of nearly every commit, or a long one in front of some. Anything
queued wakes the sender. First pages are written leased to this node's
sender and handed to it once committed: they leave without a claim
transaction in front of them. Both also run on a timer, for hits
committed by other processes and for deliveries waiting out their backoff.
Store work runs in threads, never on the loop the listeners answer from;
alert state changes, which take the write lock, run through `store_work`:
on SQLite the ledger writer's own thread, one batch of hits at a time, so
that appends and dispatch take turns rather than contend for the lock.
"""

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from alerts.outbox import Outbox
from alerts.state import BATCH, AlertState
from store.ledger import Entry
from store.writer import NotDurable

log = logging.getLogger(__name__)

# Under a burst of hits, gather them into fewer, larger batches: each dispatch
# holds the store's write lock, which the listeners' commits need too.
BUSY_DISPATCH = 50
BUSY_PAUSE_SECONDS = 0.05
RETRY_SECONDS = 1.0
# How long hits that only fold into open alerts wait to be dispatched: what they change
# (an alert's count, sources, last hit) is paged by digests, minutes apart.
FOLD_DELAY_SECONDS = 0.25
# Hits per dispatch when none may open an alert: a hit committed meanwhile waits for one
# such chunk (about 1 ms for 10 on SQLite), not for a whole batch of folds (5-10 ms for 50).
# The once-a-second `dispatch_soon` of the node's scheduler still takes a whole batch.
FOLD_CHUNK = 10

StoreWork = Callable[[Callable[[], Any]], Awaitable[Any]]


async def in_a_thread(work: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(work)


class Pager:
    """Dispatches committed hits into alerts and sends what the outbox holds."""

    def __init__(
        self,
        state: AlertState,
        outbox: Outbox,
        clock: Callable[[], int],
        store_work: StoreWork = in_a_thread,
    ) -> None:
        self.state = state
        self.outbox = outbox
        self._clock = clock
        self._store_work = store_work
        self._dispatch_due = asyncio.Event()
        # Set when the hits waiting may open an alert: they are dispatched in whole batches,
        # and a pause between busy dispatches ends.
        self._urgent = asyncio.Event()
        self._send_due = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._folds_due: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Start both loops; hits and deliveries left from before a restart are taken up at once."""
        self._tasks = [
            asyncio.create_task(self._dispatching()),
            asyncio.create_task(self._sending()),
        ]
        self.dispatch_soon()
        self.send_soon()

    async def stop(self) -> None:
        if self._folds_due is not None:
            self._folds_due.cancel()
            self._folds_due = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.outbox.close()

    def committed(self, entries: Sequence[Entry]) -> None:
        """The ledger writer's commit notification: new hits mean alert work."""
        hits = [entry for entry in entries if entry.type == "hit"]
        if any(self.state.may_open(hit) for hit in hits):
            self.dispatch_soon()
        elif hits and self._folds_due is None:
            self._folds_due = asyncio.get_running_loop().call_later(
                FOLD_DELAY_SECONDS, self._dispatch_folds
            )

    def _dispatch_folds(self) -> None:
        self._folds_due = None
        self._dispatch_due.set()

    def dispatch_soon(self) -> None:
        self._urgent.set()
        self._dispatch_due.set()

    def send_soon(self) -> None:
        self._send_due.set()
        self.outbox.wake()

    async def timed_work(self) -> None:
        """Digests and escalations that have come due."""
        moment = self._clock()
        try:
            queued = await self._store_work(functools.partial(self.state.digests, moment))
            queued += await self._store_work(functools.partial(self.state.escalations, moment))
        except NotDurable as away:
            log.warning("digests and escalations wait: %s", away)
            return
        if queued:
            self.send_soon()

    async def _dispatching(self) -> None:
        while True:
            await self._dispatch_due.wait()
            self._dispatch_due.clear()
            urgent = self._urgent.is_set()
            self._urgent.clear()
            batch = BATCH if urgent else FOLD_CHUNK
            try:
                dispatch = functools.partial(
                    self.state.dispatch,
                    self._clock(),
                    batches=1,
                    lease=self.outbox.lease(),
                    batch=batch,
                )
                if await self._store_work(dispatch):
                    self.outbox.hand(self.state.leased)
                    self.send_soon()
                if self.state.last_dispatched >= batch:
                    # A full batch: more are waiting, and appends queued meanwhile go first.
                    if urgent:
                        self._urgent.set()
                    self._dispatch_due.set()
                elif self.state.last_dispatched >= BUSY_DISPATCH:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._urgent.wait(), BUSY_PAUSE_SECONDS)
            except NotDurable as away:
                log.warning("alert dispatch waits: %s", away)
                await asyncio.sleep(RETRY_SECONDS)
                self.dispatch_soon()
            except Exception:
                log.exception("alert dispatch failed; retrying")
                await asyncio.sleep(RETRY_SECONDS)
                self.dispatch_soon()

    async def _sending(self) -> None:
        while True:
            await self._send_due.wait()
            self._send_due.clear()
            try:
                await self.outbox.work()
            except Exception:
                log.exception("outbox work failed; retrying")
                await asyncio.sleep(RETRY_SECONDS)
