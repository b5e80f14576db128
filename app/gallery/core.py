"""The gallery: the database is the truth and its log; the FAISS index is a snapshot of it plus the changes
after the snapshot's watermark.

- A write (``app.gallery.writes``) commits the entries and one numbered ``reid_changes`` row per change in one
  transaction (writers take a lock first, so the numbers are in commit order), is acknowledged, and is then
  applied to this process's index. Its cost does not depend on the gallery's size: no index file is written on
  the request path.
- Every application of a change is idempotent (an add of a live id, a delete of a missing one, do nothing), so
  replaying the log from any watermark at or below the index's true state converges on the database.
- The index is bound to its database, not only to numbers in it: the database's epoch and the change row at the
  watermark are checked at start-up, by /ready, before each write and each catch-up. A database restored from
  a backup or failed over hands the same ids and numbers out again, to other entries; an index that sees it is
  rebuilt from the database (``resyncs`` counts it).
- A background worker (``app.gallery.worker``) catches up with other replicas' changes, writes snapshots and
  rebuilds the index when it asks for it (IVF training, HNSW compaction).
- A search (``app.gallery.reads``) holds a read lock for the search alone: snapshots read-lock too, writes to
  the index write-lock."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from app import migrate
from app.columns import Columns, to_microseconds
from app.db import OP_ADD, OP_DELETE, OP_REEMBED, Entry, make_sessionmaker
from app.gallery import binding, changelog, snapshots
from app.gallery.crops import CropStore
from app.gallery.locks import ReadWriteLock, lock_data_dir
from app.gallery.rebuild import build_from_database
from app.gallery.state import IndexState
from app.gallery.worker import Worker
from app.gallery.writes import GalleryWrites
from app.index import VectorIndex, validate

if TYPE_CHECKING:
    from app.config import Settings

logger = logging.getLogger(__name__)


class Gallery(GalleryWrites):
    """The one object callers use: open, enrol and delete (``app.gallery.writes``), read and search
    (``app.gallery.reads``), catch up, snapshot, close."""

    def __init__(
        self,
        engine: Engine,
        data_dir: Path,
        dim: int,
        factory: str = "Flat",
        use_gpu: bool = False,
        fingerprint: str | None = None,
        *,
        nprobe: int = 16,
        ef_search: int = 64,
        snapshot_every: int = 10_000,
        snapshot_interval_s: float = 300.0,
        poll_interval_s: float = 1.0,
        write_lock_timeout_s: float = 10.0,
        migrate_on_open: bool = True,
        listen: bool = True,
    ) -> None:
        validate(factory, nprobe, ef_search, use_gpu)
        self.engine = engine
        self.sessions = make_sessionmaker(engine)
        self.postgres = engine.dialect.name == "postgresql"
        self.data_dir = data_dir
        self.index_path = data_dir / "gallery.faiss"
        self.crops = CropStore(data_dir, self.sessions, shared=self.postgres)
        self.crops_dir = self.crops.root
        self.dim = dim
        self.factory = factory
        self.use_gpu = use_gpu
        self.fingerprint = fingerprint
        self.epoch: str | None = None  # the database's, read at open()
        self.index_options: dict[str, Any] = {"use_gpu": use_gpu, "nprobe": nprobe, "ef_search": ef_search}
        self.snapshot_every = snapshot_every
        self.snapshot_interval_s = snapshot_interval_s
        self.write_lock_timeout_s = write_lock_timeout_s
        self.migrate_on_open = migrate_on_open
        self.state = IndexState(VectorIndex(dim, factory, **self.index_options), Columns())
        self.rw = ReadWriteLock()  # searches and snapshots read; index changes write
        self.write_lock = threading.RLock()  # one writer at a time in this process (database + index)
        self.rebuilt = False  # open() rebuilt the index from the database
        self.replayed = 0  # changes open() replayed on top of the snapshot
        self.lag = 0  # changes in the log after the watermark, as of the last ready()
        self.resyncs = 0  # rebuilds because the database changed under this process (restored, failed over)
        self.resyncing: str | None = None  # why a resync is under way: searches wait for it (503)
        self.opened = False
        self.failure: str | None = None  # why this replica must not serve (the model changed under it)
        self.changes_since_snapshot = 0
        self.last_snapshot = time.monotonic()
        self._snapshot_lock = threading.Lock()
        self._journal: list[tuple[str, tuple[Any, ...]]] | None = None  # index changes made during a rebuild
        self._lock_file: IO[bytes] | None = None
        self.worker = Worker(self, poll_interval_s, listen=listen and self.postgres)

    @classmethod
    def from_settings(
        cls, settings: Settings, engine: Engine, dim: int, fingerprint: str | None, use_gpu: bool = False
    ) -> Gallery:
        return cls(
            engine,
            settings.data_dir,
            dim,
            settings.index_factory,
            use_gpu,
            fingerprint,
            nprobe=settings.index_nprobe,
            ef_search=settings.index_ef_search,
            snapshot_every=settings.snapshot_every,
            snapshot_interval_s=settings.snapshot_interval_s,
            poll_interval_s=settings.replica_poll_s,
            write_lock_timeout_s=settings.write_lock_timeout_s,
            migrate_on_open=settings.migrate_on_start,
        )

    @property
    def index(self) -> VectorIndex:
        return self.state.index

    # -- start-up -----------------------------------------------------------------------------------

    def open(self) -> None:
        """Migrate the schema, check the model binding, then load the snapshot and replay the log after its
        watermark, or rebuild from the database when there is no usable snapshot.

        Raises OperationalError / DBAPIError for database failures (the caller retries the unreachable ones,
        ``app.faults.fatal_reason``) and anything else for a start-up that cannot succeed."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        probe = self.data_dir / f".write-probe.{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise PermissionError(f"the data folder {self.data_dir} is not writable: {exc}") from exc
        if not self.postgres and self._lock_file is None:  # (open() is retried while the database is down)
            self._lock_file = lock_data_dir(self.data_dir)
        # Owning the folder (SQLite), any unfinished snapshot is a killed process's; with replicas, an old one.
        snapshots.remove_stale_temporaries(self.index_path, 0.0 if not self.postgres else snapshots.STALE_TEMPORARY_S)
        if self.migrate_on_open:
            migrate.upgrade(self.engine)
        else:
            current, head = migrate.current_revision(self.engine), migrate.head_revision()
            if current != head:
                raise RuntimeError(
                    f"the database schema is at revision {current or 'none'}, this release needs {head}; run "
                    "`reid-admin migrate` (python -m app.admin migrate) or set REID_MIGRATE_ON_START=true"
                )
        self.crops_dir.mkdir(parents=True, exist_ok=True)
        with self.sessions() as session, session.begin():
            changelog.lock_writers(session, self.postgres, self.write_lock_timeout_s)  # replicas binding at once
            self.epoch = binding.bind(session, self.fingerprint, self.dim)
        with self.sessions() as session:
            state, reason = snapshots.load(
                self.index_path,
                session,
                self.index_options,
                dim=self.dim,
                factory=self.factory,
                fingerprint=self.fingerprint,
                epoch=self.epoch,
            )
        if state is not None:
            self.state = state
            before = state.watermark
            self.replayed = self.catch_up()
            for _ in range(3):  # other replicas may commit between the replay and the count: catch up, recount
                with self.sessions() as session:
                    count = session.scalar(select(func.count(Entry.id))) or 0
                if count == len(state.index):
                    break
                self.replayed += self.catch_up()
            if count == len(self.state.index):
                logger.info(
                    "index snapshot %s loaded (watermark %d) and %d changes replayed: %d entries, %s",
                    self.index_path,
                    before,
                    self.replayed,
                    count,
                    self.state.index.description,
                )
            else:
                reason = f"the snapshot and the log give {len(self.state.index)} entries, the database {count}"
                state = None
        if state is None:
            with self.sessions() as session:
                fresh = not self.index_path.exists() and not session.scalar(select(func.count(Entry.id)))
            # A new gallery has no snapshot yet, and nothing to rebuild: no cause for a warning.
            logger.log(logging.INFO if fresh else logging.WARNING, "rebuilding the index from the database: %s", reason)
            self.state = self._build(progress=True)
            self.catch_up()
            self.rebuilt = True
            self.changes_since_snapshot = max(1, self.changes_since_snapshot)  # snapshot it soon
        self.opened = True

    def _build(self, progress: bool = False) -> IndexState:
        return build_from_database(self.sessions, self.dim, self.factory, self.index_options, progress)

    # -- the binding to the database ----------------------------------------------------------------

    def _foreign(self, session: Session) -> str | None:
        """Why this process's index does not belong to the database any more, or None (two primary-key reads)."""
        watermark, mark = self.state.head
        if watermark and changelog.mark_at(session, watermark) != mark:
            return (
                f"the database's change {watermark} is not the one this index applied: the database was "
                "restored from a backup or failed over"
            )
        epoch = binding.epoch_of(session)
        if epoch != self.epoch:
            return f"the database's epoch is {epoch}, this index's {self.epoch}: another database"
        return None

    def resync(self, reason: str) -> None:
        """Rebuild the index from the database that changed under it; searches answer 503 meanwhile (they would
        pair old templates with the new rows' names)."""
        with self.write_lock:
            self.resyncing = reason
            try:
                logger.warning("the database changed under this replica (%s): rebuilding its index from it", reason)
                self.resyncs += 1
                with self.sessions() as session:
                    self.epoch = binding.epoch_of(session)
                new = self._build()
                with self.rw.write():
                    self.state = new
                    if self._journal is not None:
                        self._journal = []  # a background rebuild's journal was of the old database
                self.changes_since_snapshot = max(1, self.changes_since_snapshot)
                self._catch_up_locked()
                logger.warning("index rebuilt from the database after it changed: %d entries", len(new.index))
            finally:
                self.resyncing = None

    def ready(self) -> bool:
        """Opened, not stopped by a model change, bound to this database (its epoch and the change at the
        watermark: two primary-key reads, whatever the gallery's size), the index and its columns agreeing. The
        database unreachable raises (503). ``lag`` is then how many changes this replica has yet to apply."""
        with self.sessions() as session:
            last = changelog.last_seq(session)
            foreign = self._foreign(session) if self.opened else None
        if foreign is not None:
            self.worker.wake()  # the worker resyncs
            return False
        state = self.state
        self.lag = max(0, last - state.watermark)
        return (
            self.opened and self.failure is None and self.resyncing is None and len(state.index) == state.columns.live
        )

    consistent = ready  # the name /ready calls

    # -- the log --------------------------------------------------------------------------------------

    def _apply(self, op: str, *args: Any) -> int:
        """Apply one change to the index (under its write lock), journalled while a rebuild runs."""
        with self.rw.write():
            if self._journal is not None:
                self._journal.append((op, args))
            return self.state.add(*args) if op == OP_ADD else self.state.remove(*args)

    def catch_up(self) -> int:
        """Apply the changes after the watermark (other replicas' writes, or what a snapshot lacks); how many. A
        database that changed under the index is resynced first."""
        with self.write_lock:
            if self.opened or self.state.watermark:
                with self.sessions() as session:
                    foreign = self._foreign(session) if self.epoch is not None else None
                if foreign is not None:
                    self.resync(foreign)
                    return 0
            return self._catch_up_locked()

    def _catch_up_locked(self) -> int:
        applied = 0
        while True:
            with self.sessions() as session:
                rows = changelog.changes_after(session, self.state.watermark)
            if not rows:
                return applied
            self._replay(rows)
            applied += len(rows)
            self.state.advance(rows[-1].seq, changelog.mark_of(rows[-1]))

    def _replay(self, rows: Sequence[Any]) -> None:
        i = 0
        while i < len(rows):
            j = i
            while j < len(rows) and rows[j].op == rows[i].op:
                j += 1
            run, i = rows[i:j], j
            if run[0].op == OP_ADD:
                present = [r for r in run if r.embedding is not None]  # a deleted entry: its delete follows
                if present:
                    self._apply(
                        OP_ADD,
                        np.array([r.entry_id for r in present], np.int64),
                        np.stack([np.frombuffer(r.embedding, dtype="<f4") for r in present]),
                        [r.camera for r in present],
                        np.array([to_microseconds(r.captured_at or r.created_at) for r in present], np.int64),
                    )
            elif run[0].op == OP_DELETE:
                self._apply(OP_DELETE, np.array([r.entry_id for r in run], np.int64))
            elif run[0].op == OP_REEMBED:
                with self.sessions() as session:
                    stored = binding.stored_fingerprint(session)
                if self.fingerprint is not None and stored is not None and stored != self.fingerprint:
                    self.failure = binding.mismatch_message(stored, self.fingerprint)
                    logger.critical("the gallery was re-embedded under other weights: %s", self.failure)
                else:  # every embedding changed: this replica's index is rebuilt from the new ones
                    self.worker.start_rebuild("the gallery was re-embedded")
            self.changes_since_snapshot += len(run)

    # -- snapshots and rebuilds -------------------------------------------------------------------------

    def snapshot(self) -> int:
        """Write the index, its columns, its watermark and the database's epoch atomically to ``index_path``;
        the bytes written. Searches go on meanwhile; index changes wait for it."""
        with self._snapshot_lock:
            started = time.monotonic()
            with self.rw.read():
                state = self.state
                changes = self.changes_since_snapshot
                size, entries = snapshots.write(self.index_path, state, self.fingerprint, self.epoch)
                watermark = state.watermark
            self.changes_since_snapshot -= changes
            self.last_snapshot = time.monotonic()
            logger.info(
                "index snapshot written: %d entries, watermark %d, %.0f MiB in %.1f s",
                entries,
                watermark,
                size / 2**20,
                time.monotonic() - started,
            )
            return size

    def _rebuild(self) -> None:
        """Build a new index from the database while the old one serves; the index changes made meanwhile are
        journalled and replayed onto the new one before the swap."""
        try:
            with self.write_lock:
                self._journal = []
            new = self._build()
            with self.write_lock, self.rw.write():
                for op, args in self._journal or []:
                    new.add(*args) if op == OP_ADD else new.remove(*args)
                new.head, new.ahead = self.state.head, dict(self.state.ahead)
                self.state = new
                self._journal = None
            self.changes_since_snapshot = max(1, self.changes_since_snapshot)
            logger.info("index rebuilt in the background: %d entries, %s", len(new.index), new.index.description)
            self.worker.wake()
        except Exception:
            self._journal = None
            logger.exception("background index rebuild failed; the current index keeps serving")

    def start_background(self) -> None:
        """Start the worker that catches up, snapshots, rebuilds and sweeps (and, on PostgreSQL, listens)."""
        self.worker.start()

    def close(self) -> None:
        """Stop the background threads, write a final snapshot when the index changed, release the data folder."""
        self.worker.stop()
        try:
            if self.opened and self.changes_since_snapshot and self.resyncing is None:
                self.snapshot()
        finally:
            self.opened = False
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    async def stop(self) -> None:
        from starlette.concurrency import run_in_threadpool

        await run_in_threadpool(self.close)
