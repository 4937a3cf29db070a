"""The token index: every canary by token, in memory, for listeners' hot paths.

The index catches up with the store on a schedule. A canary minted by another
process since the last catch-up would otherwise look like junk, so a token
that is not in the index but passes the deployment's keyed check is looked up
in the store before it is answered. Forged names cannot pass that check, so
only just-minted tokens and the 1-in-65,536 chance collisions get this far,
and each of those reaches the store at most once per `NEGATIVE_TTL_SECONDS`:
the store's "no such token" is remembered. Lookups are batched into rounds,
one store query at a time; at most `MAX_PENDING` wait at once, and past that
a lookup is answered as junk at once rather than queue behind the store.
"""

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from sqlalchemy import Engine

from canaries.mint import token_key
from canaries.model import Canary
from canaries.tokens import is_plausible
from store import registry

log = logging.getLogger(__name__)

# Lookups waiting on the store at once; only plausible tokens get a place.
MAX_PENDING = 4096
# Long enough that a collision someone found reaches the store a few times a
# minute at most; short enough that a token the store had not yet committed
# (another node's mint, mid-transaction) is asked about again soon. The
# scheduled refresh also clears a token from it as soon as it loads the canary.
NEGATIVE_TTL_SECONDS = 5.0
NEGATIVE_CACHE_SIZE = 65536


class NegativeCache:
    """Tokens the store said it does not have, each for `ttl` seconds; the oldest go first."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._ttl = ttl
        self._clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, token: str) -> bool:
        until = self._until.get(token)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._until[token]
        return False

    def add(self, token: str) -> None:
        self._until[token] = self._clock() + self._ttl
        # Every entry lives as long, so the front is always the first to expire.
        self._until.move_to_end(token)
        if len(self._until) > self._size:
            self._until.popitem(last=False)

    def discard(self, token: str) -> None:
        self._until.pop(token, None)


class TokenIndex:
    """Canaries by token; never forgets one, since retired canaries still fire."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.key = token_key(engine)
        self._by_token: dict[str, Canary] = {}
        self._absent = NegativeCache(NEGATIVE_CACHE_SIZE, NEGATIVE_TTL_SECONDS)
        self._last_pk = 0
        self._next: set[str] = set()
        self._waiting: asyncio.Future[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._pending = 0
        self._overflowed = 0
        # For /metrics: store queries made, lookups the negative cache answered,
        # and lookups answered as junk because MAX_PENDING were waiting already.
        self.store_lookups = 0
        self.negative_hits = 0
        self.overflow = 0

    def __len__(self) -> int:
        return len(self._by_token)

    def get(self, token: str) -> Canary | None:
        """The canary for a lowercase token, from memory only."""
        return self._by_token.get(token)

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

    async def lookup(self, token: str) -> Canary | None:
        """The canary for a lowercase token, asking the store if it is plausible but unknown."""
        known = self._by_token.get(token)
        if known is not None or not is_plausible(token, self.key):
            return known
        if token in self._absent:
            self.negative_hits += 1
            return None
        if self._pending >= MAX_PENDING:
            self.overflow += 1
            self._overflowed += 1
            return None
        self._pending += 1
        try:
            return await self._ask(token)
        finally:
            self._pending -= 1

    async def _ask(self, token: str) -> Canary | None:
        self._next.add(token)
        if self._waiting is None:
            self._waiting = asyncio.get_running_loop().create_future()
        waiting = self._waiting
        if self._worker is None:
            self._worker = asyncio.create_task(self._rounds())
        await asyncio.shield(waiting)
        return self._by_token.get(token)

    async def _rounds(self) -> None:
        try:
            while self._next:
                asked, waiting = self._next, self._waiting
                self._next, self._waiting = set(), None
                # Asked again while the last round was out: that round has the answer.
                tokens = {
                    token
                    for token in asked
                    if token not in self._by_token and token not in self._absent
                }
                try:
                    if tokens:
                        found = await asyncio.to_thread(self._fetch, tokens)
                        for canary in found:
                            self.add(canary)
                        # Only a store that answered says a token is absent; a failed
                        # round leaves its tokens to be asked about again.
                        for token in tokens - {canary.token for canary in found}:
                            self._absent.add(token)
                except Exception:
                    log.exception("store lookup of %d tokens failed", len(tokens))
                finally:
                    assert waiting is not None
                    waiting.set_result(None)
                if self._overflowed:
                    log.warning(
                        "token lookup queue full: %d plausible tokens answered as junk",
                        self._overflowed,
                    )
                    self._overflowed = 0
        finally:
            self._worker = None

    def _fetch(self, tokens: set[str]) -> list[Canary]:
        self.store_lookups += 1
        with self._engine.connect() as connection:
            return [Canary.from_row(row) for row in registry.by_tokens(connection, tokens)]
