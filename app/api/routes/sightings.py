"""``/sightings``: crops of people nobody enrolled, sent by a tracker in tracklets and grouped into people."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WithJsonSchema
from starlette.concurrency import run_in_threadpool

from app import sightings as grouping
from app.api.deps import ReadyDep, templates_and_crops, uploads, utc
from app.api.inputs import MAX_CAMERA_LENGTH, MAX_IDENTITY_LENGTH, check_camera, check_track
from app.api.routes.gallery import IdempotencyKey, replayed
from app.errors import ApiError, problem_responses
from app.schemas import SightingsResult, TrackletOut

router = APIRouter(prefix="/sightings", tags=["sightings"], responses=problem_responses(401, 413, 422, 503, 504))


class SightingIn(BaseModel):
    """What a tracker knows of one crop."""

    model_config = ConfigDict(extra="forbid")

    camera: str = Field(min_length=1, max_length=MAX_CAMERA_LENGTH, description="the camera that saw it")
    track: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_IDENTITY_LENGTH,
        description="the tracker's track id on that camera: crops of one track are one person",
    )
    captured_at: datetime | None = Field(None, description="capture time, RFC 3339 (no offset: UTC); default: now")
    confidence: float | None = Field(None, ge=0, le=1, description="the detector's confidence")
    box: tuple[float, float, float, float] | None = Field(
        None, description="x, y, w, h of the box in the frame, pixels (w and h > 0)"
    )


SIGHTINGS = TypeAdapter(list[SightingIn])
# A form field is text: the JSON array inside it is parse_sightings' to check (a 422 with a sentence).
SIGHTINGS_SCHEMA = WithJsonSchema({"type": "string", "minLength": 1})
SIGHTINGS_HELP = (
    "a JSON array with one object per file, in the files' order: "
    '{"camera": "c1", "track": "17", "captured_at": "2026-01-01T12:00:03Z", "confidence": 0.9, "box": [x, y, w, h]}; '
    "camera is required; crops with the same camera and track form one tracklet, matched as one"
)


def parse_sightings(text: str, files: int) -> list[grouping.Sighting]:
    try:
        items = SIGHTINGS.validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ApiError(422, "invalid_sightings", f"sightings[{where}]: {first['msg']}; {SIGHTINGS_HELP}") from None
    if len(items) != files:
        raise ApiError(
            422, "invalid_sightings", f"{len(items)} sightings for {files} files: send one object per file, in order"
        )
    now = datetime.now(UTC)
    out = []
    for item in items:
        if item.box is not None and not (item.box[2] > 0 and item.box[3] > 0):
            raise ApiError(422, "invalid_sightings", f"box {list(item.box)}: its width and height must be > 0")
        out.append(
            grouping.Sighting(
                camera=check_camera(item.camera),
                captured_at=utc(item.captured_at) or now,
                track=check_track(item.track) if item.track is not None else None,
                confidence=item.confidence,
                box=item.box,
            )
        )
    return out


def result(
    tracklets: list[grouping.Tracklet],
    decisions: list[grouping.Decision],
    threshold: float | None,
    source: str | None,
    provisional: float | None,
) -> SightingsResult:
    return SightingsResult(
        tracklets=[
            TrackletOut(
                camera=t.camera,
                track=t.track,
                identity=d.identity or "",
                person=d.person_id,
                joined=d.joined,
                distance=d.distance,
                entries=d.entries,
            )
            for t, d in zip(tracklets, decisions, strict=True)
        ],
        threshold=threshold,
        threshold_source=source,
        provisional_threshold=provisional,
    )


@router.post("", status_code=201, response_model=SightingsResult, responses=problem_responses(400, 409, 415))
async def enroll_sightings(
    state: ReadyDep,
    files: Annotated[list[UploadFile], File(min_length=1, description="person crops, of one or more tracklets")],
    sightings: Annotated[str, Form(min_length=1, description=SIGHTINGS_HELP), SIGHTINGS_SCHEMA],
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Enrol crops without a name. Each tracklet continues its track, joins the nearest identity or person
    under the join threshold, or starts a provisional person (review them under ``/people``)."""
    settings = state.settings
    parsed = parse_sightings(sightings, len(files))
    loaded = await uploads(state, files)
    gallery = state.gallery
    assert gallery is not None
    digest = hashlib.sha256(sightings.encode("utf-8", "surrogatepass") + b"\0")
    for upload in loaded:
        digest.update(hashlib.sha256(upload.data).digest())
    fingerprint = digest.hexdigest()
    if idempotency_key is not None:
        previous = await run_in_threadpool(gallery.idempotent_answer, idempotency_key, fingerprint)
        if previous is not None:
            return replayed(previous)
    assert state.embedder is not None
    embedder = state.embedder
    threshold, source = grouping.join_threshold(settings, embedder.provenance, embedder.trained)
    provisional = grouping.provisional_threshold(settings, embedder.provenance, embedder.trained, threshold)
    vectors, crops = await templates_and_crops(state, loaded)
    tracklets, decisions, previous = await run_in_threadpool(
        grouping.enroll,
        gallery,
        parsed,
        crops,
        vectors,
        threshold,
        settings.tracklet_aggregation,
        timedelta(seconds=settings.track_gap_s),
        provisional=provisional,
        correct_averaging=settings.tracklet_spread_correction,
        transit=state.transit,
        idempotency_key=idempotency_key,
        request_sha256=fingerprint,
        answer=lambda t, d: json.dumps(result(t, d, threshold, source, provisional).model_dump(mode="json")),
    )
    if previous is not None:
        return replayed(previous)
    state.metrics.size.set(len(gallery))
    answer = result(tracklets, decisions, threshold, source, provisional)
    if state.events is not None:  # after the commit; a replayed answer told its events the first time
        await run_in_threadpool(
            state.events.emit, answer.model_dump(mode="json")["tracklets"], [(t.start, t.end) for t in tracklets]
        )
    return answer
