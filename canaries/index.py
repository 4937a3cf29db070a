"""The token index: every canary by token, in memory, for listeners' hot paths.

The index catches up with the store on a schedule. A canary minted by another
process since the last catch-up would otherwise look like junk, so a token
that is not in the index but passes the deployment's keyed check is looked up
in the store before it is answered. Forged names cannot pass that check, so
only just-minted tokens and the 1-in-65,536 chance collisions get this far,
and each of those reaches the store at most once per `NEGATIVE_TTL_SECONDS`:
the store's "no such token" is remembered. Lookups are batched into rounds,
one store query at a time on the index's own thread (never behind other
work); a token asked about again while it is being looked up waits for the
same answer. At most `MAX_PENDING` distinct tokens wait at once. Past that,
or when the store cannot answer, `lookup` raises `Unknowable`: the token
might be a canary, so the listener must answer with a temporary failure
(SERVFAIL, 503, 451), never as junk, which would answer a hit it did not record.
"""

import asyncio
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import Engine

from canaries.mint import token_key
from canaries.model import Canary
from canaries.tokens import is_plausible
from store import registry

log = logging.getLogger(__name__)

# Lookups waiting on the store at once; only plausible tokens get a place.
MAX_PENDING = 4096
MAX_PENDING_PER_SOURCE = 256
# Long enough that a collision someone found reaches the store a few times a
# minute at most; short enough that a token the store had not yet committed
# (another node's mint, mid-transaction) is asked about again soon. The
# scheduled refresh also clears a token from it as soon as it loads the canary.
NEGATIVE_TTL_SECONDS = 5.0
NEGATIVE_CACHE_SIZE = 65536


class Unknowable(Exception):
    """Whether a plausible token is a canary cannot be told now: answer with a temporary failure."""


