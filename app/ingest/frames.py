"""Where the boxes' pixels come from (an image folder or a video, through PyAV), the crops cut from them, and the
time each frame was taken."""

from __future__ import annotations

import argparse
import configparser
import io
import math
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from PIL import Image

if TYPE_CHECKING:
    # Imported where used: httpx is in the dev extra only, and `reid-admin migrate` in the service's image (which
    # builds this parser too) must not need it.
    pass


from app.ingest.errors import IngestError
from app.ingest.tracks import Pick

DEFAULT_FOLDER_FPS = 25.0  # MOT17/MOT20's usual rate, when neither --fps nor seqinfo.ini tells
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
JPEG_QUALITY = 95


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
