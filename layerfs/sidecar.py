"""The sidecar: what an upper's ``diff/`` cannot hold, as a snapshot and a journal.

Records are per view path (see ``docs/upper-format.md`` for the fields).
Every change costs one append to ``attrs.log``, a JSON line that carries a
sequence number; the whole state is rewritten into ``attrs.json`` (atomically,
fsynced) only when the journal has grown as long as the state is large, so a
change costs O(1) amortised on disk whatever the number of records.

Durability: an append is a ``write(2)`` done before the change returns, so
a SIGKILL loses nothing acknowledged; ``fsync``/``syncfs`` of the upper make
it survive a power loss.  A torn last line (power loss in the middle of an
append) is ignored on load; any other unreadable line is corruption.

Readers that take no lock (``diff`` beside a mounted writer) read the
snapshot, then the journal, and retry if a compaction happened in between:
the journal's first sequence number then leaves a gap after the snapshot's.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Optional

from .errors import InvalidLayerError
from .hostdir import HostDir, write_file_atomically
from .paths import is_within

SNAPSHOT_FILE = "attrs.json"
JOURNAL_FILE = "attrs.log"
# Compact when the journal holds more lines than this or than there are records.
MIN_COMPACTION = 4096

log = logging.getLogger("layerfs.upper")


class Sidecar:
    """The records of one upper directory, kept in memory and on disk."""

    def __init__(self, host: HostDir, *, writable: bool):
        self.host = host
        self.writable = writable
        self.records: dict[str, dict] = {}
        self.seq = 0
        self._journal_fd: Optional[int] = None
        self._journal_lines = 0
        for _ in range(10):
            if self._load():
                break
        else:
            raise self.corrupt("the journal keeps being compacted under this reader")
        if writable:
            self._open_journal()

    # -- loading -----------------------------------------------------------

    def _load(self) -> bool:
        """Snapshot then journal; False if a compaction came in between."""
        snapshot = self._read("/" + SNAPSHOT_FILE)
        records, seq = parse_snapshot(snapshot, self.corrupt) if snapshot else ({}, 0)
        journal = self._read("/" + JOURNAL_FILE) or b""
        lines = journal.split(b"\n")
        complete, torn = lines[:-1], lines[-1]
        self._valid_length = len(journal) - len(torn)
        first = True
        for number, line in enumerate(complete):
            try:
                change = json.loads(line)
                change_seq = change["seq"]
            except (ValueError, TypeError, KeyError) as error:
                if number == len(complete) - 1 and not torn:
                    # the last line, torn by a power loss after its newline
                    self._valid_length -= len(line) + 1
                    break
                raise self.corrupt(f"journal line {number + 1}: {error}") from None
            if first and change_seq > seq + 1:
                return False
            first = False
            if change_seq <= seq:
                continue          # already in the snapshot (a compaction's crash)
            try:
                apply_change(records, change)
            except (ValueError, TypeError, KeyError, AttributeError) as error:
                raise self.corrupt(f"journal line {number + 1}: {error}") from None
            seq = change_seq
        self.records, self.seq = records, seq
        self._journal_lines = len(complete)
        return True

    def _read(self, path: str) -> Optional[bytes]:
        try:
            fd = self.host.open_file(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as stream:
            return stream.read()

    def corrupt(self, reason: str) -> InvalidLayerError:
        return InvalidLayerError(f"corrupt sidecar: {reason}",
                                 path=os.path.join(self.host.root, SNAPSHOT_FILE))

    def _open_journal(self) -> None:
        fd = self.host.open_file("/" + JOURNAL_FILE, os.O_WRONLY | os.O_CREAT, 0o600)
        # Cut a torn tail, so that the next append starts a line of its own.
        if os.fstat(fd).st_size != self._valid_length:
            os.ftruncate(fd, self._valid_length)
        os.lseek(fd, 0, os.SEEK_END)
        self._journal_fd = fd

    def close(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None

    # -- changes -------------------------------------------------------------

    def set(self, path: str, record: dict) -> None:
        """Make *record* the record of *path* (replacing any)."""
        self._log({"op": "set", "path": path, "record": record})

    def forget(self, path: str, subtree: bool = True) -> None:
        """Drop the records of *path* and, with *subtree*, everything
        beneath it (a scan of the records in memory: directories only)."""
        if path in self.records or (subtree and any(is_within(p, path)
                                                    for p in self.records)):
            self._log({"op": "forget" if subtree else "drop", "path": path})

    def move(self, source: str, destination: str, subtree: bool = True) -> None:
        """Records of *source* (and, with *subtree*, beneath it) become
        those of *destination*."""
        if source in self.records or (subtree and any(is_within(p, source)
                                                      for p in self.records)):
            self._log({"op": "move" if subtree else "rename", "path": source,
                       "to": destination})

    def _log(self, change: dict) -> None:
        if self._journal_fd is None:
            raise OSError(30, "the upper is open for reading only")
        change["seq"] = self.seq + 1
        line = json.dumps(change, sort_keys=True).encode() + b"\n"
        # One write of the whole line: done before the change is acknowledged.
        written = os.write(self._journal_fd, line)
        if written != len(line):
            raise OSError(5, f"short write to {JOURNAL_FILE}")
        apply_change(self.records, change)
        self.seq += 1
        self._journal_lines += 1
        if self._journal_lines > max(MIN_COMPACTION, len(self.records)):
            self.compact()

    def compact(self) -> None:
        """Write the whole state as the snapshot, then empty the journal.
        A crash in between leaves journal lines the snapshot already holds:
        their sequence numbers say so."""
        log.debug("compact sidecar: %d records, %d journal lines", len(self.records),
                  self._journal_lines)
        data = json.dumps({"seq": self.seq, "records": self.records}, sort_keys=True).encode()
        write_file_atomically(self.host, "/" + SNAPSHOT_FILE, data, "/work")
        os.ftruncate(self._journal_fd, 0)
        os.lseek(self._journal_fd, 0, os.SEEK_SET)
        self._journal_lines = 0

    def flush(self) -> None:
        """Make the records survive a power loss (``fsync``)."""
        if self._journal_fd is not None:
            os.fsync(self._journal_fd)


def parse_snapshot(data: bytes, corrupt: Callable[[str], Exception]) -> tuple[dict, int]:
    """``(records, seq)`` of a snapshot file: ``{"seq": N, "records": {...}}``,
    or a format-1 sidecar (records alone, sequence 0)."""
    try:
        loaded = json.loads(data or b"{}")
    except ValueError as error:
        raise corrupt(str(error)) from None
    if not isinstance(loaded, dict):
        raise corrupt("expected an object")
    if "records" in loaded and not any(key.startswith("/") for key in loaded):
        records, seq = loaded["records"], loaded.get("seq", 0)
    else:
        records, seq = loaded, 0
    if not (isinstance(records, dict) and isinstance(seq, int)
            and all(isinstance(r, dict) for r in records.values())):
        raise corrupt("expected an object of objects")
    return records, seq


def apply_change(records: dict, change: dict) -> None:
    op, path = change["op"], change["path"]
    if op == "set":
        if not isinstance(change["record"], dict):
            raise TypeError("a record must be an object")
        records[path] = change["record"]
    elif op == "drop":
        records.pop(path, None)
    elif op == "forget":
        for p in [p for p in records if is_within(p, path)]:
            del records[p]
    elif op == "rename":
        records[change["to"]] = records.pop(path)
    elif op == "move":
        destination = change["to"]
        moved = {p: r for p, r in records.items() if is_within(p, path)}
        for p in moved:
            del records[p]
        cut = len(path)
        for p, record in moved.items():
            records[destination + p[cut:]] = record
    else:
        raise ValueError(f"unknown change {op!r}")
