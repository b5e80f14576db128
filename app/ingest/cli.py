"""``reid-admin ingest``'s options and the command itself."""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.contrib.logging import logging_redirect_tqdm

if TYPE_CHECKING:
    # Imported where used: httpx is in the dev extra only, and `reid-admin migrate` in the service's image (which
    # builds this parser too) must not need it.
    import httpx


from app.ingest.errors import IngestError
from app.ingest.frames import DEFAULT_FOLDER_FPS, parse_start_time
from app.ingest.pipeline import MAX_FILES, Options, ingest

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"


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
