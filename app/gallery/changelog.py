"""The change log (``reid_changes``): one numbered row per add or delete, written in the change's own transaction
by writers that hold the writers' lock, so numbers are in commit order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from app.columns import to_microseconds
from app.db import NOTIFY_CHANNEL, OP_ADD, WRITE_LOCK, Change, Entry
from app.faults import WriteBusy, is_busy
from app.gallery.state import ChangeMark

REPLAY_BATCH = 2_000


def lock_writers(session: Session, postgres: bool, timeout_s: float) -> None:
    """Take the writers' lock for this transaction, or raise WriteBusy after ``timeout_s`` (a stuck writer
    elsewhere must not stall this replica's writes, and then its thread pool, for ever). On SQLite the database
    file's own lock serialises writers, with the connection's busy timeout."""
    if not postgres:
        return
    try:
        session.execute(text(f"SET LOCAL lock_timeout = '{int(timeout_s * 1000)}ms'"))
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK})
    except DBAPIError as exc:
        if is_busy(exc):
            raise WriteBusy(f"another writer has held the gallery's write lock for over {timeout_s:g} s") from exc
        raise


def append(session: Session, op: str, entry_ids: Sequence[int | None], postgres: bool) -> list[tuple[int, ChangeMark]]:
    """Log the changes in this transaction; their (seq, mark)."""
    changes = [Change(op=op, entry_id=i) for i in entry_ids]
    session.add_all(changes)
    session.flush()
    if postgres and changes:  # delivered to the other replicas when this transaction commits
        session.execute(text("SELECT pg_notify(:channel, :seq)"), {"channel": NOTIFY_CHANNEL, "seq": "1"})
    return [(c.seq, mark_of(c)) for c in changes]


def mark_of(change: Any) -> ChangeMark:
    return (change.op, change.entry_id, to_microseconds(change.at))


def last_seq(session: Session) -> int:
    return session.scalar(select(func.max(Change.seq))) or 0


def mark_at(session: Session, seq: int) -> ChangeMark | None:
    """The change row numbered ``seq`` as a mark; None when the database has no such row."""
    row = session.execute(select(Change.op, Change.entry_id, Change.at).where(Change.seq == seq)).first()
    return None if row is None else mark_of(row)


def changes_after(session: Session, seq: int, limit: int = REPLAY_BATCH) -> Sequence[Any]:
    """The next changes after ``seq`` with what replaying an add needs (a deleted entry's columns are None)."""
    return session.execute(
        select(
            Change.seq,
            Change.op,
            Change.entry_id,
            Change.at,
            Entry.embedding,
            Entry.camera,
            Entry.captured_at,
            Entry.created_at,
        )
        .outerjoin(Entry, and_(Entry.id == Change.entry_id, Change.op == OP_ADD))
        .where(Change.seq > seq)
        .order_by(Change.seq)
        .limit(limit)
    ).all()
