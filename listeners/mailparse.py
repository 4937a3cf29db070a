"""What an accepted message shows, sans I/O: headers, subject, attachments, and all its text.

Messages are attacker-controlled and may be malformed in any way; the
standard library's parser is lenient, and anything it still chokes on
falls back to treating the raw bytes as text, so inspection never fails.
"""

import email
import email.policy
import hashlib
from dataclasses import dataclass, field
from email.message import Message

MAX_HEADERS = 50
MAX_HEADER_VALUE = 1000
EXCERPT_BYTES = 4096
MAX_ATTACHMENTS = 50


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment: its declared name, size and SHA-256."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class MailDetails:
    """The evidence kept of a message, and the text to scan for tokens."""

    size: int
    sha256: str
    subject: str
    headers: list[tuple[str, str]]
    attachments: list[Attachment]
    excerpt: str
    text: str = field(repr=False)
    parsed: bool = True


def inspect_message(raw: bytes) -> MailDetails:
    """Evidence from a raw RFC 5322 message."""
    size = len(raw)
    digest = hashlib.sha256(raw).hexdigest()
    excerpt = raw[:EXCERPT_BYTES].decode("utf-8", "replace")
    try:
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
        headers = [
            (str(name)[:MAX_HEADER_VALUE], str(value)[:MAX_HEADER_VALUE])
            for name, value in list(message.items())[:MAX_HEADERS]
        ]
        subject = str(message.get("Subject", ""))[:MAX_HEADER_VALUE]
        texts, attachments = _parts(message)
    except Exception:
        # The parser gave up: keep the hash and size, and scan the raw bytes.
        text = raw.decode("utf-8", "replace")
        return MailDetails(size, digest, "", [], [], excerpt, text, parsed=False)
    header_text = "\n".join(f"{name}: {value}" for name, value in message.items())
    return MailDetails(
        size, digest, subject, headers, attachments, excerpt, "\n".join([header_text, *texts])
    )


def _parts(message: Message) -> tuple[list[str], list[Attachment]]:
    texts: list[str] = []
    attachments: list[Attachment] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            payload = str(part.get_payload()).encode("utf-8", "replace")
        charset = part.get_content_charset() or "utf-8"
        try:
            texts.append(payload.decode(charset, "replace"))
        except LookupError:
            texts.append(payload.decode("utf-8", "replace"))
        filename = part.get_filename()
        if filename is not None and len(attachments) < MAX_ATTACHMENTS:
            attachments.append(
                Attachment(
                    str(filename)[:MAX_HEADER_VALUE],
                    len(payload),
                    hashlib.sha256(payload).hexdigest(),
                )
            )
    return texts, attachments
