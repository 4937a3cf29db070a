"""The local spool: a durable journal of the events the store could not take when they came.

An answered canary is a recorded canary, even while PostgreSQL is away or
another process holds SQLite's lock: the writer appends those events here,
fsync'd before anyone answers, and replays them into the ledger, in their
order, once the store takes them again.

The journal is one file of lines: a header naming the file's epoch (random,
new for every file), then one record per event, each `<crc32> <json>`, the
JSON carrying the record's number (increasing). A write that fails is cut
off again before the caller hears of it, so a record is in the journal
exactly when its caller was told so. A line that fails its check is skipped
(and counted): a torn tail, never answered, is cut at start; damage in the
middle costs that line only. Replay progress is a separate small state
file, replaced atomically: the epoch and the number and offset of the last
record known to be in the ledger. The ledger learns each replayed record's
key (`<epoch>:<number>`) in the transaction that appends it
(`spool_replays`), so a replay cut off between its commit and its state
write skips what is in already, and nothing is appended twice. A file whose
records are all in the ledger is removed.

One process owns a spool: it holds an exclusive lock on `<path>.lock` (which
stays) for its life, and a second one is refused. `inspect` reads a spool without
changing it, for `doctor`, beside the node that owns it.
"""

import contextlib
import fcntl
import json
import logging
import os
import secrets
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from store.ledger import Event

log = logging.getLogger(__name__)


class SpoolFull(Exception):
    """The spool holds max_bytes already: the event is neither recorded nor spooled."""


class SpoolBusy(Exception):
    """Another process owns this spool."""


@dataclass(frozen=True, slots=True)
class Spooled:
    """One record of the journal: its number, the event, and the offset just after it."""

    number: int
    event: Event
    end: int


@dataclass(frozen=True, slots=True)
class Look:
    """What a spool holds, read without changing it."""

    pending: int
    size: int
    damaged: int


def _state_path(path: Path) -> Path:
    return path.with_name(path.name + ".state")


def lock_path(path: Path) -> Path:
    """The file whose lock says which process owns the spool at `path`."""
    return path.with_name(path.name + ".lock")


def _line(payload: dict[str, Any]) -> bytes:
    text = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %s\n" % (zlib.crc32(text), text)


