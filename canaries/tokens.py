"""Canary tokens: minting them and recognising them, as pure functions.

A token is 26 lowercase base32 characters: 112 random bits followed by a
16-bit check of those bits, HMAC-SHA256 under the deployment's `TokenKey`
(one secret, kept in the store, shared by every node on it). The check lets a
listener tell a plausible token (one a canary may have been minted with a
moment ago on another node) from junk without asking the store. Because the
check needs the key, nobody outside can forge names that pass it: a flood of
made-up names under the zone reaches the database only at the 1-in-65,536
rate of chance collisions.

Tokens minted before the check was keyed carry an unkeyed checksum, so they
are not plausible (but by the same 1-in-65,536 chance), and need not be: every
canary is in the token index, which finds a known token whatever its check.
An unknown token with the old checksum is junk.

Base32 keeps tokens DNS-safe and case-insensitive: resolvers are free to
change the case of a query name (0x20 encoding), and mail domains are
case-insensitive too.
"""

import base64
import binascii
import hmac
import secrets
from dataclasses import dataclass, field

RANDOM_BYTES = 14
CHECK_BYTES = 2
TOKEN_LENGTH = 26
KEY_MIN_BYTES = 16
_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
# The same digits in int()'s base-32 alphabet: decoding a candidate as one
# integer is several times faster than base64.b32decode on the junk hot path.
_AS_INT_DIGITS = str.maketrans(
    "abcdefghijklmnopqrstuvwxyz234567", "0123456789abcdefghijklmnopqrstuv"
)


@dataclass(frozen=True, slots=True)
class TokenKey:
    """The deployment's secret that token checks are keyed with."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < KEY_MIN_BYTES:
            raise ValueError(f"a token key needs at least {KEY_MIN_BYTES} bytes")


def _check(random_part: bytes, key: TokenKey) -> bytes:
    return hmac.digest(key.secret, random_part, "sha256")[:CHECK_BYTES]


def new_token(key: TokenKey) -> str:
    """A fresh token from the operating system's CSPRNG, checked under `key`."""
    random_part = secrets.token_bytes(RANDOM_BYTES)
    raw = random_part + _check(random_part, key)
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def is_plausible(candidate: str, key: TokenKey) -> bool:
    """True when `candidate` (any case) is well formed and its check under `key` matches."""
    if len(candidate) != TOKEN_LENGTH or not candidate.isascii():
        return False
    lowered = candidate.lower()
    if not _ALPHABET.issuperset(lowered):
        return False
    # 26 digits carry 130 bits: the token's 128, then 2 bits of padding.
    raw = (int(lowered.translate(_AS_INT_DIGITS), 32) >> 2).to_bytes(RANDOM_BYTES + CHECK_BYTES)
    return _check(raw[:RANDOM_BYTES], key) == raw[RANDOM_BYTES:]


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
