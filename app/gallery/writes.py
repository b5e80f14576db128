"""The gallery's writes: enrolments (crops, rows and their changes in one transaction, with an Idempotency-Key's
answer) and deletes.

A write takes this process's writer slot, then the database's writers' lock (so change numbers are in commit
order), checks that the weights and the database are still the ones the index was built for, commits, and only
then applies its change to the index: what was acknowledged is in the database, whatever happens next."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.columns import to_microseconds
from app.db import OP_ADD, OP_DELETE, Entry, IdempotentAnswer
from app.faults import IdempotencyKeyReused, ModelMismatch, WriteBusy
from app.gallery import binding, changelog
from app.gallery.crops import CropStore
from app.gallery.reads import GalleryReads
from app.gallery.state import ChangeMark
from app.gallery.worker import Worker

IN_LIST = 10_000  # ids per SQL IN list: PostgreSQL's protocol takes at most 65,535 parameters a statement
IDEMPOTENCY_TTL = timedelta(hours=24)  # how long a key's answer is kept (Stripe's and the IETF draft's day)


@dataclass
class NewEntry:
    """What an enrolment says of one crop besides its picture and template."""

    identity: str
    camera: str | None
    meta: dict[str, Any]
    captured_at: datetime | None = None  # None: the commit's time
    person_id: int | None = None  # sightings only: the person it is grouped into
    track: str | None = None  # sightings only: the tracker's id of its tracklet


# A crop stored for an enrolment: (sha256 of the upload, path relative to the data folder, width, height).
StoredCrop = tuple[str, str, int, int]
# Called inside an enrolment's transaction before the entries are inserted: may add rows (new people) and fill
# the NewEntry fields that depend on them, so that all of it commits or none.
BeforeInsert = Callable[[Session, list[NewEntry]], None]


@dataclass
class Enrolled:
    """What an enrolment gave: its entries, or (a retried Idempotency-Key) the first answer, as sent then."""

    entries: list[Entry]
    replayed: str | None = None


class GalleryWrites(GalleryReads):
    """What changes the gallery. ``Gallery`` sets the attributes declared here and gives the three methods that
    keep its index bound to the database (``app.gallery.core``)."""

    postgres: bool
    crops: CropStore
    fingerprint: str | None
    write_lock: threading.RLock
    write_lock_timeout_s: float
    changes_since_snapshot: int
    snapshot_every: int
    worker: Worker
    _foreign: Callable[[Session], str | None]  # why the index no longer belongs to this database, or None
    resync: Callable[[str], None]  # rebuild the index from the database that changed under it
    _apply: Callable[..., int]  # apply one change to the index

    # -- the writers' slot and the binding ----------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """This process's writer slot, or WriteBusy after REID_WRITE_LOCK_TIMEOUT_S."""
        if not self.write_lock.acquire(timeout=self.write_lock_timeout_s):
            raise WriteBusy(
                f"another write has held this replica's writer slot for over {self.write_lock_timeout_s:g} s"
            )
        try:
            yield
        finally:
            self.write_lock.release()

    @contextlib.contextmanager
    def relabelling(self) -> Iterator[Session]:
        """A transaction that holds the writers' locks (this process's and the database's) for a change that
        touches no template, so leaves the index alone: entries' identities, people. No enrolment runs
        meanwhile, so none can join a person that this transaction merges away."""
        with self._writing(), self.sessions() as session, session.begin():
            changelog.lock_writers(session, self.postgres, self.write_lock_timeout_s)
            yield session

    def _begin_write(self, session: Session) -> str | None:
        """In a write transaction, before any change: serialise writers, check the model binding; why the index
        no longer belongs to this database (then the write's changes are not applied to it: it is rebuilt)."""
        changelog.lock_writers(session, self.postgres, self.write_lock_timeout_s)
        if self.fingerprint is not None:
            stored = binding.stored_fingerprint(session)
            if stored is not None and stored != self.fingerprint:
                self.failure = binding.mismatch_message(stored, self.fingerprint)
                raise ModelMismatch(self.failure)
        return self._foreign(session)

    def _committed(self, foreign: str | None, op: str, changes: list[tuple[int, ChangeMark]], *args: Any) -> None:
        if foreign is not None:
            self.resync(foreign)  # the rebuild holds this write's rows
        else:
            self._apply(op, *args)
            self.state.applied(changes)
        self._changed(len(changes))

    def _changed(self, count: int) -> None:
        self.changes_since_snapshot += count
        if self.changes_since_snapshot >= self.snapshot_every or self.state.index.needs_rebuild():
            self.worker.wake()

    # -- crops ------------------------------------------------------------------------------------------

    def store_crop(self, data: bytes, image: Image.Image) -> tuple[str, str]:
        """Save the decoded crop durably under a content-addressed name, held until the add that uses it."""
        return self.crops.store(data, image)

    def hold_crops(self, uploads: Sequence[tuple[bytes, Image.Image]]) -> list[StoredCrop]:
        """Store the decoded crops durably, each held (no delete takes its file) until ``enroll_held`` commits or
        ``release_crops``: a route stores them while the network runs, so their fsyncs cost no time."""
        crops: list[StoredCrop] = []
        try:
            for data, image in uploads:
                digest, relative = self.crops.store(data, image)
                crops.append((digest, relative, image.width, image.height))
        except BaseException:
            self.release_crops(crops)
            raise
        return crops

    def release_crops(self, crops: Sequence[StoredCrop]) -> None:
        """Let go of held crops that will not be enrolled (the network refused the request)."""
        self.crops.release(relative for _, relative, _, _ in crops)

    def sweep_crops(self) -> int:
        return self.crops.sweep()

    # -- enrolment --------------------------------------------------------------------------------------

    def enroll(
        self, new: Sequence[NewEntry], uploads: Sequence[tuple[bytes, Image.Image]], vectors: np.ndarray, **options: Any
    ) -> Enrolled:
        """Store the crops and enrol them, ``new[i]`` saying what ``uploads[i]`` is: ``hold_crops`` then
        ``enroll_held`` (and its keyword options) in one call."""
        return self.enroll_held(new, self.hold_crops(uploads), vectors, **options)

    def add(
        self,
        identity: str,
        camera: str | None,
        meta: dict[str, Any],
        crops: list[StoredCrop],
        vectors: np.ndarray,
        captured_at: datetime | None = None,
    ) -> list[Entry]:
        """Enrol held crops of one identity, all with the same camera, metadata and capture time."""
        return self.enroll_held([NewEntry(identity, camera, meta, captured_at) for _ in crops], crops, vectors).entries

    def enroll_held(
        self,
        new: Sequence[NewEntry],
        crops: list[StoredCrop],
        vectors: np.ndarray,
        *,
        idempotency_key: str | None = None,
        request_sha256: str = "",
        answer: Callable[[list[Entry]], str] | None = None,
        before_insert: BeforeInsert | None = None,
    ) -> Enrolled:
        """Enrol crops ``hold_crops`` stored, ``new[i]`` saying what ``crops[i]`` is; acknowledged once committed,
        the holds released either way. With an ``idempotency_key``, ``answer(entries)`` is committed with the
        entries and a retry gets it back (the first answer, when the key committed meanwhile)."""
        new = list(new)
        try:
            vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(crops), -1)
            if vectors.shape[1] != self.dim:
                raise ValueError(f"templates of {vectors.shape[1]} values; this gallery holds {self.dim}-d ones")
            if len(new) != len(crops):
                raise ValueError(f"{len(new)} entries described for {len(crops)} crops")
            now = datetime.now(UTC)
            with self._writing():
                with self.sessions() as session, session.begin():
                    foreign = self._begin_write(session)
                    if idempotency_key is not None:
                        previous = self.idempotent_answer(idempotency_key, request_sha256, session)
                        if previous is not None:  # the first request committed meanwhile
                            return Enrolled([], previous)
                    if before_insert is not None:
                        before_insert(session, new)
                    entries = [
                        Entry(
                            identity=item.identity,
                            camera=item.camera,
                            meta=item.meta,
                            created_at=now,
                            captured_at=item.captured_at or now,
                            content_sha256=digest,
                            crop_path=relative,
                            width=width,
                            height=height,
                            embedding=np.asarray(vector, dtype="<f4").tobytes(),
                            person_id=item.person_id,
                            track=item.track,
                        )
                        for item, (digest, relative, width, height), vector in zip(new, crops, vectors, strict=True)
                    ]
                    session.add_all(entries)
                    session.flush()
                    changes = changelog.append(session, OP_ADD, [e.id for e in entries], self.postgres)
                    if idempotency_key is not None:
                        body = answer(entries) if answer is not None else ""
                        session.add(IdempotentAnswer(key=idempotency_key, request_sha256=request_sha256, body=body))
                ids = np.array([e.id for e in entries], dtype=np.int64)
                captured_us = np.array([to_microseconds(e.captured_at) for e in entries], np.int64)
                self._committed(foreign, OP_ADD, changes, ids, vectors, [e.camera for e in entries], captured_us)
                return Enrolled(entries)
        finally:
            self.release_crops(crops)

    def idempotent_answer(self, key: str, request_sha256: str, session: Session | None = None) -> str | None:
        """The answer committed for ``key``, None for a new key; IdempotencyKeyReused for another request's key."""
        with contextlib.ExitStack() as stack:
            session = session or stack.enter_context(self.sessions())
            row = session.get(IdempotentAnswer, key)
            if row is None:
                return None
            if row.request_sha256 != request_sha256:
                raise IdempotencyKeyReused(
                    f"the Idempotency-Key {key!r} was first sent with another request; a key names one request"
                )
            return row.body

    def forget_idempotency_keys(self) -> int:
        """Drop the answers kept for Idempotency-Keys older than IDEMPOTENCY_TTL; how many."""
        with self.sessions() as session, session.begin():
            result = session.execute(
                delete(IdempotentAnswer).where(IdempotentAnswer.created_at < datetime.now(UTC) - IDEMPOTENCY_TTL)
            )
        return result.rowcount or 0

    # -- deletes ----------------------------------------------------------------------------------------

    def delete(self, ids: list[int]) -> int:
        """Delete entries, then their crop files that no other entry uses; the number of entries deleted. Large
        deletes go in transactions of IN_LIST entries."""
        deleted = 0
        for start in range(0, len(ids), IN_LIST):
            deleted += self._delete_chunk(ids[start : start + IN_LIST])
        return deleted

    def _delete_chunk(self, ids: list[int]) -> int:
        with self._writing():
            with self.sessions() as session, session.begin():
                foreign = self._begin_write(session)
                rows = session.execute(
                    select(Entry.id, Entry.content_sha256, Entry.crop_path).where(Entry.id.in_(ids))
                ).all()
                if not rows:
                    return 0
                session.execute(delete(Entry).where(Entry.id.in_([r.id for r in rows])))
                changes = changelog.append(session, OP_DELETE, [r.id for r in rows], self.postgres)
            self._committed(foreign, OP_DELETE, changes, np.array([r.id for r in rows], np.int64))
        self.crops.delete_unused({r.content_sha256: r.crop_path for r in rows})
        return len(rows)

    def delete_identity(self, identity: str) -> int:
        return self.delete(self.ids_of_identity(identity))
