"""Signing in to the console: the session cookie, and the checks every form post passes.

The session cookie is HttpOnly, SameSite=Strict, Secure when the console is
reached over HTTPS (`[api] public_url`), and lasts as long as the session.
A form post must carry the session's CSRF secret and, when the browser says
where it comes from (`Origin`), come from the console itself. The sign-in
form, posted before there is a session, carries a secret that a cookie set
with the form repeats.
"""

import hmac
import secrets
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlsplit

from fastapi import HTTPException, Request, Response

COOKIE = "oobwatch_session"
LOGIN_COOKIE = "oobwatch_login"
# Form fields a console form has at most; a post with more is not one of ours.
MAX_FIELDS = 50


def cookie_value(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == b"cookie":
            for part in value.decode("latin-1").split(";"):
                found, _, text = part.strip().partition("=")
                if found == name and text:
                    return text
    return None


def secure(request: Request, public_url: str | None) -> bool:
    return request.url.scheme == "https" or (public_url or "").startswith("https://")


def set_cookie(
    response: Response, name: str, value: str, max_age: int, *, secure_only: bool, path: str = "/ui"
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=path,
        httponly=True,
        samesite="strict",
        secure=secure_only,
    )


def new_login_secret() -> str:
    return secrets.token_urlsafe(24)


def form(request: Request) -> dict[str, str]:
    """A posted URL-encoded form (the gate has read it, bounded in size); each field once."""
    body = bytes(getattr(request.state, "body", b"")).decode("utf-8", "replace")
    try:
        pairs = parse_qsl(body, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError:
        raise HTTPException(400, "not a form") from None
    return dict(pairs)


def check_origin(request: Request, public_url: str | None) -> None:
    """Refuse a post another site's page made, where the browser says so."""
    origin = request.headers.get("origin")
    if origin is None:
        return
    own = {f"{request.url.scheme}://{request.headers.get('host', '')}"}
    if public_url:
        parts = urlsplit(public_url)
        own.add(f"{parts.scheme}://{parts.netloc}")
    if origin not in own:
        raise HTTPException(403, "this form was posted from another site")


def check_csrf(fields: Mapping[str, str], expected: str) -> None:
    if not hmac.compare_digest(fields.get("csrf", "").encode(), expected.encode()):
        raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page")


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a console path, never another site."""
    if (
        target
        and target.startswith("/ui/")
        and not target.startswith("//")
        and "\\" not in target
        and all(ord(char) > 0x20 for char in target)
    ):
        return target
    return "/ui/"
