"""The token index: every canary by token, in memory, for listeners' hot paths.

The index catches up with the store on a schedule. A canary minted by another
process since the last catch-up would otherwise look like junk, so a
well-formed token that is not in the index is looked up in the store before
it is answered; such lookups are batched, and capped so that a flood of
forged well-formed tokens costs one query per round, not one per packet.
"""

import asyncio
import logging

from sqlalchemy import Engine

from canaries.model import Canary
from canaries.tokens import is_token
from store import registry

log = logging.getLogger(__name__)

MAX_PENDING = 4096
# Past this a DNS client has given up on the answer anyway.
MAX_WAIT_SECONDS = 2.0


class TokenIndex:
    """Canaries by token; never forgets one, since retired canaries still fire."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._by_token: dict[str, Canary] = {}
        self._last_pk = 0
        self._next: set[str] = set()
        self._waiting: asyncio.Future[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self.store_lookups = 0
        self.overflow = 0

    def __len__(self) -> int:
        return len(self._by_token)

    def get(self, token: str) -> Canary | None:
        """The canary for a lowercase token, from memory only."""
        return self._by_token.get(token)

    def add(self, canary: Canary) -> None:
        self._by_token[canary.token] = canary

    def refresh(self) -> int:
        """Load canaries added to the store since the last refresh (blocking)."""
        with self._engine.connect() as connection:
            rows = registry.after(connection, self._last_pk)
        for row in rows:
            self.add(Canary.from_row(row))
            self._last_pk = max(self._last_pk, row["pk"])
        return len(rows)

    async def lookup(self, token: str) -> Canary | None:
        """The canary for a lowercase token, asking the store if it is well formed but unknown."""
        known = self._by_token.get(token)
        if known is not None or not is_token(token):
            return known
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAX_WAIT_SECONDS
        while loop.time() < deadline:
            if len(self._next) < MAX_PENDING:
                return await self._ask(token)
            # Full: a flood of forged tokens. Wait for the round being filled to go out,
            # rather than answer a real, just-minted canary as junk.
            if self._waiting is not None:
                await asyncio.shield(self._waiting)
            else:
                await asyncio.sleep(0)
        self.overflow += 1
        log.warning("token lookup queue stayed full; %s answered as junk", token)
        return None

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
                tokens, waiting = self._next, self._waiting
                self._next, self._waiting = set(), None
                try:
                    found = await asyncio.to_thread(self._fetch, tokens)
                    for canary in found:
                        self.add(canary)
                except Exception:
                    log.exception("store lookup of %d tokens failed", len(tokens))
                finally:
                    assert waiting is not None
                    waiting.set_result(None)
        finally:
            self._worker = None

    def _fetch(self, tokens: set[str]) -> list[Canary]:
        self.store_lookups += 1
        with self._engine.connect() as connection:
            return [Canary.from_row(row) for row in registry.by_tokens(connection, tokens)]
