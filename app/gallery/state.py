"""What a search reads: the index, its columns, and how far into the change log both are."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from app.columns import Columns
from app.index import VectorIndex

# A change row as this process saw it: (op, entry id, time in µs). Sequence numbers alone do not say which
# database they came from: a restored or failed-over one hands the same numbers out again to other changes.
ChangeMark = tuple[str, int | None, int]


@dataclass(frozen=True)
class EntrySummary:
    """What a search result needs from the database, without the embedding."""

    identity: str
    camera: str | None
    captured_at: datetime


@dataclass
class IndexState:
    """The index, its columns and the last change seq both reflect (with that change's mark); swapped as one by
    a rebuild."""

    index: VectorIndex
    columns: Columns
    # (watermark, the change row at it; None at 0), one tuple: /ready and snapshots read it without the writers'
    # lock, and must never see a watermark with another change's mark.
    head: tuple[int, ChangeMark | None] = (0, None)
    ahead: dict[int, ChangeMark] = field(default_factory=dict)  # applied beyond the watermark (this process's writes)

    @property
    def watermark(self) -> int:
        return self.head[0]

    def applied(self, changes: Sequence[tuple[int, ChangeMark]]) -> None:
        self.ahead.update(changes)
        seq, mark = self.head
        while seq + 1 in self.ahead:
            seq += 1
            mark = self.ahead.pop(seq)
        self.head = (seq, mark)

    def advance(self, seq: int, mark: ChangeMark) -> None:
        """The log was replayed up to ``seq`` (whatever lay in between, gaps included)."""
        self.head = (seq, mark)
        self.ahead = {s: m for s, m in self.ahead.items() if s > seq}

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
