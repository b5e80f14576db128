"""``/query``: rank the gallery for uploaded crops, one file at a time or as one tracklet, with camera and time
filters applied inside the search."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    FORM_CAMERA,
    FORM_CAMERAS,
    FORM_THRESHOLD,
    FORM_TIME,
    Camera,
    ReadyDep,
    masks_of,
    no_mask,
    templates_of,
    uploads,
    utc,
)
from app.api.inputs import MAX_CAMERA_LENGTH, check_camera
from app.errors import ApiError, problem_responses
from app.gallery import EntryFilter
from app.rendering import render_mask
from app.schemas import QueryResponse, QueryResult
from app.search import INVERSE_DISTANCE, ONE_MINUS_FMR, ScoreCurve, Track, identities, search, weights_threshold

router = APIRouter(
    prefix="/query",
    tags=["query"],
    responses=problem_responses(401, 413, 422, 503, 504),
)


def entry_filter(
    camera: str | None,
    exclude_camera: bool,
    cameras: list[str] | None,
    exclude_cameras: list[str] | None,
    after: datetime | None,
    before: datetime | None,
) -> EntryFilter | None:
    """The form's filters as one EntryFilter (None: no filter). ``camera`` + ``exclude_camera`` is the older
    single-camera form of ``exclude_cameras`` / ``cameras``."""
    keep = [check_camera(c) for c in cameras or [] if c]
    drop = [check_camera(c) for c in exclude_cameras or [] if c]
    if camera:
        (drop if exclude_camera else keep).append(check_camera(camera))
    after, before = utc(after), utc(before)
    if after is not None and before is not None and after >= before:
        raise ApiError(422, "invalid_time_window", f"after ({after.isoformat()}) must be before ({before.isoformat()})")
    if not (keep or drop or after or before):
        return None
    # Without any camera to keep there is no "keep only" filter (an empty keep list would drop everything).
    return EntryFilter(tuple(sorted(set(keep))) or None, tuple(sorted(set(drop))), after, before)


@router.post("", response_model=QueryResponse, responses=problem_responses(400, 409, 415))
async def query(
    state: ReadyDep,
    file: Annotated[list[UploadFile], File(min_length=1, description="one or more query crops, answered in order")],
    top_k: Annotated[int, Form(ge=1, le=1000, description="matches per query", examples=[10])] = 10,
    camera: Annotated[
        str | None, Form(max_length=MAX_CAMERA_LENGTH, description="camera filter", examples=["c1"]), FORM_CAMERA
    ] = None,
    exclude_camera: Annotated[
        bool, Form(description="true: drop entries of `camera` (as in evaluation); false: keep only them")
    ] = True,
    cameras: Annotated[
        list[Camera] | None,
        Form(max_length=100, description="keep only entries of these cameras (repeat the field)"),
        FORM_CAMERAS,
    ] = None,
    exclude_cameras: Annotated[
        list[Camera] | None,
        Form(max_length=100, description="drop entries of these cameras (repeat the field)"),
        FORM_CAMERAS,
    ] = None,
    after: Annotated[
        datetime | None, Form(description="only entries captured at or after this time (RFC 3339)"), FORM_TIME
    ] = None,
    before: Annotated[
        datetime | None, Form(description="only entries captured before this time (RFC 3339)"), FORM_TIME
    ] = None,
    track: Annotated[
        Track,
        Form(
            description="none: each file ranked alone; mean: the files are one tracklet, ranked by their mean "
            "template; min: one tracklet, each entry ranked by its best distance to any of the files"
        ),
    ] = "none",
    threshold: Annotated[
        float | None,
        Form(
            ge=0, description="L2 distance over which no match (default: the weights' calibrated one)", examples=[5.0]
        ),
        FORM_THRESHOLD,
    ] = None,
    include_mask: Annotated[bool, Form(description="also return each query's attention mask")] = False,
) -> QueryResponse:
    """Rank the gallery for each uploaded crop (or for all of them as one tracklet): entries and identities,
    nearest first."""
    embedder, gallery = state.embedder, state.gallery
    assert embedder is not None and gallery is not None
    where = entry_filter(camera, exclude_camera, cameras, exclude_cameras, after, before)
    if include_mask and not embedder.has_mask_generator:
        raise no_mask()
    if include_mask and track != "none":
        raise ApiError(422, "invalid_combination", "include_mask answers per file: use it with track=none")
    source: str | None = "request" if threshold is not None else None
    if threshold is None and embedder.trained:
        calibrated = weights_threshold(embedder.provenance, state.settings.threshold_fmr)
        if calibrated is not None:
            threshold, source = calibrated
    loaded = await uploads(state, file)
    images = [u.image for u in loaded]
    vectors = await templates_of(state, images)
    curve = ScoreCurve.from_provenance(embedder.provenance) if embedder.trained else None
    ranked = await run_in_threadpool(search, gallery, vectors, top_k, where, track, curve)
    masks: list[str | None] = [None] * len(ranked)
    if include_mask:
        pictures = await masks_of(state, images)  # one batched pass for all the files
        pngs = await run_in_threadpool(
            lambda: [
                render_mask(i, m, "mask", embedder.config.mask_ratio) for i, m in zip(images, pictures, strict=True)
            ]
        )
        masks = [base64.b64encode(p).decode() for p in pngs]
    names = [u.filename for u in loaded] if track == "none" else [None]
    return QueryResponse(
        results=[
            QueryResult(
                filename=name,
                files=1 if track == "none" else len(loaded),
                matches=matches,
                identities=identities(matches, threshold),
                threshold=threshold,
                threshold_source=source,
                similarity_meaning=ONE_MINUS_FMR if curve is not None else INVERSE_DISTANCE,
                mask_png_base64=mask,
            )
            for name, matches, mask in zip(names, ranked, masks, strict=True)
        ]
    )
