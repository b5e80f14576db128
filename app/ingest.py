"""``reid-admin ingest``: a tracker's output (MOTChallenge tracks + the frames they were cut from) sent to a
running service's ``POST /sightings``, a few good crops per track.

Per track the K best boxes (quality = box area x confidence, spread over the track) are kept; the frames are
decoded once, in order, and each selected box is cut as it goes by, so memory holds the crops of the tracks not
yet sent only. Tracks go in groups (at most 64 crops a request), in the order in which their last crop is
decoded, each group as soon as it is complete. A state file records the tracks the service acknowledged, so a run
that stops resumes where it was; each request carries an ``Idempotency-Key`` derived from the camera, its tracks
and the tracks file, so a retry after a lost answer is answered, not enrolled twice.

Only the HTTP client of the service: neither the database nor torch is needed here."""

from __future__ import annotations

import argparse
import configparser
import contextlib
import email.utils
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

if TYPE_CHECKING:
    # Imported where used: httpx is in the dev extra only, and `reid-admin migrate` in the service's image (which
    # builds this parser too) must not need it.
    import httpx

logger = logging.getLogger(__name__)

MAX_FILES = 64  # crops per POST /sightings, the service's limit
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_FOLDER_FPS = 25.0  # MOT17/MOT20's usual rate, when neither --fps nor seqinfo.ini tells
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
RETRY_STATUSES = frozenset({429, 502, 503, 504})  # overloaded, starting, or a proxy without its upstream
JPEG_QUALITY = 95
MAX_RETRY_AFTER_S = 300.0  # a Retry-After past this is read as this: a run should not sleep for hours
SNIPPET = 80  # characters of a bad line quoted in its error


class IngestError(Exception):
    """A problem the operator can fix, told in one sentence (no traceback)."""


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


# -- frames ----------------------------------------------------------------------------------------------------


class Frames(Protocol):
    """Where the boxes' pixels come from: frame numbers from 1, read in order."""

    name: str
    size: tuple[int, int]
    fps: float | None  # the source's own rate, when it has one
    created: datetime | None  # the source's own time of frame 1, when it has one

    def check(self, needed: Sequence[int]) -> None: ...

    def read(self, needed: Sequence[int], decoded: Callable[[], None]) -> Iterator[tuple[int, Image.Image]]:
        """The needed frames (sorted), in order; ``decoded`` is called for every frame decoded."""
        ...

    def close(self) -> None: ...


_NUMBERED = re.compile(r"(\d+)$")


class ImageFolder:
    """An image sequence (MOT's ``img1/``): the number at the end of each name is its frame (``000001.jpg``,
    ``frame_1.png``), any zero padding; only the needed frames are read."""

    def __init__(self, path: Path) -> None:
        self.name = path.name
        self.paths: dict[int, Path] = {}
        for child in sorted(path.iterdir()):
            match = _NUMBERED.search(child.stem)
            if child.suffix.lower() not in IMAGE_SUFFIXES or match is None:
                continue
            number = int(match.group(1))
            if number in self.paths:
                raise IngestError(f"{path}: frame {number} is both {self.paths[number].name} and {child.name}")
            self.paths[number] = child
        if not self.paths:
            raise IngestError(f"{path} holds no numbered .jpg, .jpeg or .png image (such as 000001.jpg)")
        first = self.paths[min(self.paths)]
        self.size = _image_size(first)
        self.fps = _seqinfo_rate(path.parent / "seqinfo.ini")
        self.created = None

    def check(self, needed: Sequence[int]) -> None:
        missing = [n for n in needed if n not in self.paths]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise IngestError(
                f"frame {missing[0]}{more} of the tracks has no image in {self.name}/, such as {missing[0]:06d}.jpg"
            )

    def read(self, needed: Sequence[int], decoded: Callable[[], None]) -> Iterator[tuple[int, Image.Image]]:
        for number in needed:
            path = self.paths[number]
            try:
                with Image.open(path) as image:
                    rgb = image.convert("RGB")
            except (OSError, ValueError) as exc:
                raise IngestError(f"cannot read frame {number} ({path}): {exc}") from None
            decoded()
            yield number, rgb

    def close(self) -> None:
        pass


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError) as exc:
        raise IngestError(f"cannot read {path}: {exc}") from None


