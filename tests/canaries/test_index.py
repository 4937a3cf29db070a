"""The token index: memory first, the store for well-formed unknowns, even under a forged flood."""

import asyncio

import pytest
from sqlalchemy import Engine

from canaries import index as index_module
from canaries.index import TokenIndex
from canaries.tokens import new_token
from support import plant_canary


async def test_a_just_minted_canary_is_found_even_behind_a_flood_of_forged_tokens(
    sqlite_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(index_module, "MAX_PENDING", 4)
    index = TokenIndex(sqlite_engine)
    index.refresh()
    canary = plant_canary(sqlite_engine)  # after the refresh: only the store knows it
    forged = [index.lookup(new_token()) for _ in range(12)]
    found = await asyncio.gather(*forged, index.lookup(canary.token))
    assert found[-1] == canary
    assert found[:-1] == [None] * 12
    assert index.store_lookups >= 2  # batched rounds, not one query per token


async def test_junk_never_reaches_the_store(sqlite_engine: Engine) -> None:
    index = TokenIndex(sqlite_engine)
    assert await index.lookup("www") is None
    assert await index.lookup("a" * 26) is None
    assert index.store_lookups == 0
