"""Stored crops: PNG files named by the sha256 of their upload, shared by every entry with the same picture.

A file is deleted only when no entry uses it, checked in the database just before the unlink, and while no
upload in this process holds it (a count per file, taken before the file is written or reused and released
after the upload's commit). Replicas share the folder but not those counts: with them, a delete leaves the
file, and the sweep removes files that no entry has used for ``grace_s`` (a reuse renews a file's time)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from app.db import Entry
from models.files import atomic_path

logger = logging.getLogger(__name__)

GRACE_S = 60.0  # one process: an upload on its way in is younger than this
REPLICA_GRACE_S = 6 * 3600.0  # replicas: another process's upload, and its commit, are done well within hours


class CropStore:
    def __init__(self, data_dir: Path, sessions: sessionmaker, shared: bool) -> None:
        self.data_dir = data_dir
        self.root = data_dir / "crops"
        self.sessions = sessions
        self.shared = shared  # other processes use the folder: deletes are left to the sweep
        self.grace_s = REPLICA_GRACE_S if shared else GRACE_S
        self._holds: Counter[str] = Counter()
        self._lock = threading.Lock()

    def store(self, data: bytes, image: Image.Image) -> tuple[str, str]:
        """Save the decoded crop as PNG, durably, under a content-addressed name and hold it until ``release``;
        (sha256 of the upload, path relative to the data folder)."""
        digest = hashlib.sha256(data).hexdigest()
        relative = f"crops/{digest[:2]}/{digest}.png"
        with self._lock:  # before the file is looked at: a delete now leaves it alone
            self._holds[relative] += 1
        path = self.data_dir / relative
        try:
            os.utime(path)  # an existing file: its age restarts, so no sweep takes it from this upload
        except FileNotFoundError:
            with atomic_path(path, durable=True) as tmp:  # it survives a power cut like the row pointing to it
                image.save(tmp, format="PNG")
        return digest, relative

    def release(self, relatives: Iterable[str]) -> None:
        with self._lock:
            for relative in relatives:
                self._holds[relative] -= 1
                if self._holds[relative] <= 0:
                    del self._holds[relative]

    def delete_unused(self, crops: dict[str, str]) -> int:
        """Retention after a delete: the files of ``crops`` (digest -> relative path) that no entry uses any more;
        the number removed. With replicas: none (the sweep's job)."""
        if self.shared or not crops:
            return 0
        removed = 0
        with self._lock:  # no upload can take one of these files between the check and the unlink
            with self.sessions() as session:
                used = set(session.scalars(select(Entry.content_sha256).where(Entry.content_sha256.in_(list(crops)))))
            for digest, relative in crops.items():
                if digest in used or self._holds[relative]:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    (self.data_dir / relative).unlink()
                    removed += 1
        return removed

    def sweep(self) -> int:
        """Remove crop files that no entry uses and that are older than ``grace_s`` (what a crash between a
        delete's commit and its unlink left, replicas' deletes, unfinished temporaries); the number removed."""
        if not self.root.is_dir():
            return 0
        with self.sessions() as session:
            used = set(session.scalars(select(Entry.crop_path).distinct()))
        cutoff = time.time() - self.grace_s
        removed = 0
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                relative = f"crops/{folder.name}/{path.name}"
                with self._lock, contextlib.suppress(FileNotFoundError):
                    if relative not in used and not self._holds[relative] and path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
        if removed:
            logger.info("removed %d crop files that no entry uses", removed)
        return removed
