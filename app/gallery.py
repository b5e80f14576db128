"""The gallery: the database is the truth, the FAISS index a cache of it kept in step.

Write order: commit the entries to the database, then add them to the index and save the index file.
A crash between the two leaves entries in the database only; start-up compares the index file's ids
with the database's and rebuilds from the stored embeddings when they differ, so nothing that was
acknowledged is lost and no id exists in the index alone."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import delete, func, select
from sqlalchemy.engine import Engine

from app.db import Base, Entry, make_sessionmaker
from app.index import VectorIndex

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EntryFilter:  # STAND-IN: replaced by the gallery branch
    cameras: tuple[str, ...] | None = None  # keep only entries of these cameras
    exclude_cameras: tuple[str, ...] = ()  # drop entries of these cameras
    after: datetime | None = None  # captured_at >= after
    before: datetime | None = None  # captured_at < before

    def accepts(self, camera: str | None, captured_at: datetime) -> bool:
        if self.cameras is not None and camera not in self.cameras:
            return False
        if camera in self.exclude_cameras:
            return False
        if self.after is not None and captured_at < self.after:
            return False
        return self.before is None or captured_at < self.before


@dataclass(frozen=True)
class EntrySummary:  # STAND-IN: replaced by the gallery branch
    identity: str
    camera: str | None
    captured_at: datetime


class Gallery:
    def __init__(self, engine: Engine, data_dir: Path, dim: int, factory: str = "Flat", use_gpu: bool = False) -> None:
        self.engine = engine
        self.sessions = make_sessionmaker(engine)
        self.data_dir = data_dir
        self.index_path = data_dir / "gallery.faiss"
        self.crops_dir = data_dir / "crops"
        self.dim = dim
        self.factory = factory
        self.use_gpu = use_gpu
        self.lock = threading.RLock()
        self.index = VectorIndex(dim, factory, use_gpu)
        self.rebuilt = False
        # STAND-IN: replaced by the gallery branch. id -> (camera, captured_at), the filters' facts in memory.
        self._facts: dict[int, tuple[str | None, datetime]] = {}

    # -- start-up -----------------------------------------------------------------------------------

    def open(self) -> None:
        """Create tables, then load the index file if it matches the database, else rebuild it."""
        Base.metadata.create_all(self.engine)
        self.crops_dir.mkdir(parents=True, exist_ok=True)
        with self.lock:
            db_ids = self.db_ids()
            loaded: VectorIndex | None = None
            if self.index_path.exists():
                try:
                    loaded = VectorIndex.load(self.index_path, self.dim, self.factory, self.use_gpu)
                except ValueError as exc:
                    logger.warning("%s; rebuilding the index from the database", exc)
            if loaded is not None and np.array_equal(np.sort(loaded.ids()), db_ids):
                self.index = loaded
                logger.info("index file %s matches the database (%d entries)", self.index_path, len(db_ids))
            else:
                if loaded is not None:
                    logger.warning("index file %s is stale; rebuilding from the database", self.index_path)
                self.rebuild()
            with self.sessions() as session:  # STAND-IN: replaced by the gallery branch
                rows = session.execute(select(Entry.id, Entry.camera, Entry.captured_at)).all()
            self._facts = {int(i): (camera, _utc(at)) for i, camera, at in rows}

    def rebuild(self) -> None:
        with self.lock:
            index = VectorIndex(self.dim, self.factory, self.use_gpu)
            with self.sessions() as session:
                rows = session.execute(select(Entry.id, Entry.embedding).order_by(Entry.id)).all()
            if rows:
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                vectors = np.stack([np.frombuffer(r[1], dtype="<f4") for r in rows])
                if vectors.shape[1] != self.dim:
                    raise ValueError(
                        f"the database holds {vectors.shape[1]}-d embeddings but the model makes {self.dim}-d ones; "
                        "use the weights the gallery was enrolled with, or a new data folder / database"
                    )
                index.add(ids, vectors)
            self.index = index
            self.index.save(self.index_path)
            self.rebuilt = True
            logger.info("index rebuilt from the database: %d entries", len(index))

    def db_ids(self) -> np.ndarray:
        with self.sessions() as session:
            ids = session.scalars(select(Entry.id).order_by(Entry.id)).all()
        return np.array(ids, dtype=np.int64)

    def consistent(self) -> bool:
        with self.lock:
            return np.array_equal(np.sort(self.index.ids()), self.db_ids())

    # -- writes ---------------------------------------------------------------------------------------

    def store_crop(self, data: bytes, image: Image.Image) -> tuple[str, str]:
        """Save the decoded crop as PNG under a content-addressed name; (sha256 of upload, relative path)."""
        digest = hashlib.sha256(data).hexdigest()
        relative = f"crops/{digest[:2]}/{digest}.png"
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
        """``captured_at``: when the crops were taken (default: now, the upload time)."""
        captured_at = _utc(captured_at or datetime.now(UTC))
        with self.lock:
            with self.sessions() as session, session.begin():
                entries = [
                    Entry(
                        identity=identity,
                        camera=camera,
                        meta=meta,
                        content_sha256=digest,
                        crop_path=relative,
                        width=width,
                        height=height,
                        embedding=np.asarray(vector, dtype="<f4").tobytes(),
                        captured_at=captured_at,
                    )
                    for (digest, relative, width, height), vector in zip(crops, vectors, strict=True)
                ]
                session.add_all(entries)
                session.flush()
            ids = np.array([e.id for e in entries], dtype=np.int64)
            self.index.add(ids, vectors)
            self.index.save(self.index_path)
            self._facts.update({int(i): (camera, captured_at) for i in ids})
            return entries

    def delete(self, ids: list[int]) -> int:
        with self.lock:
            with self.sessions() as session, session.begin():
                session.execute(delete(Entry).where(Entry.id.in_(ids)))
            removed = self.index.remove(np.array(ids, dtype=np.int64))
            self.index.save(self.index_path)
            for i in ids:
                self._facts.pop(int(i), None)
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

    def identities(self) -> list[tuple[str, int]]:
        with self.sessions() as session:
            rows = session.execute(
                select(Entry.identity, func.count(Entry.id)).group_by(Entry.identity).order_by(Entry.identity)
            ).all()
        return [(r[0], int(r[1])) for r in rows]

    def summaries(self, ids: list[int]) -> dict[int, EntrySummary]:  # STAND-IN: replaced by the gallery branch
        """What an answer shows of each entry; the embedding column is not read."""
        if not ids:
            return {}
        with self.sessions() as session:
            rows = session.execute(
                select(Entry.id, Entry.identity, Entry.camera, Entry.captured_at).where(Entry.id.in_(ids))
            ).all()
        return {int(i): EntrySummary(identity, camera, _utc(at)) for i, identity, camera, at in rows}

    def search(self, queries: np.ndarray, k: int, where: EntryFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances (n, k), ids (n, k)), -1 padded; ``where`` applied inside FAISS."""
        with self.lock:
            queries = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
            if where is None:
                distances, ids = self.index.search(queries, k)
            else:  # STAND-IN: replaced by the gallery branch (ids filtered in memory, an IDSelectorBatch)
                allowed = np.fromiter(
                    (i for i, (camera, at) in self._facts.items() if where.accepts(camera, at)), dtype=np.int64
                )
                distances, ids = self.index.search(queries, k, allowed)
        return _pad(distances, ids, k, len(queries))

    def __len__(self) -> int:
        return len(self.index)


def _utc(value: datetime) -> datetime:
    """SQLite gives back naive datetimes: they are UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _pad(distances: np.ndarray, ids: np.ndarray, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Widen FAISS's (n, k') answer to (n, k): distance inf, id -1 in the missing slots."""
    out_d = np.full((n, k), np.inf, dtype=np.float32)
    out_i = np.full((n, k), -1, dtype=np.int64)
    width = min(k, ids.shape[1]) if ids.ndim == 2 else 0
    out_d[:, :width] = distances[:, :width]
    out_i[:, :width] = ids[:, :width]
    return out_d, out_i
