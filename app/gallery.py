"""The gallery: the database is the truth and its log; the FAISS index is a snapshot of it plus the changes
after the snapshot's watermark.

- A write commits the entries and one numbered ``reid_changes`` row per change in one transaction (writers take
  a lock first, so the numbers are in commit order), is acknowledged, and is then applied to this process's
  index. Its cost does not depend on the gallery's size: no index file is written on the request path.
- Every application of a change is idempotent (an add of a live id, a delete of a missing one, do nothing), so
  replaying the log from any watermark at or below the index's true state converges on the database.
- A background thread catches up with changes that other replicas made (woken by PostgreSQL NOTIFY, else every
  ``poll_interval_s``), writes snapshots (after ``snapshot_every`` changes, every ``snapshot_interval_s``, and at
  shutdown) and rebuilds the index when it asks for it (IVF training, HNSW compaction).
- A search holds a read lock for the search alone: snapshots read-lock too, writes to the index write-lock.
- The gallery is bound to the fingerprint of the weights that made its embeddings (``reid_meta``)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from sqlalchemy import and_, delete, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from app import migrate
from app.columns import Columns, EntryFilter, to_microseconds
from app.db import (
    META_FINGERPRINT,
    NOTIFY_CHANNEL,
    OP_ADD,
    OP_DELETE,
    OP_REEMBED,
    Change,
    Entry,
    GalleryMeta,
    make_sessionmaker,
)
from app.index import VectorIndex, validate

if TYPE_CHECKING:
    from app.config import Settings

__all__ = ["EntryFilter", "EntrySummary", "Gallery", "ModelMismatch"]

logger = logging.getLogger(__name__)

WRITE_LOCK = 0x5E1D_0002  # PostgreSQL advisory lock every writer holds until commit: seq order = commit order
REPLAY_BATCH = 2_000
REBUILD_CHUNK = 20_000
CROP_GRACE_S = 60.0  # the start-up sweep leaves younger unreferenced crops alone (an upload on its way in)


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


class ModelMismatch(ValueError):
    """The gallery's embeddings were made by other weights than the loaded ones."""


def mismatch_message(stored: str, loaded: str) -> str:
    return (
        f"the gallery's embeddings were made by weights with fingerprint {stored[:16]}…, but the loaded weights "
        f"have fingerprint {loaded[:16]}…: their templates are not comparable. Start with the weights the gallery "
        f"was enrolled with, or re-embed the gallery under the new ones: `reid-admin reembed` (python -m app.admin "
        f"reembed) with the same REID_* settings, then start the service again. Full fingerprints: stored {stored}, "
        f"loaded {loaded}"
    )


@dataclass(frozen=True)
class EntrySummary:
    """What a search result needs from the database, without the embedding."""

    identity: str
    camera: str | None
    captured_at: datetime


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


@dataclass
class IndexState:
    """The index, its columns and the last change seq both reflect; swapped as one by a rebuild."""

    index: VectorIndex
    columns: Columns
    watermark: int = 0
    ahead: set[int] = field(default_factory=set)  # seqs applied here beyond the watermark (this process's writes)

    def applied(self, seqs: Sequence[int]) -> None:
        self.ahead.update(seqs)
        while self.watermark + 1 in self.ahead:
            self.watermark += 1
            self.ahead.discard(self.watermark)

    def add(self, ids: np.ndarray, vectors: np.ndarray, cameras: list[str | None], captured_us: np.ndarray) -> int:
        """Add the ids that are not live yet; how many."""
        new = np.array([not self.columns.contains(int(i)) for i in ids], bool)
        if new.any():
            self.index.add(ids[new], vectors[new])
            self.columns.add(ids[new], [c for c, n in zip(cameras, new, strict=True) if n], captured_us[new])
        return int(new.sum())

    def remove(self, ids: np.ndarray) -> int:
        live = self.columns.remove(ids)
        return self.index.remove(live)


