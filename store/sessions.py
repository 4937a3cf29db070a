"""Web console sessions and one-time sign-in links, each acting as one API token.

A session is a random cookie value; only its SHA-256 is stored, beside the
token it acts as, a CSRF secret for its forms and when it expires. Every
request reads the row joined to its token, so a revoked token, a session
signed out or past its time is refused on its next request, on every node
sharing the store. A sign-in link is a random code, stored hashed, that is
deleted by the one request that redeems it: two redeeming at once cannot
both succeed.
"""

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import Column, Engine, RowMapping, Table, delete, insert, select

from store.clock import now_us
from store.schema import api_tokens, console_sessions, login_links
from store.tokens import Token


@dataclass(frozen=True, slots=True)
class Session:
    """A live sign-in: the cookie value it was found by, the token it acts as, the secret
    its forms carry, when it ends."""

    cookie: str
    token: Token
    csrf: str
    expires_us: int


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def open_session(engine: Engine, token_id: str, lifetime_us: int) -> tuple[str, Session]:
    """A new session for a live token: the cookie value (not stored) and the session."""
    value = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    moment = now_us()
    with engine.begin() as connection:
        # Those past their time go as new ones come, so the table holds live sessions only.
        connection.execute(delete(console_sessions).where(console_sessions.c.expires_us <= moment))
        connection.execute(delete(login_links).where(login_links.c.expires_us <= moment))
        connection.execute(
            insert(console_sessions).values(
                id_sha256=_digest(value),
                token_id=token_id,
                csrf=csrf,
                created_us=moment,
                expires_us=moment + lifetime_us,
            )
        )
    found = find(engine, value)
    if found is None:
        raise LookupError(f"token {token_id} is not live")
    return value, found


def find(engine: Engine, value: str) -> Session | None:
    """The live session a cookie value stands for: unexpired, its token not revoked."""
    row = _live(engine, console_sessions, console_sessions.c.id_sha256, value)
    if row is None:
        return None
    return Session(value, Token.from_row(row), row["csrf"], row["expires_us"])


def _live(engine: Engine, table: Table, key: Column[str], secret: str) -> RowMapping | None:
    """The unexpired row of `table` whose `key` is `secret`'s digest, with its token's
    columns, while that token is not revoked."""
    statement = (
        select(table, api_tokens)
        .join(api_tokens, api_tokens.c.id == table.c.token_id)
        .where(
            key == _digest(secret),
            table.c.expires_us > now_us(),
            api_tokens.c.revoked_us.is_(None),
        )
    )
    with engine.connect() as connection:
        return connection.execute(statement).mappings().first()


def end(engine: Engine, value: str) -> None:
    """Sign a session out."""
    with engine.begin() as connection:
        connection.execute(
            delete(console_sessions).where(console_sessions.c.id_sha256 == _digest(value))
        )


def end_all(engine: Engine, token_id: str) -> None:
    """Sign out every session of a token (its secret was rotated), and void its sign-in links."""
    with engine.begin() as connection:
        connection.execute(delete(console_sessions).where(console_sessions.c.token_id == token_id))
        connection.execute(delete(login_links).where(login_links.c.token_id == token_id))


def new_link(engine: Engine, token_id: str, lifetime_us: int) -> tuple[str, int]:
    """A one-time sign-in code for a token, and when it expires."""
    code = secrets.token_urlsafe(32)
    expires = now_us() + lifetime_us
    with engine.begin() as connection:
        connection.execute(
            insert(login_links).values(
                code_sha256=_digest(code), token_id=token_id, expires_us=expires
            )
        )
    return code, expires


def link_token(engine: Engine, code: str) -> Token | None:
    """The live token an unused, unexpired sign-in code is for (the code stays unused)."""
    row = _live(engine, login_links, login_links.c.code_sha256, code)
    return None if row is None else Token.from_row(row)


def redeem(engine: Engine, code: str) -> str | None:
    """The token a sign-in code was for, if it is unused and unexpired; it cannot be used again."""
    digest = _digest(code)
    with engine.begin() as connection:
        token_id = connection.execute(
            select(login_links.c.token_id).where(
                login_links.c.code_sha256 == digest, login_links.c.expires_us > now_us()
            )
        ).scalar()
        # The delete decides: of two redeeming at once, one deletes the row, the other nothing.
        taken = connection.execute(
            delete(login_links).where(login_links.c.code_sha256 == digest)
        ).rowcount
    return token_id if token_id is not None and taken == 1 else None
