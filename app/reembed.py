"""Re-embedding: every entry's template recomputed from its stored crop under new weights, then the gallery's
fingerprint switched in one transaction (``reid-admin reembed``).

The new templates are staged in ``reid_entries.embedding_next`` batch by batch, each batch committed, so a run
that stops resumes where it was (a run for other weights starts over). Entries enrolled meanwhile are picked up
before the switch, which happens under the writers' lock once every entry has a staged template: the old
embeddings are replaced, the fingerprint set and a ``reembed`` change logged, which makes running replicas
rebuild (same weights) or stop serving (other weights).

Entries deleted while it runs (by a running replica) are skipped, and one run at a time holds a lock: on
PostgreSQL an advisory lock, on SQLite the data folder's (``reid-admin``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from app import migrate
from app.db import (
    META_FINGERPRINT,
    META_REEMBED_TARGET,
    NOTIFY_CHANNEL,
    OP_REEMBED,
    REEMBED_LOCK,
    WRITE_LOCK,
    Change,
    Entry,
    GalleryMeta,
    make_sessionmaker,
)

logger = logging.getLogger(__name__)

Embed = Callable[[list[Image.Image]], np.ndarray]


@contextlib.contextmanager
def one_run(engine: Engine) -> Iterator[None]:
    """Hold the re-embed lock for the run (PostgreSQL; on SQLite the caller holds the data folder's lock)."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        if not connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": REEMBED_LOCK}):
            raise RuntimeError("another `reid-admin reembed` is running on this database; wait for it to finish")
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": REEMBED_LOCK})


def _set_meta(session: Session, key: str, value: str | None) -> None:
    row = session.get(GalleryMeta, key)
    if value is None:
        if row is not None:
            session.delete(row)
    elif row is None:
        session.add(GalleryMeta(key=key, value=value))
    else:
        row.value = value


def reembed(
    engine: Engine, data_dir: Path, embed: Embed, fingerprint: str, batch_size: int = 64, progress: bool = False
) -> int:
    """Re-embed the gallery for the weights with ``fingerprint``; the entries embedded by this run."""
    with one_run(engine):
        return _reembed(engine, data_dir, embed, fingerprint, batch_size, progress)


def _reembed(engine: Engine, data_dir: Path, embed: Embed, fingerprint: str, batch_size: int, progress: bool) -> int:
    migrate.upgrade(engine)
    sessions = make_sessionmaker(engine)
    with sessions() as session, session.begin():
        stored = session.scalar(select(GalleryMeta.value).where(GalleryMeta.key == META_FINGERPRINT))
        if stored == fingerprint:
            logger.info("the gallery's embeddings already belong to weights %s: nothing to do", fingerprint)
            _set_meta(session, META_REEMBED_TARGET, None)
            return 0
        target = session.scalar(select(GalleryMeta.value).where(GalleryMeta.key == META_REEMBED_TARGET))
        if target != fingerprint:
            if target is not None:
                logger.info("a re-embed for other weights (%s) was under way: starting over", target)
            session.execute(update(Entry).values(embedding_next=None))
            _set_meta(session, META_REEMBED_TARGET, fingerprint)
    done = 0
    while True:
        with sessions() as session:
            remaining = session.scalar(select(func.count(Entry.id)).where(Entry.embedding_next.is_(None))) or 0
        if remaining:
            done += _embed_missing(sessions, data_dir, embed, batch_size, remaining, progress)
        with sessions() as session, session.begin():
            if engine.dialect.name == "postgresql":
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK})
            if session.scalar(select(func.count(Entry.id)).where(Entry.embedding_next.is_(None))):
                continue  # enrolled meanwhile: embed those too, then try again
            session.execute(update(Entry).values(embedding=Entry.embedding_next, embedding_next=None))
            _set_meta(session, META_FINGERPRINT, fingerprint)
            _set_meta(session, META_REEMBED_TARGET, None)
            session.add(Change(op=OP_REEMBED, entry_id=None))
            if engine.dialect.name == "postgresql":
                session.execute(text("SELECT pg_notify(:channel, '1')"), {"channel": NOTIFY_CHANNEL})
        logger.info("re-embedded %d entries; the gallery now belongs to weights %s", done, fingerprint)
        return done


def _embed_missing(
    sessions: sessionmaker, data_dir: Path, embed: Embed, batch_size: int, total: int, progress: bool
) -> int:
    done, last = 0, 0
    with tqdm(total=total, desc="re-embedding", unit="crop", disable=not progress) as bar:
        while True:
            with sessions() as session:
                rows = session.execute(
                    select(Entry.id, Entry.crop_path)
                    .where(Entry.embedding_next.is_(None), Entry.id > last)
                    .order_by(Entry.id)
                    .limit(batch_size)
                ).all()
            if not rows:
                return done
            images, embedded = [], []
            for row in rows:
                path = data_dir / row.crop_path
                try:
                    with Image.open(path) as image:
                        images.append(image.convert("RGB"))
                    embedded.append(row.id)
                except FileNotFoundError:
                    if _deleted(sessions, row.id):  # a replica deleted it meanwhile (and then its crop)
                        continue
                    raise FileNotFoundError(
                        f"entry {row.id}'s stored crop {path} is missing, so it cannot be re-embedded; delete the "
                        f"entry (DELETE /gallery/{row.id}) and run reembed again (it resumes)"
                    ) from None
            if images:
                vectors = np.asarray(embed(images), dtype="<f4")
                # Core executemany: a row deleted meanwhile updates nothing (the ORM's bulk update would raise).
                with sessions() as session, session.begin():
                    session.connection().execute(
                        update(Entry.__table__)
                        .where(Entry.__table__.c.id == bindparam("entry_id"))
                        .values(embedding_next=bindparam("vector")),
                        [{"entry_id": i, "vector": v.tobytes()} for i, v in zip(embedded, vectors, strict=True)],
                    )
            done += len(embedded)
            last = rows[-1].id
            bar.update(len(rows))


def _deleted(sessions: sessionmaker, entry_id: int) -> bool:
    with sessions() as session:
        return session.get(Entry, entry_id) is None
