"""Files written whole or not at all: readers never see half a weights file, graph, index, crop or checkpoint."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk (fsync works on any descriptor of the inode)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, overwrite: bool = True, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends without an
    exception, removed otherwise (the rename is atomic on one file system). With ``overwrite=False`` the first
    writer wins: a ``path`` that exists by then is kept and FileExistsError raised (a hard link, which never
    replaces, instead of the rename). With ``durable=True`` the file is fsynced before the rename and its folder
    after, so that the file survives a power cut like a database row that points to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if durable:
            fsync_path(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
