"""A new index from the database: every entry's embedding read in id order, in chunks."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from app.columns import Columns, to_microseconds
from app.db import Entry
from app.gallery import changelog
from app.gallery.state import IndexState
from app.index import VectorIndex

logger = logging.getLogger(__name__)

REBUILD_CHUNK = 20_000


def build_from_database(
    sessions: sessionmaker, dim: int, factory: str, index_options: dict[str, Any], progress: bool = False
) -> IndexState:
    """A new index of every entry; with ``progress``, logged as it goes. Its watermark is the log's last change
    when the build began: changes committed meanwhile are replayed after it (adds and deletes are idempotent)."""
    with sessions() as session:
        watermark = changelog.last_seq(session)
        mark = changelog.mark_at(session, watermark) if watermark else None
        total = session.scalar(select(func.count(Entry.id))) or 0
    ids = np.zeros(total, np.int64)
    vectors = np.zeros((total, dim), np.float32)
    cameras: list[str | None] = []
    captured = np.zeros(total, np.int64)
    n, last, started = 0, 0, time.monotonic()
    while True:
        with sessions() as session:
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
            vectors = np.concatenate([vectors, np.zeros((grow, dim), np.float32)])
        for row in rows:
            vector = np.frombuffer(row.embedding, dtype="<f4")
            if len(vector) != dim:
                raise ValueError(
                    f"entry {row.id} holds a {len(vector)}-d embedding but the model makes {dim}-d ones; "
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
        logger.info("rebuilding the index: building %s over %d vectors", factory, n)
    index = VectorIndex.build(dim, factory, ids[:n], vectors[:n], **index_options)
    columns = Columns()
    if n:
        columns.add(ids[:n], cameras, captured[:n])
    if progress:
        logger.info(
            "index rebuilt from the database: %d entries, %s, %.1f s", n, index.description, time.monotonic() - started
        )
    return IndexState(index, columns, (watermark, mark))