def _seqinfo_rate(path: Path) -> float | None:
    """MOT sequences tell their rate beside ``img1/`` (``seqinfo.ini``, ``frameRate=30``)."""
    parser = configparser.ConfigParser()
    try:
        parser.read(path, encoding="utf-8")
        rate = float(parser.get("Sequence", "frameRate"))
    except (configparser.Error, ValueError, UnicodeDecodeError):
        return None
    return rate if rate > 0 and math.isfinite(rate) else None


class Video:
    """A video file decoded with PyAV, every frame in order (a video cannot seek cheaply); only the needed ones
    are converted to images."""

    def __init__(self, path: Path) -> None:
        import av  # only for videos: an image folder needs no FFmpeg

        self.name = path.name
        self.path = path
        try:
            self.container = av.open(str(path))
        except (av.FFmpegError, OSError) as exc:
            raise IngestError(f"cannot read the video {path}: {exc}") from None
        if not self.container.streams.video:
            self.container.close()
            raise IngestError(f"{path} has no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"  # frame threads: decoding is most of the run's time
        self.size = (self.stream.codec_context.width, self.stream.codec_context.height)
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(rate) if rate else None
        self.created = _parse_time(self.container.metadata.get("creation_time") or "")
        self.av = av

    def check(self, needed: Sequence[int]) -> None:
        pass  # the number of frames is only known once decoded: read() tells when the video ends too soon

    def read(self, needed: Sequence[int], decoded: Callable[[], None]) -> Iterator[tuple[int, Image.Image]]:
        if not needed:
            return
        wanted = set(needed)
        last = needed[-1]
        number = 0
        try:
            for frame in self.container.decode(self.stream):
                number += 1
                decoded()
                if number in wanted:
                    yield number, frame.to_image()
                if number >= last:
                    return
        except self.av.FFmpegError as exc:
            raise IngestError(f"cannot decode {self.path} past frame {number}: {exc}") from None
        raise IngestError(f"{self.path} ends at frame {number}, but the tracks have boxes up to frame {last}")

    def close(self) -> None:
        self.container.close()


def open_frames(path: Path) -> Frames:
    """An image folder or a video file."""
    if path.is_dir():
        return ImageFolder(path)
    if path.is_file():
        return Video(path)
    raise IngestError(f"--frames {path} does not exist")


def crop_jpeg(image: Image.Image, pick: Pick) -> bytes:
    """The pick cut from its frame, as JPEG: held encoded, a tenth of the pixels' memory."""
    out = io.BytesIO()
    image.crop((pick.left, pick.top, pick.right, pick.bottom)).save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


# -- time ------------------------------------------------------------------------------------------------------


def _parse_time(text: str) -> datetime | None:
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value  # FFmpeg's creation_time is UTC


def parse_start_time(text: str) -> datetime:
    """``--start-time``: RFC 3339 with its offset (``Z`` or ``+02:00``): a camera's local time is ambiguous."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time such as 2024-05-01T12:00:00Z") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no offset: add Z (UTC) or one such as +02:00")
    return value


def captured_at(start: datetime, fps: float, frame: int) -> str:
    """Frame 1 is taken at ``start``, frame n at ``start + (n - 1) / fps``."""
    return (start + timedelta(seconds=(frame - 1) / fps)).isoformat(timespec="microseconds")


# -- state -----------------------------------------------------------------------------------------------------


@dataclass
class State:
    """The tracks the service acknowledged (track -> its person), for one tracks file and camera."""

    path: Path
    tracks_sha256: str
    camera: str
    sent: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, tracks_sha256: str, camera: str) -> State:
        if not os.access(path.parent, os.W_OK):  # found now, not once the service has taken the first tracks
            raise IngestError(f"cannot write the state file {path} (its folder is not writable): pass --state")
        if not path.exists():
            return cls(path, tracks_sha256, camera)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            stored_sha, stored_camera, sent = data["tracks_sha256"], data["camera"], dict(data["sent"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IngestError(f"cannot read the state file {path} ({exc}): delete it to start over") from None
        if stored_sha != tracks_sha256 or stored_camera != camera:
            raise IngestError(
                f"the state file {path} belongs to another run (camera {stored_camera!r} and another tracks "
                "file's content): pass another --state, or delete it to send every track again"
            )
        return cls(path, tracks_sha256, camera, sent)

    def record(self, answered: dict[str, str | None]) -> None:
        """Add acknowledged tracks, atomically: a crash leaves the previous file or this one, never half."""
        self.sent.update(answered)
        data = {"tracks_sha256": self.tracks_sha256, "camera": self.camera, "sent": self.sent}
        temp = None
        try:
            fd, temp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, self.path)
        except BaseException as exc:
            if temp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            if isinstance(exc, OSError):  # a rerun sends these tracks again under the same keys: answered, not twice
                raise IngestError(f"cannot write the state file {self.path}: {exc}") from None
            raise


# -- the service -----------------------------------------------------------------------------------------------


def idempotency_key(camera: str, tracks: Sequence[str], tracks_sha256: str) -> str:
    """The same request (camera, its tracks, the same tracks file) always gets the same key."""
    digest = hashlib.sha256("\0".join([camera, tracks_sha256, *tracks]).encode("utf-8", "surrogatepass"))
    return f"reid-ingest-{digest.hexdigest()}"


def _problem(response: httpx.Response) -> str:
    """The service's ``{"detail", "code"}`` as words; any other body, its start."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        code = f" {body['code']}" if body.get("code") else ""
        return f"{response.status_code}{code}: {body['detail']}"
    return f"{response.status_code}: {response.text[:200].strip() or response.reason_phrase}"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER_S, max(0.0, (when - datetime.now(UTC)).total_seconds()))


