"""The events' durable queue: an append-only JSONL journal in ``<data_dir>/events/``, fsynced before ``add``
returns, replayed at start.

Why files and not a ``reid_events`` table in the gallery's database: a table needs a model in ``app/db.py`` and
an Alembic migration, and its rows would be written in a second transaction after the sightings' own anyway
(the receiver must never be waited for inside the gallery's write lock), so the database buys no atomicity
here; a journal beside the crops is one ``write`` + ``fsync`` per request that has something to tell, works
the same over SQLite and PostgreSQL, and a replica's outbox does not take rows from another's.

The journal (``outbox.jsonl``) holds one JSON object a line:

* ``{"op": "add", "event": {...}, "sinks": ["webhook", "mqtt"]}``: an event to deliver to each sink;
* ``{"op": "try", "id", "sink", "attempts", "next_at", "error"}``: a failed attempt and when to try again
  (so that a restart neither forgets the back-off nor grants fresh attempts);
* ``{"op": "done", "id", "sink"}``: delivered;
* ``{"op": "fail", "id", "sink"}``: given up, after the event and its last error were appended (fsynced) to
  ``failed.jsonl``, the record of what was not delivered.

Replaying it gives the events still pending per sink. A crash mid-line leaves a torn last line: it is skipped
(that record was never acknowledged). The journal is rewritten (temporary file, fsync, rename) at start and when
it grows past ``COMPACT_BYTES``, holding only what is pending. Delivery is at least once: a crash between a
delivery and its ``done`` line sends that event again, with the same ``id`` for the receiver to drop it.

Processes sharing a data folder (replicas) each take a slot, ``outbox.jsonl`` or ``outbox-<n>.jsonl``, under an
exclusive ``flock`` of its ``.lock`` file; at start a process adopts the events of any slot nobody holds (a
replica that is gone), so no event waits for a process that will never come back.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from models.files import atomic_path

logger = logging.getLogger(__name__)

COMPACT_BYTES = 4 * 1024 * 1024  # rewrite the journal past this (it only grows between rewrites)
MAX_SLOTS = 64  # processes that may share one data folder's outbox at once
FAILED_FILE = "failed.jsonl"


@dataclass
class Delivery:
    """One sink's progress with one event."""

    attempts: int = 0
    next_at: float = 0.0  # Unix time (wall clock: it must mean the same after a restart)
    last_error: str | None = None


@dataclass
class Pending:
    """An event and the sinks it is still owed to."""

    event: dict[str, Any]
    sinks: dict[str, Delivery] = field(default_factory=dict)


def _slot_name(slot: int) -> str:
    return "outbox" if slot == 0 else f"outbox-{slot}"


