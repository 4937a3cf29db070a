"""API tokens: `oob_<id>_<secret>`, shown once, stored as SHA-256 of the secret.

The id finds the row; the secret's hash is then compared in constant time,
so neither a lookup by secret nor a byte-by-byte comparison leaks timing.
A revoked token fails on its next request: every request reads the row.
Rotating keeps a token's id, name and scope and replaces its secret.
"""

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from store.clock import now_us
from store.schema import api_tokens

PREFIX = "oob_"

# Which token scopes may do what needs a given scope.
GRANTS = {
    "read": frozenset({"read", "mint", "ack", "admin"}),
    "mint": frozenset({"mint", "admin"}),
    "ack": frozenset({"ack", "admin"}),
    "admin": frozenset({"admin"}),
}


@dataclass(frozen=True, slots=True)
class Token:
    """A token's name and scope (never its secret)."""

    id: str
    name: str
    scope: str
    created_us: int = 0
    revoked_us: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> "Token":
        return cls(row["id"], row["name"], row["scope"], row["created_us"], row["revoked_us"])

    def may(self, needed: str) -> bool:
        """Whether this token's scope covers what needs `needed`."""
        return self.scope in GRANTS[needed]


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _text(token_id: str, secret: str) -> str:
    return f"{PREFIX}{token_id}_{secret}"


def create(engine: Engine, name: str, scope: str) -> tuple[Token, str]:
    """A new token and its full text, which is not stored and cannot be shown again."""
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    created = now_us()
    try:
        with engine.begin() as connection:
            connection.execute(
                insert(api_tokens).values(
                    id=token_id,
                    name=name,
                    scope=scope,
                    secret_sha256=_digest(secret),
                    created_us=created,
                )
            )
    except IntegrityError:
        raise ValueError(f"a token named {name!r} exists already") from None
    return Token(token_id, name, scope, created), _text(token_id, secret)


def listing(engine: Engine) -> list[Token]:
    """Every token, revoked ones included, oldest first."""
    with engine.connect() as connection:
        rows = connection.execute(select(api_tokens).order_by(api_tokens.c.created_us)).mappings()
        return [Token.from_row(row) for row in rows]


def find(engine: Engine, token_id: str) -> Token | None:
    with engine.connect() as connection:
        row = (
            connection.execute(select(api_tokens).where(api_tokens.c.id == token_id))
            .mappings()
            .first()
        )
    return None if row is None else Token.from_row(row)


def revoke(engine: Engine, token_id: str) -> tuple[Token, bool] | None:
    """Revoke a token; returns it and whether it was revoked already, or None if unknown."""
    with engine.begin() as connection:
        changed = connection.execute(
            update(api_tokens)
            .where(api_tokens.c.id == token_id, api_tokens.c.revoked_us.is_(None))
            .values(revoked_us=now_us())
        ).rowcount
        row = (
            connection.execute(select(api_tokens).where(api_tokens.c.id == token_id))
            .mappings()
            .first()
        )
    return None if row is None else (Token.from_row(row), changed == 0)


def rotate(engine: Engine, token_id: str) -> tuple[Token, str] | None:
    """A new secret for a live token (the old one fails at once), or None if none is live."""
    secret = secrets.token_urlsafe(32)
    with engine.begin() as connection:
        changed = connection.execute(
            update(api_tokens)
            .where(api_tokens.c.id == token_id, api_tokens.c.revoked_us.is_(None))
            .values(secret_sha256=_digest(secret))
        ).rowcount
        row = (
            connection.execute(select(api_tokens).where(api_tokens.c.id == token_id))
            .mappings()
            .first()
        )
    if not changed or row is None:
        return None
    return Token.from_row(row), _text(token_id, secret)


def authenticate(engine: Engine, presented: str) -> Token | None:
    """The live token `presented` stands for, or None."""
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
    return Token.from_row(row)