class Service:
    """``POST /sightings`` with retries: 429, 503 (and a proxy's 502/504) or a lost connection are retried with
    back-off, honouring Retry-After; any other error stops the run."""

    def __init__(self, client: httpx.Client, retries: int = 8, sleep: Callable[[float], None] = time.sleep) -> None:
        self.client = client  # its base_url, and its headers: the API key
        self.retries = retries
        self.sleep = sleep
        self.requests = 0

    def check(self) -> None:
        """Fail before decoding anything when the service is unreachable or refuses the key."""
        import httpx

        try:
            response = self.client.get("/ready")
        except httpx.HTTPError as exc:
            raise IngestError(f"cannot reach the service at {self.client.base_url}: {exc}; is it running?") from None
        if response.status_code in (401, 403):
            raise IngestError(
                f"the service refused the API key ({_problem(response)}): pass --api-key or set REID_API_KEY"
            )

    def post(self, files: list[tuple[str, bytes]], sightings: list[dict[str, Any]], key: str) -> dict[str, Any]:
        """The 201 answer's JSON for one request, sent again until acknowledged or refused."""
        import httpx

        headers = {"Idempotency-Key": key}
        parts = [("files", (name, data, "image/jpeg")) for name, data in files]
        form = {"sightings": json.dumps(sightings)}
        for attempt in range(1, self.retries + 1):
            backoff = min(30.0, 2.0 ** (attempt - 1))
            try:
                response = self.client.post("/sightings", headers=headers, data=form, files=parts)
            except httpx.TransportError as exc:  # the answer may be lost: the same key makes the retry safe
                why, delay = f"{type(exc).__name__}: {exc}", backoff
            else:
                if response.status_code == 201:
                    self.requests += 1
                    return _answer(response)
                if response.status_code not in RETRY_STATUSES:
                    raise IngestError(_refusal(response))
                why, delay = _problem(response), _retry_after(response)
                delay = backoff if delay is None else delay
            if attempt == self.retries:
                raise IngestError(
                    f"the service at {self.client.base_url} still failed after {attempt} tries "
                    f"({why}); run again later: it resumes"
                )
            logger.warning(
                "POST /sightings failed (%s): retrying in %.1f s (try %d of %d)", why, delay, attempt, self.retries
            )
            self.sleep(delay)
        raise AssertionError("unreachable")