def _write_durably(fd: int, data: bytes) -> None:
    """Append ``data`` and fsync: when this returns the bytes survive a crash or a power cut."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def replay(lines: Iterable[bytes]) -> dict[str, Pending]:
    """The events a journal leaves pending, in the order they were added."""
    pending: dict[str, Pending] = {}
    for number, raw in enumerate(lines, 1):
        try:
            record = json.loads(raw)
            op = record["op"]
            if op == "add":
                event = record["event"]
                pending[event["id"]] = Pending(event, {sink: Delivery() for sink in record["sinks"]})
                continue
            owed = pending.get(record["id"])
            if owed is None or record["sink"] not in owed.sinks:
                continue  # settled already (a duplicate line after an adoption)
            if op == "try":
                owed.sinks[record["sink"]] = Delivery(record["attempts"], record["next_at"], record.get("error"))
            elif op in ("done", "fail"):
                del owed.sinks[record["sink"]]
                if not owed.sinks:
                    del pending[record["id"]]
        except (ValueError, KeyError, TypeError):
            # A torn last line (a crash mid-write: never acknowledged) or a hand-edited one: not worth a refusal.
            logger.warning("events outbox: line %d is not a record, skipped", number)
    return pending


def _records(pending: dict[str, Pending]) -> Iterator[dict[str, Any]]:
    """The shortest journal that replays to ``pending``."""
    for event_id, owed in pending.items():
        yield {"op": "add", "event": owed.event, "sinks": list(owed.sinks)}
        for sink, d in owed.sinks.items():
            if d.attempts:
                yield {
                    "op": "try",
                    "id": event_id,
                    "sink": sink,
                    "attempts": d.attempts,
                    "next_at": d.next_at,
                    "error": d.last_error,
                }


class Outbox:
    """The pending events of this process's slot, in memory and in the journal; every method is thread-safe."""

    def __init__(self, folder: Path, compact_bytes: int = COMPACT_BYTES) -> None:
        self.folder = folder
        self.compact_bytes = compact_bytes
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}
        self._lock_file: IO[bytes] | None = None
        self._fd = -1
        self._journal = folder / "outbox.jsonl"

    # -- opening and closing ----------------------------------------------------------------------------------

    def open(self) -> None:
        """Take a slot, replay it and adopt the slots nobody holds, then rewrite the journal compactly."""
        self.folder.mkdir(parents=True, exist_ok=True)
        slot = self._take_slot()
        self._journal = self.folder / f"{_slot_name(slot)}.jsonl"
        self._pending = self._read(self._journal)
        adopted = self._adopt_orphans(slot)
        self._rewrite()
        for path in adopted:  # only now that their events are fsynced in ours
            path.unlink(missing_ok=True)
        if self._pending:
            logger.info("events outbox %s: %d events pending from before", self._journal, len(self._pending))

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._lock_file is not None:
                self._lock_file.close()  # releases the flock
                self._lock_file = None

    def _take_slot(self) -> int:
        for slot in range(MAX_SLOTS):
            handle = (self.folder / f"{_slot_name(slot)}.lock").open("ab")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            self._lock_file = handle
            return slot
        raise RuntimeError(f"events outbox: all {MAX_SLOTS} slots in {self.folder} are held by other processes")

    def _adopt_orphans(self, own: int) -> list[Path]:
        """Merge the pending events of every slot no live process holds (its flock died with its process)."""
        adopted: list[Path] = []
        for slot in range(MAX_SLOTS):
            journal = self.folder / f"{_slot_name(slot)}.jsonl"
            if slot == own or not journal.exists():
                continue
            with (self.folder / f"{_slot_name(slot)}.lock").open("ab") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live replica's
                orphans = self._read(journal)
                for event_id, owed in orphans.items():
                    self._pending.setdefault(event_id, owed)
                if orphans:
                    logger.info("events outbox: adopted %d pending events of %s", len(orphans), journal.name)
                adopted.append(journal)
        return adopted

    @staticmethod
    def _read(journal: Path) -> dict[str, Pending]:
        if not journal.exists():
            return {}
        with journal.open("rb") as handle:
            return replay(handle)

    def _rewrite(self) -> None:
        """Replace the journal by one holding only the pending events: temp file, fsync, rename, fsync folder."""
        with atomic_path(self._journal, durable=True) as temporary:
            temporary.write_bytes(b"".join(_line(r) for r in _records(self._pending)))
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self._journal, os.O_WRONLY | os.O_APPEND)

    # -- the records --------------------------------------------------------------------------------------------

    def _append(self, records: list[dict[str, Any]]) -> None:
        if self._fd < 0:
            raise RuntimeError("the events outbox is not open")
        _write_durably(self._fd, b"".join(_line(r) for r in records))
        if os.fstat(self._fd).st_size > self.compact_bytes:
            self._rewrite()

    def add(self, events: list[dict[str, Any]], sinks: list[str], now: float) -> None:
        """Queue ``events`` for each of ``sinks``, durably: one write and one fsync for them all."""
        if not events or not sinks:
            return
        with self._lock:
            self._append([{"op": "add", "event": event, "sinks": sinks} for event in events])
            for event in events:
                self._pending[event["id"]] = Pending(event, {sink: Delivery(next_at=now) for sink in sinks})

    def attempted(self, event_id: str, sink: str, attempts: int, next_at: float, error: str) -> None:
        """A failed attempt, to be retried at ``next_at``."""
        with self._lock:
            owed = self._pending.get(event_id)
            if owed is None or sink not in owed.sinks:
                return
            self._append(
                [{"op": "try", "id": event_id, "sink": sink, "attempts": attempts, "next_at": next_at, "error": error}]
            )
            owed.sinks[sink] = Delivery(attempts, next_at, error)

    def delivered(self, event_id: str, sink: str) -> None:
        with self._lock:
            if self._settle(event_id, sink) is not None:
                self._append([{"op": "done", "id": event_id, "sink": sink}])

    def failed(self, event_id: str, sink: str, attempts: int, error: str) -> None:
        """Give up: the event, its attempts and last error go to ``failed.jsonl`` before the journal lets go."""
        with self._lock:
            owed = self._settle(event_id, sink)
            if owed is None:
                return
            record = {"sink": sink, "attempts": attempts, "last_error": error, "event": owed.event}
            fd = os.open(self.folder / FAILED_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                _write_durably(fd, _line(record))  # one O_APPEND write: lines of two replicas never interleave
            finally:
                os.close(fd)
            self._append([{"op": "fail", "id": event_id, "sink": sink}])

    def _settle(self, event_id: str, sink: str) -> Pending | None:
        owed = self._pending.get(event_id)
        if owed is None or owed.sinks.pop(sink, None) is None:
            return None
        if not owed.sinks:
            del self._pending[event_id]
        return owed

    # -- reading ------------------------------------------------------------------------------------------------

    def next_due(self, sink: str) -> tuple[dict[str, Any], Delivery] | None:
        """The event owed to ``sink`` that is due first (the oldest among equals), with its progress."""
        with self._lock:
            best: tuple[dict[str, Any], Delivery] | None = None
            for owed in self._pending.values():
                d = owed.sinks.get(sink)
                if d is not None and (best is None or d.next_at < best[1].next_at):
                    best = (owed.event, d)
            return best

    def owed(self, sink: str) -> list[dict[str, Any]]:
        """Every event still owed to ``sink``, oldest first."""
        with self._lock:
            return [owed.event for owed in self._pending.values() if sink in owed.sinks]

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)
