"""Pages every committed hit to every configured apprise URL, off the listeners' path.

Hits arrive from the ledger writer's commit notification, so nothing here
runs before a hit is durable, and a listener never waits for a page.
apprise's plugins block on HTTP, so each send runs in a worker thread; its
outcome goes back into the ledger as `alert_sent` or `alert_failed`.
"""

import asyncio
import logging
from collections.abc import Sequence

import apprise

from alerts.render import body, title
from store.clock import now_us
from store.ledger import Entry, Event
from store.writer import LedgerWriter

log = logging.getLogger(__name__)

_WORKERS = 4


def check_url(url: str) -> str | None:
    """None if apprise can send to `url`, otherwise why not."""
    if apprise.Apprise.instantiate(url) is None:
        return "apprise does not recognise this notification URL"
    return None


def _mask(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0].rsplit('@', 1)[-1]}/..."


class Pager:
    """Sends each hit to every URL, each URL on its own so one failing does not stop the rest."""

    def __init__(self, writer: LedgerWriter, urls: Sequence[str], node: str) -> None:
        self._writer = writer
        self._node = node
        self._targets: list[tuple[str, apprise.Apprise]] = []
        for url in urls:
            target = apprise.Apprise()
            target.add(url)
            self._targets.append((url, target))
        self._queue: asyncio.Queue[Entry] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self.sent = 0
        self.failed = 0

    def start(self) -> None:
        self._writer.subscribe(self._committed)
        self._workers = [asyncio.create_task(self._work()) for _ in range(_WORKERS)]

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def _committed(self, entries: Sequence[Entry]) -> None:
        if not self._targets:
            return
        for entry in entries:
            if entry.type == "hit":
                self._queue.put_nowait(entry)

    async def _work(self) -> None:
        while True:
            entry = await self._queue.get()
            for url, target in self._targets:
                await self._send(entry, url, target)

    async def _send(self, entry: Entry, url: str, target: apprise.Apprise) -> None:
        try:
            delivered = bool(await asyncio.to_thread(target.notify, body(entry), title(entry)))
            error = None if delivered else "the notification service did not accept it"
        except Exception as failure:
            delivered, error = False, f"{type(failure).__name__}: {failure}"
        if delivered:
            self.sent += 1
        else:
            self.failed += 1
            log.warning("page for hit %d to %s failed: %s", entry.seq, _mask(url), error)
        self._writer.submit(
            Event(
                type="alert_sent" if delivered else "alert_failed",
                time_us=now_us(),
                node=self._node,
                canary_id=entry.canary_id,
                sandbox=entry.sandbox,
                data={"hit_seq": entry.seq, "target": _mask(url), "error": error},
            )
        )
