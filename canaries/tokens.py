"""Canary tokens: minting them and recognising them, as pure functions.

A token is 26 lowercase base32 characters: 112 random bits followed by a
16-bit checksum of those bits. The checksum is not a secret; it lets a
listener tell a plausible token (one a canary may have been minted with a
moment ago) from random junk without asking the store, so a flood of random
names under the zone never reaches the database.

Base32 keeps tokens DNS-safe and case-insensitive: resolvers are free to
change the case of a query name (0x20 encoding), and mail domains are
case-insensitive too.
"""

import base64
import binascii
import hashlib
import secrets

RANDOM_BYTES = 14
CHECK_BYTES = 2
TOKEN_LENGTH = 26
_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")


def _check(random_part: bytes) -> bytes:
    return hashlib.sha256(b"oobwatch-token" + random_part).digest()[:CHECK_BYTES]


def new_token() -> str:
    """A fresh token from the operating system's CSPRNG."""
    random_part = secrets.token_bytes(RANDOM_BYTES)
    raw = random_part + _check(random_part)
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def is_token(candidate: str) -> bool:
    """True when `candidate` (any case) is well formed and its checksum matches."""
    if len(candidate) != TOKEN_LENGTH:
        return False
    lowered = candidate.lower()
    if not _ALPHABET.issuperset(lowered):
        return False
    raw = base64.b32decode(lowered.upper() + "======")
    random_part, check = raw[:RANDOM_BYTES], raw[RANDOM_BYTES:]
    return _check(random_part) == check


def decode_exfil(labels: list[str]) -> str | None:
    """Decode data smuggled in DNS labels left of a token, if it is base32 or hex.

    Exfiltration tools split data across labels, so the labels are joined
    before decoding; many also number their queries (`0.<data>.<token>`), so
    all-digit labels are left out next, and last each label is decoded on its
    own. Returns printable text, or None when the labels carry nothing decodable.
    """
    for chosen in (labels, [label for label in labels if not label.isdigit()]):
        text = _decoded("".join(chosen).lower())
        if text is not None:
            return text
    parts = [text for text in (_decoded(label.lower()) for label in labels) if text is not None]
    return " ".join(parts) or None


def _decoded(joined: str) -> str | None:
    if not joined:
        return None
    for decode in (_from_base32, _from_hex):
        raw = decode(joined)
        if raw is None:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text and text.isprintable():
            return text
    return None


def _from_base32(text: str) -> bytes | None:
    if not _ALPHABET.issuperset(text):
        return None
    padded = text.upper() + "=" * (-len(text) % 8)
    try:
        return base64.b32decode(padded)
    except binascii.Error:
        return None


def _from_hex(text: str) -> bytes | None:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None
