"""The gallery's reads: entries from the database (never the embedding where a summary will do) and searches of
the index. A search holds the index's read lock for the search alone."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.columns import EntryFilter
from app.db import Entry
from app.faults import ModelMismatch, Resyncing
from app.gallery.locks import ReadWriteLock
from app.gallery.state import EntrySummary, IndexState


class GalleryReads:
    """What ``Gallery`` answers without changing anything. It sets the attributes declared here."""

    sessions: sessionmaker[Session]
    dim: int
    state: IndexState
    rw: ReadWriteLock
    failure: str | None  # why this replica must not serve (the model changed under it)
    resyncing: str | None  # why a resync is under way

    # -- the database ---------------------------------------------------------------------------------

    def db_ids(self) -> np.ndarray:
        with self.sessions() as session:
            ids = session.scalars(select(Entry.id).order_by(Entry.id)).all()
        return np.array(ids, dtype=np.int64)

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

    def identities(self, offset: int = 0, limit: int | None = None) -> list[tuple[str, int, int]]:
        """(identity, number of entries, its lowest entry id: the first crop enrolled), by name, the page from
        ``offset``; one query, paged in SQL."""
        with self.sessions() as session:
            rows = session.execute(
                select(Entry.identity, func.count(Entry.id), func.min(Entry.id))
                .group_by(Entry.identity)
                .order_by(Entry.identity)
                .offset(offset)
                .limit(limit)
            ).all()
        return [(r[0], int(r[1]), int(r[2])) for r in rows]

    def identity_count(self) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count(func.distinct(Entry.identity)))) or 0

    # -- the index ------------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int, where: EntryFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) squared-L2 distances and ids, nearest first, -1 padded; one FAISS call for all n queries.

        ``where`` is applied inside FAISS (an id selector over the in-memory columns), so k survivors come back
        whenever k entries pass it."""
        if self.failure is not None:  # the gallery was re-embedded under other weights: no meaningless matches
            raise ModelMismatch(self.failure)
        if self.resyncing is not None:
            raise Resyncing(self.resyncing)
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
