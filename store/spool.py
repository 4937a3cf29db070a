"""The local spool: a durable journal of the events the store could not take when they came.

An answered canary is a recorded canary, even while PostgreSQL is away or
another process holds SQLite's lock: the writer appends those events here,
fsync'd before anyone answers, and replays them into the ledger, in their
order, once the store takes them again.

The journal is one file of lines: a header naming the file's epoch (random,
new for every file), then one record per event, each `<crc32> <json>`, the
JSON carrying the record's number. A line that is torn or fails its check
ends the journal (it was never fsync'd, so never answered). Replay progress
is a separate small state file, replaced atomically: the epoch and the
number and offset of the last record known to be in the ledger. The ledger
learns each replayed record's key (`<epoch>:<number>`) in the transaction
that appends it (`spool_replays`), so a replay cut off between its commit
and its state write skips what is in already, and nothing is appended twice.
A file whose records are all in the ledger is removed.
"""

import json
import os
import secrets
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from store.ledger import Event


class SpoolFull(Exception):
    """The spool holds max_bytes already: the event is neither recorded nor spooled."""


@dataclass(frozen=True, slots=True)
class Spooled:
    """One record of the journal: its number, the event, and the offset just after it."""

    number: int
    event: Event
    end: int


def _state_path(path: Path) -> Path:
    return path.with_name(path.name + ".state")


def _line(payload: dict[str, Any]) -> bytes:
    text = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %s\n" % (zlib.crc32(text), text)


def _parse(line: bytes) -> dict[str, Any] | None:
    """A record's payload, or None for a torn or damaged line."""
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


class Spool:
    """The journal at `path`, at most `max_bytes`; used from one thread (the ledger writer's)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.epoch = ""
        self._size = 0
        self._last = 0  # number of the last record written
        self._done = 0  # number of the last record in the ledger
        self._offset = 0  # where the first record not in the ledger starts
        self._handle: Any = None
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
        """Journal `events`, fsync'd; their numbers. SpoolFull when they do not fit."""
        lines = [
            _line({"n": self._last + place, "event": asdict(event)})
            for place, event in enumerate(events, start=1)
        ]
        data = b"".join(lines)
        if self._handle is None:
            self._create()
        if self._size + len(data) > self.max_bytes:
            raise SpoolFull(
                f"the spool at {self.path} holds {self._size} of {self.max_bytes} bytes"
            )
        self._handle.write(data)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._size += len(data)
        first = self._last + 1
        self._last += len(events)
        return list(range(first, self._last + 1))

    def unreplayed(self, limit: int) -> list[Spooled]:
        """Up to `limit` records after the last one in the ledger, in order."""
        found = []
        for record in self._records(self._offset):
            found.append(record)
            if len(found) == limit:
                break
        return found

    def replayed(self, last: Spooled) -> None:
        """Records up to `last` are in the ledger: remember it, and remove a finished file."""
        self._done, self._offset = last.number, last.end
        if self._done < self._last:
            state = {"epoch": self.epoch, "done": self._done, "offset": self._offset}
            _write_atomically(_state_path(self.path), json.dumps(state).encode())
        else:
            self._remove()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _remove(self) -> None:
        """Every record is in the ledger: the next one starts a new file."""
        self.close()
        self.path.unlink()
        _state_path(self.path).unlink(missing_ok=True)
        _sync_directory(self.path.parent)
        self.epoch, self._size, self._offset = "", 0, 0

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.epoch = secrets.token_hex(8)
        header = _line({"spool": 1, "epoch": self.epoch})
        self._handle = self.path.open("wb")
        self._handle.write(header)
        self._size = self._offset = len(header)
        # Numbers go on across files, so a placeholder names one record for the process's life.
        self._done = self._last

    def _load(self) -> None:
        """Pick up a journal a previous run left, and how far its replay got."""
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            first_line = handle.readline()
        header = _parse(first_line)
        if header is None and not first_line.endswith(b"\n"):
            # Cut off while it was being created: no record of it was ever fsync'd.
            self.path.unlink()
            return
        if header is None or not isinstance(header.get("epoch"), str):
            raise ValueError(f"{self.path} is not an oobwatch spool (its header is damaged)")
        self.epoch = header["epoch"]
        self._offset = len(first_line)
        known = False
        state_path = _state_path(self.path)
        if state_path.exists():
            state = json.loads(state_path.read_bytes())
            if state.get("epoch") == self.epoch:
                self._done, self._offset = int(state["done"]), int(state["offset"])
                known = True
        end = self._offset
        for record in self._records(self._offset):
            if not known:  # no replay got anywhere: the first record is the first to replay
                self._done, known = record.number - 1, True
            self._last, end = record.number, record.end
        self._last = max(self._last, self._done)
        # A torn tail was never answered: cut it, so new records follow whole ones.
        self._handle = self.path.open("r+b")
        self._handle.truncate(end)
        self._handle.seek(end)
        self._size = end
        if self._last == self._done:
            self._remove()

    def _records(self, offset: int) -> Iterator[Spooled]:
        """The records from `offset` on, up to the first that is torn, damaged or out of turn."""
        expected = None
        with self.path.open("rb") as handle:
            handle.seek(offset)
            while True:
                line = handle.readline()
                payload = _parse(line)
                if payload is None:
                    return
                try:
                    number, event = payload["n"], Event(**payload["event"])
                except (KeyError, TypeError):
                    return
                if not isinstance(number, int) or expected not in (None, number):
                    return
                expected = number + 1
                offset += len(line)
                yield Spooled(number, event, offset)