class Gallery:
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
        migrate_on_open: bool = True,
        listen: bool = True,
    ) -> None:
        validate(factory, nprobe, ef_search, use_gpu)
        self.engine = engine
        self.sessions = make_sessionmaker(engine)
        self.postgres = engine.dialect.name == "postgresql"
        self.data_dir = data_dir
        self.index_path = data_dir / "gallery.faiss"
        self.crops_dir = data_dir / "crops"
        self.dim = dim
        self.factory = factory
        self.use_gpu = use_gpu
        self.fingerprint = fingerprint
        self.index_options: dict[str, Any] = {"use_gpu": use_gpu, "nprobe": nprobe, "ef_search": ef_search}
        self.snapshot_every = snapshot_every
        self.snapshot_interval_s = snapshot_interval_s
        self.poll_interval_s = poll_interval_s
        self.migrate_on_open = migrate_on_open
        self.listen = listen and self.postgres
        self.state = IndexState(VectorIndex(dim, factory, **self.index_options), Columns())
        self.rw = ReadWriteLock()  # searches and snapshots read; index changes write
        self.write_lock = threading.RLock()  # one writer at a time in this process (database + index)
        self.rebuilt = False  # open() rebuilt the index from the database
        self.replayed = 0  # changes open() replayed on top of the snapshot
        self.lag = 0  # changes in the log after the watermark, as of the last ready()
        self.opened = False
        self.failure: str | None = None  # why this replica must not serve (the model changed under it)
        self.changes_since_snapshot = 0
        self.last_snapshot = time.monotonic()
        self._snapshot_lock = threading.Lock()
        self._journal: list[tuple[str, tuple[Any, ...]]] | None = None  # index changes made during a rebuild
        self._pending_crops: dict[str, float] = {}  # stored, not yet committed: never deleted meanwhile
        self._pending_lock = threading.Lock()
        self._lock_file: IO[bytes] | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rebuilder: threading.Thread | None = None

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
            migrate_on_open=settings.migrate_on_start,
        )

    @property
    def index(self) -> VectorIndex:
        return self.state.index

    # -- start-up -----------------------------------------------------------------------------------

    def open(self) -> None:
        """Migrate the schema, check the model binding, then load the snapshot and replay the log after its
        watermark, or rebuild from the database when there is no usable snapshot.

        Raises OperationalError / DBAPIError when the database is unreachable (the caller retries) and anything
        else for a start-up that cannot succeed (the caller stops the process)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        probe = self.data_dir / f".write-probe.{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise PermissionError(f"the data folder {self.data_dir} is not writable: {exc}") from exc
        if not self.postgres and self._lock_file is None:  # (open() is retried while the database is down)
            self._lock_data_dir()
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
        self._bind_model()
        state, reason = self._load_snapshot()
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
            if count == len(state.index):
                logger.info(
                    "index snapshot %s loaded (watermark %d) and %d changes replayed: %d entries, %s",
                    self.index_path,
                    before,
                    self.replayed,
                    count,
                    state.index.description,
                )
            else:
                reason = f"the snapshot and the log give {len(state.index)} entries, the database {count}"
                state = None
        if state is None:
            with self.sessions() as session:
                fresh = not self.index_path.exists() and not session.scalar(select(func.count(Entry.id)))
            # A new gallery has no snapshot yet, and nothing to rebuild: no cause for a warning.
            logger.log(logging.INFO if fresh else logging.WARNING, "rebuilding the index from the database: %s", reason)
            self.state = self._build_from_database(progress=True)
            self.catch_up()
            self.rebuilt = True
            self.changes_since_snapshot = max(1, self.changes_since_snapshot)  # snapshot it soon
        self.opened = True

    def _lock_data_dir(self) -> None:
        self._lock_file = lock_data_dir(self.data_dir)

    def _bind_model(self) -> None:
        with self.sessions() as session, session.begin():
            stored = session.get(GalleryMeta, META_FINGERPRINT)
            if self.fingerprint is None:
                pass
            elif stored is None:
                entries = session.scalar(select(func.count(Entry.id))) or 0
                if entries:
                    logger.warning(
                        "the gallery's %d entries have no model fingerprint (made before fingerprints were kept): "
                        "binding them to the loaded weights %s",
                        entries,
                        self.fingerprint,
                    )
                session.add(GalleryMeta(key=META_FINGERPRINT, value=self.fingerprint))
            elif stored.value != self.fingerprint:
                raise ModelMismatch(mismatch_message(stored.value, self.fingerprint))
            sample = session.scalar(select(Entry.embedding).limit(1))
        if sample is not None and len(sample) // 4 != self.dim:
            raise ValueError(
                f"the database holds {len(sample) // 4}-d embeddings but the model makes {self.dim}-d ones; "
                "use the weights the gallery was enrolled with, or a new data folder / database"
            )

    def _load_snapshot(self) -> tuple[IndexState | None, str]:
        """(the snapshot as a state, "") or (None, why it cannot be used)."""
        if not self.index_path.exists():
            return None, f"no index snapshot at {self.index_path}"
        try:
            index, meta, arrays = VectorIndex.read(self.index_path, **self.index_options)
        except ValueError as exc:
            return None, str(exc)
        watermark = meta.get("watermark")
        with self.sessions() as session:
            last = session.scalar(select(func.max(Change.seq))) or 0
        if not isinstance(watermark, int) or "ids" not in arrays:
            return None, f"the index file {self.index_path} is not a gallery snapshot (no watermark)"
        if meta.get("fingerprint") != self.fingerprint:
            return None, "the snapshot was made under other weights"
        if index.factory != self.factory or index.dim != self.dim:
            wanted = f"{self.dim}-d {self.factory!r}"
            return None, f"the snapshot holds a {index.dim}-d {index.factory!r} index, not a {wanted} one"
        if watermark > last:
            return None, f"the snapshot's watermark {watermark} is past the database's last change {last}"
        columns = Columns.from_arrays(arrays, meta.get("cameras", []))
        if columns.live != len(index):
            return None, f"the snapshot holds {len(index)} vectors but {columns.live} column rows"
        return IndexState(index, columns, watermark), ""

    def _build_from_database(self, progress: bool = False) -> IndexState:
        """A new index of every entry, read in id order; with ``progress``, logged as it goes."""
        with self.sessions() as session:
            watermark = session.scalar(select(func.max(Change.seq))) or 0
            total = session.scalar(select(func.count(Entry.id))) or 0
        ids = np.zeros(total, np.int64)
        vectors = np.zeros((total, self.dim), np.float32)
        cameras: list[str | None] = []
        captured = np.zeros(total, np.int64)
        n, last, started = 0, 0, time.monotonic()
        while True:
            with self.sessions() as session:
                rows = session.execute(
                    select(Entry.id, Entry.embedding, Entry.camera, Entry.captured_at, Entry.created_at)
                    .where(Entry.id > last)
                    .order_by(Entry.id)
                    .limit(REBUILD_CHUNK)
                ).all()
            if not rows:
                break
            if n + len(rows) > len(ids):  # entries enrolled meanwhile
                grow = n + len(rows) - len(ids)
                ids, captured = np.resize(ids, len(ids) + grow), np.resize(captured, len(captured) + grow)
                vectors = np.concatenate([vectors, np.zeros((grow, self.dim), np.float32)])
            for row in rows:
                vector = np.frombuffer(row.embedding, dtype="<f4")
                if len(vector) != self.dim:
                    raise ValueError(
                        f"entry {row.id} holds a {len(vector)}-d embedding but the model makes {self.dim}-d ones; "
                        "use the weights the gallery was enrolled with, or a new data folder / database"
                    )
                ids[n], vectors[n] = row.id, vector
                cameras.append(row.camera)
                captured[n] = to_microseconds(row.captured_at or row.created_at)
                n += 1
            last = rows[-1].id
            if progress:
                logger.info("rebuilding the index: read %d / %d entries (%.0f s)", n, total, time.monotonic() - started)
        if progress and n:
            logger.info("rebuilding the index: building %s over %d vectors", self.factory, n)
        index = VectorIndex.build(self.dim, self.factory, ids[:n], vectors[:n], **self.index_options)
        columns = Columns()
        if n:
            columns.add(ids[:n], cameras, captured[:n])
        if progress:
            logger.info(
                "index rebuilt from the database: %d entries, %s, %.1f s",
                n,
                index.description,
                time.monotonic() - started,
            )
        return IndexState(index, columns, watermark)

    def db_ids(self) -> np.ndarray:
        with self.sessions() as session:
            ids = session.scalars(select(Entry.id).order_by(Entry.id)).all()
        return np.array(ids, dtype=np.int64)

    def ready(self) -> bool:
        """Opened, not stopped by a model change, the index and its columns agreeing on their entries (counters),
        and the database answering: the log's last seq, one index lookup (OperationalError when unreachable).
        Cost O(1) in the gallery's size; ``lag`` is then how many changes this replica has yet to apply."""
        state = self.state
        with self.sessions() as session:
            last = session.scalar(select(func.max(Change.seq))) or 0
        self.lag = max(0, last - state.watermark)
        return self.opened and self.failure is None and len(state.index) == state.columns.live

    consistent = ready  # the name /ready calls

    # -- the log --------------------------------------------------------------------------------------

    def _begin_write(self, session: Session) -> None:
        """In a write transaction, before any change: serialise writers (PostgreSQL: an advisory lock held to
        commit, so change numbers are in commit order) and check the model binding."""
        if self.postgres:
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK})
        if self.fingerprint is not None:
            stored = session.scalar(select(GalleryMeta.value).where(GalleryMeta.key == META_FINGERPRINT))
            if stored is not None and stored != self.fingerprint:
                self.failure = mismatch_message(stored, self.fingerprint)
                raise ModelMismatch(self.failure)

    def _log(self, session: Session, op: str, entry_ids: Sequence[int | None]) -> list[int]:
        changes = [Change(op=op, entry_id=i) for i in entry_ids]
        session.add_all(changes)
        session.flush()
        if self.postgres and changes:  # delivered to the other replicas when this transaction commits
            session.execute(text("SELECT pg_notify(:channel, :seq)"), {"channel": NOTIFY_CHANNEL, "seq": "1"})
        return [c.seq for c in changes]

    def _apply(self, op: str, *args: Any) -> int:
        """Apply one change to the index (under its write lock), journalled while a rebuild runs."""
        with self.rw.write():
            if self._journal is not None:
                self._journal.append((op, args))
            return self.state.add(*args) if op == OP_ADD else self.state.remove(*args)

    def catch_up(self) -> int:
        """Apply the changes after the watermark (other replicas' writes, or what a snapshot lacks); how many."""
        applied = 0
        with self.write_lock:
            while True:
                watermark = self.state.watermark
                with self.sessions() as session:
                    rows = session.execute(
                        select(
                            Change.seq,
                            Change.op,
                            Change.entry_id,
                            Entry.embedding,
                            Entry.camera,
                            Entry.captured_at,
                            Entry.created_at,
                        )
                        .outerjoin(Entry, and_(Entry.id == Change.entry_id, Change.op == OP_ADD))
                        .where(Change.seq > watermark)
                        .order_by(Change.seq)
                        .limit(REPLAY_BATCH)
                    ).all()
                if not rows:
                    return applied
                self._replay(rows)
                applied += len(rows)
                self.state.watermark = rows[-1].seq
                self.state.ahead = {s for s in self.state.ahead if s > self.state.watermark}

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
                    stored = session.get(GalleryMeta, META_FINGERPRINT)
                if self.fingerprint is not None and stored is not None and stored.value != self.fingerprint:
                    self.failure = mismatch_message(stored.value, self.fingerprint)
                    logger.critical("the gallery was re-embedded under other weights: %s", self.failure)
                else:  # every embedding changed: this replica's index is rebuilt from the new ones
                    self._start_rebuild("the gallery was re-embedded")
            self.changes_since_snapshot += len(run)

    # -- writes ---------------------------------------------------------------------------------------

    def store_crop(self, data: bytes, image: Image.Image) -> tuple[str, str]:
        """Save the decoded crop as PNG under a content-addressed name; (sha256 of upload, relative path)."""
        digest = hashlib.sha256(data).hexdigest()
        relative = f"crops/{digest[:2]}/{digest}.png"
        with self._pending_lock:  # a deletion of another entry with this crop must not remove it now
            self._pending_crops[relative] = time.monotonic()
        path = self.data_dir / relative
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
        return digest, relative

    def add(
        self,
        identity: str,
        camera: str | None,
        meta: dict[str, Any],
        crops: list[tuple[str, str, int, int]],
        vectors: np.ndarray,
        captured_at: datetime | None = None,
    ) -> list[Entry]:
        """Enroll crops (digest, relative path, width, height) with their templates; acknowledged once committed."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(crops), -1)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"templates of {vectors.shape[1]} values; this gallery holds {self.dim}-d ones")
        now = datetime.now(UTC)
        captured = captured_at or now
        with self.write_lock:
            try:
                with self.sessions() as session, session.begin():
                    self._begin_write(session)
                    entries = [
                        Entry(
                            identity=identity,
                            camera=camera,
                            meta=meta,
                            created_at=now,
                            captured_at=captured,
                            content_sha256=digest,
                            crop_path=relative,
                            width=width,
                            height=height,
                            embedding=np.asarray(vector, dtype="<f4").tobytes(),
                        )
                        for (digest, relative, width, height), vector in zip(crops, vectors, strict=True)
                    ]
                    session.add_all(entries)
                    session.flush()
                    seqs = self._log(session, OP_ADD, [e.id for e in entries])
            finally:
                with self._pending_lock:
                    for _, relative, _, _ in crops:
                        self._pending_crops.pop(relative, None)
            ids = np.array([e.id for e in entries], dtype=np.int64)
            captured_us = np.full(len(ids), to_microseconds(captured), np.int64)
            self._apply(OP_ADD, ids, vectors, [camera] * len(ids), captured_us)
            self.state.applied(seqs)
            self._changed(len(ids))
            return entries

    def delete(self, ids: list[int]) -> int:
        """Delete entries, then their crop files that no other entry uses; the number of entries deleted."""
        with self.write_lock:
            with self.sessions() as session, session.begin():
                self._begin_write(session)
                rows = session.execute(
                    select(Entry.id, Entry.content_sha256, Entry.crop_path).where(Entry.id.in_(ids))
                ).all()
                if not rows:
                    return 0
                session.execute(delete(Entry).where(Entry.id.in_([r.id for r in rows])))
                seqs = self._log(session, OP_DELETE, [r.id for r in rows])
            self._apply(OP_DELETE, np.array([r.id for r in rows], np.int64))
            self.state.applied(seqs)
            self._changed(len(rows))
            self._delete_unused_crops({r.content_sha256: r.crop_path for r in rows})
            return len(rows)

    def delete_identity(self, identity: str) -> int:
        return self.delete(self.ids_of_identity(identity))

    def _changed(self, count: int) -> None:
        self.changes_since_snapshot += count
        if self.changes_since_snapshot >= self.snapshot_every or self.state.index.needs_rebuild():
            self._wake.set()

    def _delete_unused_crops(self, crops: dict[str, str]) -> None:
        """Retention: a crop file goes once no entry uses it (files are content-addressed and shared)."""
        with self.sessions() as session:
            used = set(session.scalars(select(Entry.content_sha256).where(Entry.content_sha256.in_(list(crops)))))
        for digest, relative in crops.items():
            with self._pending_lock:
                pending = relative in self._pending_crops
            if digest in used or pending:
                continue
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / relative).unlink()

    def sweep_crops(self) -> int:
        """Remove crop files no entry uses (what a crash between a delete's commit and its unlink left) and stale
        temporary files; the number removed. Files younger than CROP_GRACE_S may be uploads on their way in."""
        if not self.crops_dir.is_dir():
            return 0
        with self.sessions() as session:
            used = set(session.scalars(select(Entry.crop_path).distinct()))
        cutoff = time.time() - CROP_GRACE_S
        removed = 0
        for folder in self.crops_dir.iterdir():
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                relative = f"crops/{folder.name}/{path.name}"
                with self._pending_lock:
                    pending = relative in self._pending_crops
                with contextlib.suppress(FileNotFoundError):
                    if relative not in used and not pending and path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
        if removed:
            logger.info("removed %d crop files that no entry uses", removed)
        return removed

    # -- reads ----------------------------------------------------------------------------------------

    def get(self, entry_id: int) -> Entry | None:
        with self.sessions() as session:
            return session.get(Entry, entry_id)

    def get_many(self, ids: list[int]) -> dict[int, Entry]:
        if not ids:
            return {}
        with self.sessions() as session:
            return {e.id: e for e in session.scalars(select(Entry).where(Entry.id.in_(ids)))}

    def summaries(self, ids: Sequence[int]) -> dict[int, EntrySummary]:
        """identity, camera, captured_at for these ids, reading only those columns (never the embedding)."""
        if not ids:
            return {}
        with self.sessions() as session:
            rows = session.execute(
                select(Entry.id, Entry.identity, Entry.camera, Entry.captured_at, Entry.created_at).where(
                    Entry.id.in_([int(i) for i in ids])
                )
            ).all()
        return {r.id: EntrySummary(r.identity, r.camera, r.captured_at or r.created_at) for r in rows}

    def ids_of_identity(self, identity: str) -> list[int]:
        with self.sessions() as session:
            return list(session.scalars(select(Entry.id).where(Entry.identity == identity)))

    def list(self, identity: str | None, offset: int, limit: int) -> tuple[int, list[Entry]]:
        with self.sessions() as session:
            query = select(Entry)
            count = select(func.count(Entry.id))
            if identity is not None:
                query = query.where(Entry.identity == identity)
                count = count.where(Entry.identity == identity)
            total = session.scalar(count) or 0
            return total, list(session.scalars(query.order_by(Entry.id).offset(offset).limit(limit)))

    def identities(self) -> list[tuple[str, int, int]]:
        """(identity, number of entries, its lowest entry id: the first crop enrolled), by name; one query."""
        with self.sessions() as session:
            rows = session.execute(
                select(Entry.identity, func.count(Entry.id), func.min(Entry.id))
                .group_by(Entry.identity)
                .order_by(Entry.identity)
            ).all()
        return [(r[0], int(r[1]), int(r[2])) for r in rows]

    def search(self, queries: np.ndarray, k: int, where: EntryFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) squared-L2 distances and ids, nearest first, -1 padded; one FAISS call for all n queries.

        ``where`` is applied inside FAISS (an id selector over the in-memory columns), so k survivors come back
        whenever k entries pass it."""
        if self.failure is not None:  # the gallery was re-embedded under other weights: no meaningless matches
            raise ModelMismatch(self.failure)
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        with self.rw.read():
            state = self.state
            allowed = state.columns.allowed(where) if where is not None else None
            distances, ids = state.index.search(queries, k, allowed)
        if ids.shape[1] < k:  # fewer entries (or survivors) than k: -1 padded, as FAISS pads
            pad = ((0, 0), (0, k - ids.shape[1]))
            ids, distances = np.pad(ids, pad, constant_values=-1), np.pad(distances, pad, constant_values=np.inf)
        return distances, ids

    def __len__(self) -> int:
        return len(self.state.index)

    # -- background: replication, snapshots, rebuilds -------------------------------------------------

    def snapshot(self) -> int:
        """Write the index, its columns and its watermark atomically to ``index_path``; the bytes written.
        Searches go on meanwhile; index changes wait for it."""
        with self._snapshot_lock:
            started = time.monotonic()
            with self.rw.read():
                state = self.state
                arrays, extra = state.columns.arrays()
                changes = self.changes_since_snapshot
                meta = {"watermark": state.watermark, "fingerprint": self.fingerprint, **extra}
                meta["written_at"] = datetime.now(UTC).isoformat()
                size = state.index.save(self.index_path, meta, arrays)
            self.changes_since_snapshot -= changes
            self.last_snapshot = time.monotonic()
            logger.info(
                "index snapshot written: %d entries, watermark %d, %.0f MiB in %.1f s",
                len(arrays["ids"]),
                meta["watermark"],
                size / 2**20,
                time.monotonic() - started,
            )
            return size

    def _start_rebuild(self, reason: str) -> None:
        if self._rebuilder is not None and self._rebuilder.is_alive():
            return
        logger.info("rebuilding the index in the background: %s", reason)
        self._rebuilder = threading.Thread(target=self._rebuild, name="gallery-rebuild", daemon=True)
        self._rebuilder.start()

    def _rebuild(self) -> None:
        """Build a new index from the database while the old one serves; the index changes made meanwhile are
        journalled and replayed onto the new one before the swap."""
        try:
            with self.write_lock:
                self._journal = []
            new = self._build_from_database()
            with self.write_lock, self.rw.write():
                for op, args in self._journal or []:
                    new.add(*args) if op == OP_ADD else new.remove(*args)
                new.watermark, new.ahead = self.state.watermark, set(self.state.ahead)
                self.state = new
                self._journal = None
            self.changes_since_snapshot = max(1, self.changes_since_snapshot)
            logger.info("index rebuilt in the background: %d entries, %s", len(new.index), new.index.description)
            self._wake.set()
        except Exception:
            self._journal = None
            logger.exception("background index rebuild failed; the current index keeps serving")

    def start_background(self) -> None:
        """Start the thread that catches up, snapshots and rebuilds (and, on PostgreSQL, the LISTEN thread)."""
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._run, name="gallery-background", daemon=True)]
        if self.listen:
            from app.replication import listen_for_changes

            self._threads.append(
                threading.Thread(
                    target=listen_for_changes,
                    args=(self.engine.url, self._wake, self._stopping),
                    name="gallery-listen",
                    daemon=True,
                )
            )
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        try:
            self.sweep_crops()
        except Exception:
            logger.exception("crop sweep failed")
        while not self._stopping.is_set():
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self.catch_up()
                reason = self.state.index.needs_rebuild()
                if reason:
                    self._start_rebuild(reason)
                due = time.monotonic() - self.last_snapshot >= self.snapshot_interval_s
                if self.changes_since_snapshot >= self.snapshot_every or (self.changes_since_snapshot and due):
                    self.snapshot()
            except (OperationalError, DBAPIError) as exc:
                logger.warning("database unreachable from the gallery's background thread (%s)", type(exc).__name__)
            except Exception:
                logger.exception("the gallery's background work failed; retrying")

    def close(self) -> None:
        """Stop the background threads, write a final snapshot when the index changed, release the data folder."""
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(30)
        self._threads = []
        try:
            if self.opened and self.changes_since_snapshot:
                self.snapshot()
        finally:
            self.opened = False
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    async def stop(self) -> None:
        from starlette.concurrency import run_in_threadpool

        await run_in_threadpool(self.close)


def exit_on_failure(opener: asyncio.Future[None]) -> None:
    """Done-callback of a gallery opener that outlived start-up: a failure other than an unreachable database
    (those are retried) cannot heal, so the process exits non-zero with the reason logged, for an orchestrator
    to restart it and the operator to see why."""
    if opener.cancelled() or opener.exception() is None:
        return
    logger.critical("start-up failed: %s", opener.exception(), exc_info=opener.exception())
    logging.shutdown()
    os._exit(1)
