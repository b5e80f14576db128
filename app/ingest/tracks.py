"""The tracker's output: MOTChallenge lines parsed into boxes, and the few boxes per track to cut as crops."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Imported where used: httpx is in the dev extra only, and `reid-admin migrate` in the service's image (which
    # builds this parser too) must not need it.
    pass


from app.ingest.errors import IngestError

SNIPPET = 80  # characters of a bad line quoted in its error


# -- tracks ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Box:
    """One line of the tracks file: a box of ``track`` on ``frame`` (from 1), in pixels."""

    frame: int
    track: str
    x: float
    y: float
    w: float
    h: float
    conf: float


def _int(value: float) -> int | None:
    return int(value) if value.is_integer() else None


def parse_line(text: str, where: str) -> Box | None:
    """One MOT line ``frame,id,x,y,w,h,conf,...`` (extra columns ignored); None for a blank line."""
    text = text.strip()
    if not text:
        return None
    shown = text if len(text) <= SNIPPET else text[:SNIPPET] + "..."
    fields = [f.strip() for f in text.split(",")]
    try:
        numbers = [float(f) for f in fields[:7]]
    except ValueError:
        numbers = []
    if len(numbers) < 7 or not all(math.isfinite(n) for n in numbers):
        raise IngestError(f"{where}: expected at least 7 comma-separated numbers, got {shown!r}")
    frame, track = _int(numbers[0]), _int(numbers[1])
    if frame is None or frame < 1:
        raise IngestError(f"{where}: the frame number must be a whole number from 1, got {shown!r}")
    if track is None or track < 0:
        # det.txt files carry id -1 on every box: not tracks, nothing to group crops by.
        raise IngestError(
            f"{where}: the track id must be a whole number >= 0 (is this a detections file?), got {shown!r}"
        )
    x, y, w, h, conf = numbers[2:7]
    # MOT's -1 means "no confidence given": such a box counts as sure; others are kept within [0, 1].
    conf = 1.0 if conf < 0 else min(conf, 1.0)
    return Box(frame, str(track), x, y, w, h, conf)


def parse_tracks(path: Path, data: bytes) -> dict[str, list[Box]]:
    """Every box of the tracks file by track, each track's boxes in frame order (the lines may be in any order)."""
    tracks: dict[str, list[Box]] = {}
    text = data.decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        box = parse_line(line, f"{path.name} line {number}")
        if box is not None:
            tracks.setdefault(box.track, []).append(box)
    if not tracks:
        raise IngestError(f"{path} holds no box: expected MOT lines such as '1,3,100,50,40,120,0.9'")
    for boxes in tracks.values():
        boxes.sort(key=lambda b: b.frame)
    return tracks


# -- selection -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pick:
    """A box chosen for a crop, clipped to the frame: pixel edges ``left, top, right, bottom``."""

    track: str
    frame: int
    left: int
    top: int
    right: int
    bottom: int
    conf: float

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def score(self) -> float:
        """Quality: the visible area times the tracker's confidence (a bigger, surer box shows more of the
        person)."""
        return self.width * self.height * self.conf


def clip(box: Box, size: tuple[int, int]) -> Pick | None:
    """The box within the frame (pixel edges rounded), or None when nothing of it is inside."""
    width, height = size
    left, top = max(0, round(box.x)), max(0, round(box.y))
    right, bottom = min(width, round(box.x + box.w)), min(height, round(box.y + box.h))
    if right <= left or bottom <= top:
        return None
    return Pick(box.track, box.frame, left, top, right, bottom, box.conf)


def select(boxes: Sequence[Box], size: tuple[int, int], best_k: int, min_box: int) -> list[Pick]:
    """Up to ``best_k`` of a track's boxes, best quality first, in frame order: clipped, at least ``min_box`` px
    high. Neighbouring frames show the same pose, so a pick keeps a distance from those already taken (a
    fraction of the track's span) while others are left; then the next best fill any places still free."""
    by_frame: dict[int, Pick] = {}
    for box in boxes:
        pick = clip(box, size)
        if pick is None or pick.height < min_box:
            continue
        if pick.frame not in by_frame or pick.score > by_frame[pick.frame].score:  # a duplicate line: the better
            by_frame[pick.frame] = pick
    ranked = sorted(by_frame.values(), key=lambda p: (-p.score, p.frame))
    if not ranked:
        return []
    span = max(by_frame) - min(by_frame)
    gap = span // (2 * best_k)
    chosen: list[Pick] = []
    for pick in ranked:
        if len(chosen) == best_k:
            break
        if all(abs(pick.frame - c.frame) > gap for c in chosen):
            chosen.append(pick)
    for pick in ranked:  # fewer spread picks than places: the best of the rest
        if len(chosen) == best_k:
            break
        if pick not in chosen:
            chosen.append(pick)
    return sorted(chosen, key=lambda p: p.frame)


def group(picks: dict[str, list[Pick]], tracks_per_request: int) -> list[list[str]]:
    """The tracks in requests: ordered by their last crop's frame, so that each request can go as soon as the
    decoding has passed it."""
    order = sorted(picks, key=lambda t: (picks[t][-1].frame, _track_key(t)))
    return [order[i : i + tracks_per_request] for i in range(0, len(order), tracks_per_request)]


def _track_key(track: str) -> tuple[int, str]:
    return (int(track), track) if track.isdigit() else (0, track)