class NegativeCache:
    """Tokens the store said it does not have, each for `ttl` seconds; the oldest go first."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._ttl = ttl
        self._clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()
        # The loop asks; the refresh thread discards tokens it has just loaded.
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, token: str) -> bool:
        with self._lock:
            until = self._until.get(token)
            if until is None:
                return False
            if self._clock() < until:
                return True
            del self._until[token]
            return False

    def add(self, token: str) -> None:
        with self._lock:
            self._until[token] = self._clock() + self._ttl
            # Every entry lives as long, so the front is always the first to expire.
            self._until.move_to_end(token)
            if len(self._until) > self._size:
                self._until.popitem(last=False)

    def discard(self, token: str) -> None:
        with self._lock:
            self._until.pop(token, None)


class TokenIndex:
    """Canaries by token; never forgets one, since retired canaries still fire."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.key = token_key(engine)
        self._by_token: dict[str, Canary] = {}
        self._absent = NegativeCache(NEGATIVE_CACHE_SIZE, NEGATIVE_TTL_SECONDS)
        self._last_pk = 0
        # Tokens being looked up, each with the answer its askers wait for.
        self._inflight: dict[str, asyncio.Future[Canary | None]] = {}
        # Places in the queue each source holds.
        self._asking: Counter[str] = Counter()
        self._next: set[str] = set()
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="token-lookup")
        self._overflowed = 0
        # For /metrics: store queries made, lookups the negative cache answered,
        # and lookups refused because MAX_PENDING tokens were waiting already.
        self.store_lookups = 0
        self.negative_hits = 0
        self.overflow = 0

    def __len__(self) -> int:
        return len(self._by_token)

    def canaries(self) -> list[Canary]:
        """Every canary known now."""
        return list(self._by_token.values())

    def get(self, token: str) -> Canary | None:
        """The canary for a lowercase token, from memory only."""
        return self._by_token.get(token)

    def worth_asking(self, token: str) -> bool:
        """Whether a lowercase token is a canary or might be one (it passes the keyed check):
        only those are worth a `lookup`; any other word is junk, told without the store."""
        return token in self._by_token or is_plausible(token, self.key)

    def add(self, canary: Canary) -> None:
        self._by_token[canary.token] = canary
        self._absent.discard(canary.token)

    def refresh(self) -> int:
        """Load canaries added to the store since the last refresh (blocking)."""
        with self._engine.connect() as connection:
            rows = registry.after(connection, self._last_pk)
        for row in rows:
            self.add(Canary.from_row(row))
            self._last_pk = max(self._last_pk, row["pk"])
        return len(rows)

    async def lookup(self, token: str, source: str = "") -> Canary | None:
        """The canary for a lowercase token, asking the store if it is plausible but unknown.

        `source` is who asked (an address): one source may hold at most
        MAX_PENDING_PER_SOURCE of the places, so it cannot take them all.
        Raises Unknowable when the store cannot be asked now.
        """
        known = self._by_token.get(token)
        if known is not None or not is_plausible(token, self.key):
            return known
        if token in self._absent:
            self.negative_hits += 1
            return None
        answer = self._inflight.get(token)
        if answer is None:
            full = len(self._inflight) >= MAX_PENDING
            if full or self._asking[source] >= MAX_PENDING_PER_SOURCE:
                self.overflow += 1
                self._overflowed += 1
                raise Unknowable("the token lookup queue is full")
            answer = self._inflight[token] = asyncio.get_running_loop().create_future()
            self._asking[source] += 1
            answer.add_done_callback(lambda _: self._done_asking(source))
            self._next.add(token)
            if self._worker is None:
                self._worker = asyncio.create_task(self._rounds())
        return await asyncio.shield(answer)

    async def among(
        self, found: dict[str, list[str]], source: str, limit: int
    ) -> list[tuple[Canary, list[str]]]:
        """The canaries among `found` (token -> where it was seen), with where each was seen.

        Words that are neither known nor pass the keyed check are dropped first, cheaply:
        only plausible ones are worth a lookup, and more than `limit` of those from one
        request (by chance 1 in 65,536 each) is Unknowable, not a reason for more store work.
        """
        worth = [(token, where) for token, where in found.items() if self.worth_asking(token)]
        if len(worth) > limit:
            raise Unknowable(f"{len(worth)} plausible tokens in one request")
        hits = []
        for token, where in worth:
            canary = await self.lookup(token, source)
            if canary is not None:
                hits.append((canary, where))
        return hits

    def _done_asking(self, source: str) -> None:
        self._asking[source] -= 1
        if not self._asking[source]:
            del self._asking[source]

    async def _rounds(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._next:
                tokens, self._next = self._next, set()
                found: dict[str, Canary] | None
                try:
                    fetched = await loop.run_in_executor(self._executor, self._fetch, tokens)
                    found = {canary.token: canary for canary in fetched}
                except Exception:
                    log.exception("store lookup of %d tokens failed", len(tokens))
                    found = None
                for token in tokens:
                    answer = self._inflight.pop(token)
                    if found is None:
                        # Only a store that answered says a token is absent.
                        answer.set_exception(Unknowable("the store could not be asked"))
                        answer.exception()  # retrieved here: an asker may have gone
                        continue
                    canary = found.get(token)
                    if canary is None:
                        self._absent.add(token)
                    else:
                        self.add(canary)
                    answer.set_result(canary)
                if self._overflowed:
                    log.warning(
                        "token lookup queue full: %d plausible tokens answered with a "
                        "temporary failure",
                        self._overflowed,
                    )
                    self._overflowed = 0
        finally:
            self._worker = None
            # Cancelled mid-round (the node stopping): nobody may wait for ever.
            for token in [token for token, answer in self._inflight.items() if not answer.done()]:
                self._inflight.pop(token).set_exception(Unknowable("the lookup was cancelled"))
                self._next.discard(token)

    def _fetch(self, tokens: set[str]) -> list[Canary]:
        self.store_lookups += 1
        with self._engine.connect() as connection:
            return [Canary.from_row(row) for row in registry.by_tokens(connection, tokens)]