def _answer(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise IngestError(f"the service answered 201 without a JSON object: {response.text[:200]!r}")
    return body


def _refusal(response: httpx.Response) -> str:
    problem = _problem(response)
    if "idempotency_key_reused" in problem:  # a stopped run's request, now with other crops
        return (
            f"the service refused the request ({problem}): these tracks were sent before with other crops (were "
            "--best-k, --min-box or the frames changed since a run that stopped?); rerun with the same options, "
            "or pass another --camera"
        )
    return f"the service refused the request ({problem})"


def _persons(answer: dict[str, Any], camera: str, tracks: Sequence[str]) -> dict[str, str | None]:
    """Each sent track's person in the answer (None where the answer does not say)."""
    persons: dict[str, str | None] = dict.fromkeys(tracks)
    for tracklet in answer.get("tracklets") or []:
        if isinstance(tracklet, dict) and tracklet.get("camera") == camera and tracklet.get("track") in persons:
            persons[tracklet["track"]] = tracklet.get("person")
    return persons


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
    state.record(_persons(answer, camera, tracks))
    summary.tracks += len(tracks)
    summary.crops += len(files)


# -- the command -----------------------------------------------------------------------------------------------


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``reid-admin ingest``'s options."""
    parser.add_argument(
        "--tracks",
        type=Path,
        metavar="FILE",
        required=True,
        help="the tracker's output, MOTChallenge lines "
        "'frame,id,x,y,w,h,conf,...' (frames from 1, pixels; extra columns ignored)",
    )
    parser.add_argument(
        "--frames",
        type=Path,
        metavar="PATH",
        required=True,
        help="the frames: an image folder such as MOT's "
        "img1/ (000001.jpg ..., .jpg/.jpeg/.png, the number ending each name is the frame) or a "
        "video file (decoded with PyAV)",
    )
    parser.add_argument("--camera", required=True, metavar="NAME", help="the camera's name, sent with every sighting")
    parser.add_argument(
        "--fps",
        type=_positive(float),
        metavar="N",
        help="frames per second, for the times: default the "
        f"video's rate; for a folder its ../seqinfo.ini frameRate, else {DEFAULT_FOLDER_FPS:g}",
    )
    parser.add_argument(
        "--start-time",
        type=parse_start_time,
        metavar="TIME",
        help="when frame 1 was taken, RFC 3339 with an "
        "offset (2024-05-01T12:00:00Z); frame n is start + (n-1)/fps. Required, except for a video "
        "that carries a creation_time tag (used then); file modification times are not trusted",
    )
    parser.add_argument("--url", default=DEFAULT_URL, metavar="URL", help="the service (default %(default)s)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("REID_API_KEY"),
        metavar="KEY",
        help="the service's key (default: $REID_API_KEY)",
    )
    parser.add_argument(
        "--best-k",
        type=_positive(int),
        metavar="K",
        default=5,
        help="crops per track (default %(default)s): the best by quality = box area x confidence, kept apart in time",
    )
    parser.add_argument(
        "--min-box",
        type=_positive(int),
        metavar="PX",
        default=32,
        help="smallest box height in pixels, after clipping to the frame (default %(default)s)",
    )
    parser.add_argument(
        "--tracks-per-request",
        type=_positive(int),
        metavar="N",
        help=f"tracks per request, so that tracks x best-k <= {MAX_FILES} (default: {MAX_FILES} // best-k)",
    )
    parser.add_argument(
        "--state",
        type=Path,
        metavar="FILE",
        help="the resume file: tracks already acknowledged are skipped (default <tracks>.ingest-state.json)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive(float),
        metavar="S",
        default=120.0,
        help="seconds to wait for one answer (default %(default)s)",
    )


def run(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    """The command: 0 once every track is acknowledged; 1, with one sentence logged, on a problem."""
    try:
        import httpx
    except ImportError:
        logger.error("reid-admin ingest needs httpx, which is not installed here: pip install httpx")
        return 1
    options = Options(
        camera=args.camera,
        fps=args.fps,
        start_time=args.start_time,
        best_k=args.best_k,
        min_box=args.min_box,
        tracks_per_request=args.tracks_per_request,
        state=args.state,
        progress=True,
    )
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    try:
        client = httpx.Client(base_url=args.url, headers=headers, timeout=timeout, transport=transport)
    except (httpx.InvalidURL, ValueError) as exc:
        logger.error("--url %s is not a URL such as %s: %s", args.url, DEFAULT_URL, exc)
        return 1
    try:
        with client, logging_redirect_tqdm():  # log lines above the progress bars, not through them
            summary = ingest(args.tracks, args.frames, options, client)
    except IngestError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted: run the same command again to send the tracks not yet acknowledged")
        return 130
    logger.info("%s", summary.line(args.camera))
    return 0
