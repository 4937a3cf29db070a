"""Deployment secrets: random values that every node sharing one store must agree on.

A secret is made by whichever node asks for it first and read back by every
node after. Two nodes asking at once still end up with one value: the second
insert fails on the name, and both read back the row that won.
"""

import contextlib
import secrets
from collections.abc import Callable

from sqlalchemy import Engine, Select, insert, select
from sqlalchemy.exc import IntegrityError

from store.schema import deployment_secrets


def secret(
    engine: Engine, name: str, size: int = 32, make: Callable[[], bytes] | None = None
) -> bytes:
    """The secret called `name`, made now if the store has none yet: by `make`, else from
    `size` random bytes."""
    with engine.connect() as connection:
        found = connection.execute(_value(name)).scalar()
    if found is not None:
        return found
    # Another node may insert it between the read above and this insert: its value stands.
    with contextlib.suppress(IntegrityError), engine.begin() as connection:
        connection.execute(
            insert(deployment_secrets).values(
                name=name, value=make() if make else secrets.token_bytes(size)
            )
        )
    with engine.connect() as connection:
        return connection.execute(_value(name)).scalar_one()


def _value(name: str) -> Select[bytes]:
    return select(deployment_secrets.c.value).where(deployment_secrets.c.name == name)
