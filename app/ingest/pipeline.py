"""One run: the tracks parsed and chosen, the frames decoded once, each request sent as soon as its crops are cut."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    # Imported where used: httpx is in the dev extra only, and `reid-admin migrate` in the service's image (which
    # builds this parser too) must not need it.
    import httpx


from app.ingest.errors import IngestError
from app.ingest.frames import DEFAULT_FOLDER_FPS, Frames, ImageFolder, Video, captured_at, crop_jpeg, open_frames
from app.ingest.service import Service, idempotency_key, track_persons
from app.ingest.state import State
from app.ingest.tracks import Pick, group, parse_tracks, select

logger = logging.getLogger(__name__)

MAX_FILES = 64  # crops per POST /sightings, the service's limit


# -- the run ---------------------------------------------------------------------------------------------------


@dataclass
class Options:
    camera: str
    fps: float | None = None
    start_time: datetime | None = None
    best_k: int = 5
    min_box: int = 32
    tracks_per_request: int | None = None  # default: as many as fit MAX_FILES
    state: Path | None = None  # default: <tracks>.ingest-state.json
    progress: bool = False


@dataclass
class Summary:
    tracks: int = 0  # sent by this run
    crops: int = 0
    requests: int = 0
    frames: int = 0  # decoded
    seconds: float = 0.0
    already_sent: int = 0  # by an earlier run (the state file)
    no_box: int = 0  # no box inside the frame and at least --min-box high

    def line(self, camera: str) -> str:
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        return (
            f"camera {camera}: sent {self.tracks} tracks ({self.crops} crops) in {self.requests} requests; "
            f"{self.frames} frames decoded in {self.seconds:.1f} s ({rate:.0f} frames/s); skipped "
            f"{self.already_sent} tracks sent before and {self.no_box} without a usable box"
        )


def _fps(options: Options, frames: Frames) -> float:
    if options.fps is not None:
        return options.fps
    if frames.fps is not None:
        return frames.fps
    if isinstance(frames, ImageFolder):
        return DEFAULT_FOLDER_FPS
    raise IngestError(f"{frames.name} does not tell its frame rate: pass --fps")


def _start(options: Options, frames: Frames) -> datetime:
    if options.start_time is not None:
        return options.start_time
    if frames.created is not None:
        logger.info("frame 1 taken at %s (the video's creation_time)", frames.created.isoformat())
        return frames.created
    raise IngestError(
        f"{frames.name} does not tell when frame 1 was taken: pass --start-time (RFC 3339, e.g. 2024-05-01T12:00:00Z)"
    )


def ingest(
    tracks_path: Path,
    frames_path: Path,
    options: Options,
    client: httpx.Client,
    sleep: Callable[[float], None] = time.sleep,
) -> Summary:
    """Send the tracks not yet acknowledged to the service behind ``client`` (its base_url); a summary."""
    began = time.monotonic()
    k = options.best_k
    per_request = options.tracks_per_request or max(1, MAX_FILES // k)
    if k < 1 or per_request < 1 or per_request * k > MAX_FILES:
        raise IngestError(
            f"--tracks-per-request x --best-k must be at most {MAX_FILES} (crops per request), got {per_request} x {k}"
        )
    try:
        data = tracks_path.read_bytes()
    except OSError as exc:
        raise IngestError(f"cannot read --tracks {tracks_path}: {exc.strerror or exc}") from None
    tracks_sha256 = hashlib.sha256(data).hexdigest()
    boxes = parse_tracks(tracks_path, data)
    state_path = options.state or tracks_path.with_name(tracks_path.name + ".ingest-state.json")
    state = State.load(state_path, tracks_sha256, options.camera)
    frames = open_frames(frames_path)
    try:
        fps, start = _fps(options, frames), _start(options, frames)
        summary = Summary()
        picks: dict[str, list[Pick]] = {}
        for track, track_boxes in boxes.items():
            if track in state.sent:
                summary.already_sent += 1
            elif chosen := select(track_boxes, frames.size, k, options.min_box):
                picks[track] = chosen
            else:
                summary.no_box += 1
        requests = group(picks, per_request)
        needed = sorted({p.frame for chosen in picks.values() for p in chosen})
        frames.check(needed)
        service = Service(client, sleep=sleep)
        if requests:
            service.check()
        _run(frames, needed, picks, requests, service, state, options, fps, start, tracks_sha256, summary)
        summary.requests = service.requests
    finally:
        frames.close()
    summary.seconds = time.monotonic() - began
    return summary


def _run(
    frames: Frames,
    needed: list[int],
    picks: dict[str, list[Pick]],
    requests: list[list[str]],
    service: Service,
    state: State,
    options: Options,
    fps: float,
    start: datetime,
    tracks_sha256: str,
    summary: Summary,
) -> None:
    """Decode once, cut the picks as their frames go by, send each request once its tracks are all cut."""
    at: dict[int, list[Pick]] = {}
    for chosen in picks.values():
        for pick in chosen:
            at.setdefault(pick.frame, []).append(pick)
    crops: dict[str, list[bytes]] = {}
    total = needed[-1] if needed and isinstance(frames, Video) else len(needed)
    quiet = not options.progress
    with (
        tqdm(total=total, desc="decoding frames", unit="frame", disable=quiet, position=0) as frame_bar,
        tqdm(total=len(picks), desc="sending tracks", unit="track", disable=quiet, position=1) as track_bar,
    ):

        def decoded() -> None:
            summary.frames += 1
            frame_bar.update(1)

        pending = iter(requests)
        current = next(pending, None)
        for number, image in frames.read(needed, decoded):
            if image.size != frames.size:
                raise IngestError(
                    f"frame {number} of {frames.name} is {image.size[0]}x{image.size[1]}, the first "
                    f"{frames.size[0]}x{frames.size[1]}: the boxes need one frame size"
                )
            for pick in at.get(number, []):
                crops.setdefault(pick.track, []).append(crop_jpeg(image, pick))
            while current is not None and picks[current[-1]][-1].frame <= number:
                _send(current, picks, crops, service, state, options.camera, fps, start, tracks_sha256, summary)
                track_bar.update(len(current))
                current = next(pending, None)


def _send(
    tracks: list[str],
    picks: dict[str, list[Pick]],
    crops: dict[str, list[bytes]],
    service: Service,
    state: State,
    camera: str,
    fps: float,
    start: datetime,
    tracks_sha256: str,
    summary: Summary,
) -> None:
    """One request: the tracks' crops, with the sightings JSON aligned to them; recorded once acknowledged."""
    files: list[tuple[str, bytes]] = []
    sightings: list[dict[str, Any]] = []
    for track in tracks:
        for pick, data in zip(picks[track], crops.pop(track), strict=True):
            files.append((f"{track}-{pick.frame:06d}.jpg", data))  # names for logs only: no camera's odd characters
            sightings.append(
                {
                    "camera": camera,
                    "track": track,
                    "captured_at": captured_at(start, fps, pick.frame),
                    "confidence": pick.conf,
                    "box": [pick.left, pick.top, pick.width, pick.height],
                }
            )
    answer = service.post(files, sightings, idempotency_key(camera, tracks, tracks_sha256))
    state.record(track_persons(answer, camera, tracks))
    summary.tracks += len(tracks)
    summary.crops += len(files)
