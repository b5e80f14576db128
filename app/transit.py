"""The transit table (REID_TRANSIT_TABLE): the least time anyone takes to walk from one camera to another, so that
sightings on the two closer in time than that are two people, however alike they look.

A CSV file with a header ``camera_a,camera_b,min_seconds`` and a row per pair of cameras, read both ways. Cameras
not in it, and two sightings of one camera, are not constrained. Online (``app.sightings.plan``) a tracklet does
not join a person seen too recently at such a camera; re-grouping (``app.regroup``) never puts two such tracks or
lone crops in one group.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

COLUMNS = ("camera_a", "camera_b", "min_seconds")


@dataclass(frozen=True)
class Span:
    """Where and when something was seen: a tracklet, a track, a lone crop."""

    camera: str | None
    start: datetime
    end: datetime


@dataclass(frozen=True)
class TransitTable:
    least: dict[tuple[str, str], timedelta]  # both orders of each pair

    @classmethod
    def load(cls, path: Path) -> TransitTable:
        """Read the table; a ValueError naming the file and line for anything it cannot use."""
        least: dict[tuple[str, str], timedelta] = {}
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header) != COLUMNS:
                raise ValueError(f"transit table {path}: the first line must be {','.join(COLUMNS)}, got {header}")
            for row in reader:
                line = reader.line_num
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) != 3:
                    raise ValueError(f"transit table {path}, line {line}: expected 3 values, got {row}")
                a, b, seconds = (cell.strip() for cell in row)
                if not a or not b or a == b:
                    raise ValueError(f"transit table {path}, line {line}: two different cameras needed, got {row}")
                try:
                    gap = float(seconds)
                except ValueError:
                    gap = float("nan")
                if not gap >= 0 or gap == float("inf"):
                    raise ValueError(f"transit table {path}, line {line}: min_seconds must be a number >= 0, got {row}")
                if (a, b) in least:
                    raise ValueError(f"transit table {path}, line {line}: the pair {a},{b} is given twice")
                least[(a, b)] = least[(b, a)] = timedelta(seconds=gap)
        return cls(least)

    def least_from(self, camera: str | None) -> dict[str, timedelta]:
        """The cameras constrained against ``camera``, with their least transit time."""
        return {b: gap for (a, b), gap in self.least.items() if a == camera}

    def too_soon(self, one: Span, other: Span) -> bool:
        """Seen at two cameras closer in time than anyone walks between them."""
        if one.camera is None or other.camera is None:
            return False
        gap = self.least.get((one.camera, other.camera))
        return gap is not None and separation(one, other) < gap

    def conflicts(self, spans: Sequence[Span]) -> list[tuple[int, int]]:
        """Index pairs of ``spans`` too soon for their cameras: a sweep over each constrained pair's spans in time
        order, so the cost grows with the pairs found, not with every pair."""
        by_camera: dict[str, list[int]] = {}
        for i, s in enumerate(spans):
            if s.camera is not None:
                by_camera.setdefault(s.camera, []).append(i)
        pairs: list[tuple[int, int]] = []
        for (a, b), gap in self.least.items():
            if a < b and a in by_camera and b in by_camera:
                pairs.extend(_sweep(spans, by_camera[a], by_camera[b], gap))
        return pairs


def _sweep(
    spans: Sequence[Span], one_ids: list[int], other_ids: list[int], gap: timedelta
) -> Iterator[tuple[int, int]]:
    """Pairs (i, j), i < j, of one camera's spans and the other's closer than ``gap``: the other's in order of their
    start, each of the first camera's looking only at those that start within reach of it."""
    others = sorted(other_ids, key=lambda i: spans[i].start)
    starts = np.array([spans[i].start.timestamp() for i in others])
    longest = max((spans[i].end - spans[i].start).total_seconds() for i in others)
    for i in one_ids:
        one = spans[i]
        lo = np.searchsorted(starts, one.start.timestamp() - gap.total_seconds() - longest, side="left")
        hi = np.searchsorted(starts, one.end.timestamp() + gap.total_seconds(), side="left")
        for j in others[lo:hi]:
            if separation(one, spans[j]) < gap:
                yield (i, j) if i < j else (j, i)


def separation(one: Span, other: Span) -> timedelta:
    """The time between two spans (zero where they overlap)."""
    return max(other.start - one.end, one.start - other.end, timedelta(0))
