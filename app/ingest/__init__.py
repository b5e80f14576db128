"""``reid-admin ingest``: a tracker's output (MOTChallenge tracks + the frames they were cut from) sent to a
running service's ``POST /sightings``, a few good crops per track.

Per track the K best boxes (quality = box area x confidence, spread over the track) are kept; the frames are
decoded once, in order, and each selected box is cut as it goes by, so memory holds the crops of the tracks not
yet sent only. Tracks go in groups (at most 64 crops a request), in the order in which their last crop is
decoded, each group as soon as it is complete. A state file records the tracks the service acknowledged, so a run
that stops resumes where it was; each request carries an ``Idempotency-Key`` derived from the camera, its tracks
and the tracks file, so a retry after a lost answer is answered, not enrolled twice.

Only the HTTP client of the service: neither the database nor torch is needed here."""

from app.ingest.cli import DEFAULT_URL, add_arguments, run
from app.ingest.errors import IngestError
from app.ingest.pipeline import MAX_FILES, Options, Summary, ingest
from app.ingest.tracks import Box, Pick, parse_line, parse_tracks, select

__all__ = [
    "DEFAULT_URL",
    "MAX_FILES",
    "Box",
    "IngestError",
    "Options",
    "Pick",
    "Summary",
    "add_arguments",
    "ingest",
    "parse_line",
    "parse_tracks",
    "run",
    "select",
]