def _parse(line: bytes) -> dict[str, Any] | None:
    """A line's payload, or None for a torn or damaged line."""
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return None
    text = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(text):
            return None
        payload = json.loads(text)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)
    _sync_directory(path.parent)


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class _Journal:
    """A journal file read as it is: header, replay state, records from an offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.epoch = ""
        self.start = 0  # where the records begin
        self.done: int | None = None  # from the state file: last record in the ledger
        self.offset = 0  # and where the records after it begin
        self.damaged = 0

    def read_head(self) -> bool:
        """Read the header and the replay state; False when the header is torn or damaged."""
        with self.path.open("rb") as handle:
            first = handle.readline()
        header = _parse(first)
        if header is None or not isinstance(header.get("epoch"), str):
            return False
        self.epoch, self.start = header["epoch"], len(first)
        self.offset = self.start
        state_path = _state_path(self.path)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            state = json.loads(state_path.read_bytes())
            if state["epoch"] == self.epoch:
                self.done, self.offset = int(state["done"]), int(state["offset"])
        return True

    def records(self, offset: int, after: int = 0) -> Iterator[Spooled]:
        """Whole records from `offset` on, numbered past `after`, damaged lines skipped."""
        with self.path.open("rb") as handle:
            handle.seek(offset)
            for line in handle:
                offset += len(line)
                payload = _parse(line)
                record = None if payload is None else _record(payload, offset)
                if record is None or record.number <= after:
                    self.damaged += line.endswith(b"\n")
                    continue
                after = record.number
                yield record


def _record(payload: dict[str, Any], end: int) -> Spooled | None:
    try:
        number, event = payload["n"], Event(**payload["event"])
    except (KeyError, TypeError):
        return None
    return Spooled(number, event, end) if isinstance(number, int) else None


def inspect(path: Path) -> Look:
    """What the spool at `path` holds, without changing it (its owner may be writing)."""
    journal = _Journal(path)
    try:
        if not journal.read_head():
            return Look(0, path.stat().st_size, 1)
        pending = sum(1 for _ in journal.records(journal.offset, journal.done or 0))
        return Look(pending, path.stat().st_size, journal.damaged)
    except FileNotFoundError:
        return Look(0, 0, 0)


def strays(path: Path) -> list[tuple[Path, int]]:
    """Other spools beside `path` with events waiting (one a node left behind when its name,
    and so its default spool path, changed), and how many."""
    found = []
    for other in sorted(path.parent.glob("*.spool")):
        if other != path:
            waiting = inspect(other).pending
            if waiting:
                found.append((other, waiting))
    return found


class Spool:
    """The journal at `path`, at most `max_bytes`; used from one thread (the ledger writer's)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.epoch = ""
        self.damaged = 0
        self._size = 0
        self._last = 0  # number of the last record written
        self._done = 0  # number of the last record in the ledger
        self._offset = 0  # where the first record not in the ledger starts
        self._descriptor: int | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(lock_path(path), os.O_RDONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise SpoolBusy(f"another process uses the spool at {path}") from None
        self._load()

    @property
    def pending(self) -> int:
        """Records not yet in the ledger."""
        return self._last - self._done

    @property
    def size(self) -> int:
        return self._size

    def key(self, number: int) -> str:
        return f"{self.epoch}:{number}"

    def add(self, events: list[Event]) -> list[int]:
        """Journal `events`, fsync'd; their numbers. SpoolFull when they do not fit; OSError
        when they could not be written (then none of them is in the journal)."""
        data = b"".join(
            _line({"n": self._last + place, "event": asdict(event)})
            for place, event in enumerate(events, start=1)
        )
        if self._descriptor is None:
            self._create()
        assert self._descriptor is not None
        if self._size + len(data) > self.max_bytes:
            raise SpoolFull(
                f"the spool at {self.path} holds {self._size} of {self.max_bytes} bytes"
            )
        try:
            # At the end of what is recorded, whatever a failed write left after it: the next
            # write goes over that, so nothing of an unrecorded batch survives between records.
            written = 0
            while written < len(data):
                written += os.pwrite(self._descriptor, data[written:], self._size + written)
            os.fsync(self._descriptor)
        except OSError:
            # Its caller is told it is not recorded: what was written of it must not stay.
            with contextlib.suppress(OSError):
                os.ftruncate(self._descriptor, self._size)
            raise
        self._size += len(data)
        first = self._last + 1
        self._last += len(events)
        return list(range(first, self._last + 1))

    def unreplayed(self, limit: int) -> list[Spooled]:
        """Up to `limit` records after the last one in the ledger, in order."""
        found = []
        journal = _Journal(self.path)
        for record in journal.records(self._offset, self._done):
            found.append(record)
            if len(found) == limit:
                break
        self.damaged += journal.damaged
        return found

    def replayed(self, last: Spooled) -> None:
        """Records up to `last` are in the ledger: remember it, and remove a finished file."""
        self._done, self._offset = last.number, last.end
        if self._done < self._last:
            state = {"epoch": self.epoch, "done": self._done, "offset": self._offset}
            _write_atomically(_state_path(self.path), json.dumps(state).encode())
        else:
            self._remove()

    def set_aside(self) -> Path:
        """Records are counted that cannot be read back: keep the file for a person to look
        at, and start afresh. Where it went."""
        aside = self.path.with_name(f"{self.path.name}.damaged-{time.time_ns()}")
        self.path.replace(aside)
        log.error("the spool at %s is damaged; kept as %s", self.path, aside)
        self._done = self._last
        self._remove(missing_ok=True)
        return aside

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
        if self._lock >= 0:
            # The lock file stays: unlinked while held, a second owner could lock a new one.
            os.close(self._lock)
            self._lock = -1

    def _remove(self, missing_ok: bool = False) -> None:
        """Every record is in the ledger: the next one starts a new file."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
        self.path.unlink(missing_ok=missing_ok)
        _state_path(self.path).unlink(missing_ok=True)
        _sync_directory(self.path.parent)
        self.epoch, self._size, self._offset = "", 0, 0

    def _create(self) -> None:
        self.epoch = secrets.token_hex(8)
        header = _line({"spool": 1, "epoch": self.epoch})
        self._descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(self._descriptor, header)
        self._size = self._offset = len(header)
        # Numbers go on across files, so a placeholder names one record for the process's life.
        self._done = self._last

    def _load(self) -> None:
        """Pick up a journal a previous run left, and how far its replay got."""
        if not self.path.exists():
            return
        journal = _Journal(self.path)
        if not journal.read_head():
            if self.path.stat().st_size < len(_line({"spool": 1, "epoch": "0" * 16})):
                self.path.unlink()  # cut off as it was created: no record of it was fsync'd
            else:
                self.damaged += 1
                self.set_aside()
            return
        self.epoch, self._offset = journal.epoch, journal.offset
        end = journal.offset
        done = journal.done
        for record in journal.records(journal.offset, done or 0):
            if done is None:  # no replay got anywhere: the first record is the first to replay
                done = record.number - 1
            self._last, end = record.number, record.end
        self._done = done or 0
        self._last = max(self._last, self._done)
        self.damaged += journal.damaged
        if self.damaged:
            log.error("the spool at %s has %d damaged lines, skipped", self.path, self.damaged)
        # A torn tail was never answered: cut it, so new records follow whole ones.
        self._descriptor = os.open(self.path, os.O_WRONLY)
        os.ftruncate(self._descriptor, end)
        os.lseek(self._descriptor, end, os.SEEK_SET)
        self._size = end
        if self._last == self._done:
            self._remove()
