"""API tokens: `oob_<id>_<secret>`, shown once, stored as SHA-256 of the secret.

The id finds the row; the secret's hash is then compared in constant time,
so neither a lookup by secret nor a byte-by-byte comparison leaks timing.
"""

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError

from store.clock import now_us
from store.schema import api_tokens

PREFIX = "oob_"


@dataclass(frozen=True, slots=True)
class Token:
    """A token's name and scope (never its secret)."""

    id: str
    name: str
    scope: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create(engine: Engine, name: str, scope: str) -> tuple[Token, str]:
    """A new token and its full text, which is not stored and cannot be shown again."""
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    try:
        with engine.begin() as connection:
            connection.execute(
                insert(api_tokens).values(
                    id=token_id,
                    name=name,
                    scope=scope,
                    secret_sha256=_digest(secret),
                    created_us=now_us(),
                )
            )
    except IntegrityError:
        raise ValueError(f"a token named {name!r} exists already") from None
    return Token(token_id, name, scope), f"{PREFIX}{token_id}_{secret}"


def authenticate(engine: Engine, presented: str) -> Token | None:
    """The token `presented` stands for, or None."""
    token_id, _, secret = presented.removeprefix(PREFIX).partition("_")
    if not presented.startswith(PREFIX) or not secret:
        return None
    with engine.connect() as connection:
        row = (
            connection.execute(
                select(api_tokens).where(
                    api_tokens.c.id == token_id, api_tokens.c.revoked_us.is_(None)
                )
            )
            .mappings()
            .first()
        )
    expected = row["secret_sha256"] if row is not None else _digest("")
    # Compare even when no row matched, so both paths cost the same.
    if not hmac.compare_digest(expected, _digest(secret)) or row is None:
        return None
    return Token(row["id"], row["name"], row["scope"])
