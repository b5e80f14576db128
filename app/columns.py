"""What search filters read: per-entry columns (camera, capture time) held in memory beside the FAISS index and
kept in step with it from the change log, so a filtered search runs no SQL and never widens k."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

NO_CAMERA = -1
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_GROW = 1024


@dataclass(frozen=True)
class EntryFilter:
    """Which entries a search may return; every condition given must hold."""

    cameras: tuple[str, ...] | None = None  # keep only entries of these cameras (an entry with no camera: dropped)
    exclude_cameras: tuple[str, ...] = ()  # drop entries of these cameras (an entry with no camera: kept)
    after: datetime | None = None  # captured_at >= after
    before: datetime | None = None  # captured_at < before


def to_microseconds(moment: datetime) -> int:
    """UTC microseconds since the epoch; a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // timedelta(microseconds=1)


class Columns:
    """id -> camera code, capture time (µs), alive; rows sorted by id. New ids are larger than old ones (the
    database hands them out in commit order), so adding is an append; a deletion marks the row dead and dead
    rows are dropped once they are a quarter of the table (amortised O(1))."""

    def __init__(self) -> None:
        self.n = 0  # rows in use, dead ones included
        self.live = 0
        self.cameras: list[str] = []
        self._codes: dict[str, int] = {}
        self._ids = np.zeros(_GROW, np.int64)
        self._camera = np.zeros(_GROW, np.int32)
        self._captured = np.zeros(_GROW, np.int64)
        self._alive = np.zeros(_GROW, bool)

    def code(self, camera: str | None) -> int:
        if camera is None:
            return NO_CAMERA
        code = self._codes.get(camera)
        if code is None:
            code = self._codes[camera] = len(self.cameras)
            self.cameras.append(camera)
        return code

    def _position(self, entry_id: int) -> int | None:
        i = int(np.searchsorted(self._ids[: self.n], entry_id))
        return i if i < self.n and self._ids[i] == entry_id else None

    def contains(self, entry_id: int) -> bool:
        i = self._position(entry_id)
        return i is not None and bool(self._alive[i])

    def _reserve(self, extra: int) -> None:
        if self.n + extra <= len(self._ids):
            return
        size = max(2 * len(self._ids), self.n + extra)
        for name in ("_ids", "_camera", "_captured", "_alive"):
            old = getattr(self, name)
            new = np.zeros(size, old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    def add(self, ids: np.ndarray, cameras: list[str | None], captured_us: np.ndarray) -> None:
        """Add live rows (ids not yet live)."""
        ids = np.asarray(ids, np.int64)
        codes = np.array([self.code(c) for c in cameras], np.int32)
        captured_us = np.asarray(captured_us, np.int64)
        order = np.argsort(ids, kind="stable")
        ids, codes, captured_us = ids[order], codes[order], captured_us[order]
        if self.n == 0 or ids[0] > self._ids[self.n - 1]:
            self._reserve(len(ids))
            end = self.n + len(ids)
            self._ids[self.n : end], self._camera[self.n : end] = ids, codes
            self._captured[self.n : end], self._alive[self.n : end] = captured_us, True
            self.n = end
            self.live += len(ids)
            return
        for entry_id, code, captured in zip(ids, codes, captured_us, strict=True):  # out of order: rare
            i = int(np.searchsorted(self._ids[: self.n], entry_id))
            if i < self.n and self._ids[i] == entry_id:
                self.live += not self._alive[i]
                self._camera[i], self._captured[i], self._alive[i] = code, captured, True
                continue
            self._reserve(1)
            for name, value in (("_ids", entry_id), ("_camera", code), ("_captured", captured), ("_alive", True)):
                column = getattr(self, name)
                column[i + 1 : self.n + 1] = column[i : self.n].copy()
                column[i] = value
            self.n += 1
            self.live += 1

    def remove(self, ids: np.ndarray) -> np.ndarray:
        """Mark ``ids`` dead; those that were live."""
        ids = np.unique(np.asarray(ids, np.int64))
        positions = np.searchsorted(self._ids[: self.n], ids)
        inside = positions < self.n
        hit = np.zeros(len(ids), bool)
        hit[inside] = self._ids[positions[inside]] == ids[inside]
        hit[hit] = self._alive[positions[hit]]
        self._alive[positions[hit]] = False
        self.live -= int(hit.sum())
        if self.n - self.live > max(_GROW, self.n // 4):
            self._compact()
        return ids[hit]

    def _compact(self) -> None:
        keep = self._alive[: self.n]
        for name in ("_ids", "_camera", "_captured"):
            column = getattr(self, name)
            kept = column[: self.n][keep]
            column[: len(kept)] = kept
        self.n = self.live
        self._alive[: self.n] = True
        self._alive[self.n :] = False

    def allowed(self, where: EntryFilter) -> np.ndarray:
        """The live ids that ``where`` keeps, sorted (what the FAISS id selector is built from)."""
        n = self.n
        mask = self._alive[:n].copy()
        camera = self._camera[:n]
        if where.cameras is not None:
            codes = [self._codes[c] for c in where.cameras if c in self._codes]
            mask &= np.isin(camera, codes)  # NO_CAMERA is never in codes
        if where.exclude_cameras:
            codes = [self._codes[c] for c in where.exclude_cameras if c in self._codes]
            mask &= ~np.isin(camera, codes)
        if where.after is not None:
            mask &= self._captured[:n] >= to_microseconds(where.after)
        if where.before is not None:
            mask &= self._captured[:n] < to_microseconds(where.before)
        return self._ids[:n][mask]

    def arrays(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The live rows as arrays, and the camera names, for a snapshot."""
        keep = self._alive[: self.n]
        arrays = {
            "ids": self._ids[: self.n][keep].copy(),
            "camera": self._camera[: self.n][keep].copy(),
            "captured_us": self._captured[: self.n][keep].copy(),
        }
        return arrays, {"cameras": list(self.cameras)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], cameras: list[str]) -> Columns:
        out = cls()
        out.cameras = list(cameras)
        out._codes = {c: i for i, c in enumerate(cameras)}
        ids = arrays["ids"].astype(np.int64)
        order = np.argsort(ids, kind="stable")
        out._reserve(len(ids))
        out.n = out.live = len(ids)
        out._ids[: out.n] = ids[order]
        out._camera[: out.n] = arrays["camera"][order]
        out._captured[: out.n] = arrays["captured_us"][order]
        out._alive[: out.n] = True
        return out
