"""Index snapshots: the index, its columns, and where in the log (and in which database) they stand, in one file
(``gallery.faiss``). A snapshot is used only for the database it was taken from: the same epoch, and the change
row at its watermark unchanged (a restored or failed-over database hands the same numbers to other changes)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.columns import Columns
from app.gallery import changelog
from app.gallery.state import IndexState
from app.index import VectorIndex

logger = logging.getLogger(__name__)

STALE_TEMPORARY_S = 600.0  # a snapshot being written touches its file all along; one this old was abandoned


def write(path: Path, state: IndexState, fingerprint: str | None, epoch: str | None) -> tuple[int, int]:
    """Write ``state`` atomically to ``path`` (the caller holds the index's read lock); (bytes, entries)."""
    arrays, extra = state.columns.arrays()
    watermark, mark = state.head
    meta: dict[str, Any] = {
        "watermark": watermark,
        "watermark_mark": list(mark) if mark is not None else None,
        "epoch": epoch,
        "fingerprint": fingerprint,
        **extra,
        "written_at": datetime.now(UTC).isoformat(),
    }
    return state.index.save(path, meta, arrays), len(arrays["ids"])


def load(
    path: Path,
    session: Session,
    index_options: dict[str, Any],
    *,
    dim: int,
    factory: str,
    fingerprint: str | None,
    epoch: str,
) -> tuple[IndexState | None, str]:
    """(the snapshot as a state, "") or (None, why it cannot be used with this database)."""
    if not path.exists():
        return None, f"no index snapshot at {path}"
    try:
        index, meta, arrays = VectorIndex.read(path, **index_options)
    except ValueError as exc:
        return None, str(exc)
    watermark = meta.get("watermark")
    if not isinstance(watermark, int) or "ids" not in arrays:
        return None, f"the index file {path} is not a gallery snapshot (no watermark)"
    if meta.get("fingerprint") != fingerprint:
        return None, "the snapshot was made under other weights"
    if meta.get("epoch") != epoch:
        return None, f"the snapshot belongs to another database (epoch {meta.get('epoch')}, the database's {epoch})"
    if index.factory != factory or index.dim != dim:
        return None, f"the snapshot holds a {index.dim}-d {index.factory!r} index, not a {dim}-d {factory!r} one"
    mark = tuple(meta["watermark_mark"]) if meta.get("watermark_mark") else None
    if watermark and changelog.mark_at(session, watermark) != mark:
        return None, (
            f"the database's change {watermark} is not the one the snapshot holds: the database was restored from "
            "a backup or failed over since the snapshot was written"
        )
    columns = Columns.from_arrays(arrays, meta.get("cameras", []))
    if columns.live != len(index):
        return None, f"the snapshot holds {len(index)} vectors but {columns.live} column rows"
    return IndexState(index, columns, (watermark, mark)), ""  # type: ignore[arg-type]


def remove_stale_temporaries(path: Path, min_age_s: float = STALE_TEMPORARY_S) -> int:
    """Remove what a process killed while writing a snapshot left beside ``path`` (as large as the index); files
    younger than ``min_age_s`` may be another replica's snapshot on its way (0: this process owns the folder)."""
    removed = 0
    cutoff = time.time() - min_age_s
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    if removed:
        logger.info("removed %d unfinished snapshot files beside %s", removed, path)
    return removed
