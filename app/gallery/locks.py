"""The gallery's locks: the data folder's (one process per SQLite folder) and the index's read/write lock."""

from __future__ import annotations

import contextlib
import fcntl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """An exclusive lock on the data folder for as long as the returned file stays open (the process dies: it
    is released). SQLite is a single-process store, so a second process on the same folder is refused."""
    path = data_dir / "gallery.lock"
    handle = path.open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RuntimeError(
            f"another process already uses the data folder {data_dir} (it holds {path}). SQLite is a "
            "single-process store: stop the other process, give this one another REID_DATA_DIR, or run several "
            "replicas on PostgreSQL (REID_DATABASE_URL)"
        ) from None
    return handle


class ReadWriteLock:
    """Many readers (searches, snapshots) or one writer (index changes); a waiting writer goes first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
