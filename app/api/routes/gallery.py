"""``/gallery``: enrol crops, list, read and delete entries."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    FORM_CAMERA,
    FORM_TEXT,
    FORM_TIME,
    EntryId,
    GalleryDep,
    ReadyDep,
    templates_of,
    uploads,
    utc,
)
from app.db import Entry
from app.errors import ApiError, problem_responses
from app.gallery import Gallery
from app.schemas import DeleteResult, EntryOut, EntryPage

router = APIRouter(
    prefix="/gallery",
    tags=["gallery"],
    responses=problem_responses(401, 413, 422, 503, 504),
)


def entry_out(entry: Entry) -> EntryOut:
    return EntryOut(
        id=entry.id,
        identity=entry.identity,
        camera=entry.camera,
        metadata=entry.meta or {},
        created_at=entry.created_at,
        captured_at=entry.captured_at or entry.created_at,
        width=entry.width,
        height=entry.height,
    )


def parse_metadata(metadata: str | None) -> dict[str, Any]:
    if not metadata:
        return {}
    try:
        value = json.loads(metadata)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_metadata", f"metadata must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_metadata", 'metadata must be a JSON object, e.g. {"site": "A"}')
    return value


async def existing_entry(gallery: Gallery, entry_id: int) -> Entry:
    entry = await run_in_threadpool(gallery.get, entry_id)
    if entry is None:
        raise ApiError(404, "entry_not_found", f"no gallery entry with id {entry_id}")
    return entry


@router.post("", status_code=201, response_model=list[EntryOut], responses=problem_responses(400, 415))
async def enroll(
    state: ReadyDep,
    files: Annotated[list[UploadFile], File(min_length=1, description="one or more person crops")],
    identity: Annotated[str, Form(min_length=1, max_length=200, description="identity label", examples=["0001"])],
    camera: Annotated[str | None, Form(max_length=100, description="camera id", examples=["c1"]), FORM_CAMERA] = None,
    metadata: Annotated[
        str | None, Form(description="free metadata, a JSON object", examples=['{"site": "A"}']), FORM_TEXT
    ] = None,
    captured_at: Annotated[
        datetime | None,
        Form(description="when the crops were taken (RFC 3339; no offset = UTC); default: now, the upload time"),
        FORM_TIME,
    ] = None,
) -> list[EntryOut]:
    """Enroll crops of one identity: each becomes an entry (answered 201)."""
    meta = parse_metadata(metadata)
    loaded = await uploads(state, files)
    vectors = await templates_of(state, [u.image for u in loaded])
    gallery = state.gallery
    assert gallery is not None
    crops = []
    for upload in loaded:
        digest, relative = await run_in_threadpool(gallery.store_crop, upload.data, upload.image)
        crops.append((digest, relative, upload.image.width, upload.image.height))
    entries = await run_in_threadpool(gallery.add, identity, camera or None, meta, crops, vectors, utc(captured_at))
    state.metrics.size.set(len(gallery))
    return [entry_out(e) for e in entries]


@router.get("", response_model=EntryPage)
async def list_entries(
    gallery: GalleryDep,
    identity: Annotated[str | None, Query(description="only this identity", examples=["0001"])] = None,
    offset: Annotated[int, Query(ge=0, le=2**31, description="first entry")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 50,
) -> EntryPage:
    total, entries = await run_in_threadpool(gallery.list, identity, offset, limit)
    return EntryPage(total=total, offset=offset, limit=limit, items=[entry_out(e) for e in entries])


@router.get("/{entry_id}", response_model=EntryOut, responses=problem_responses(404))
async def get_entry(gallery: GalleryDep, entry_id: EntryId) -> EntryOut:
    return entry_out(await existing_entry(gallery, entry_id))


@router.delete("/{entry_id}", response_model=DeleteResult, responses=problem_responses(404))
async def delete_entry(state: ReadyDep, gallery: GalleryDep, entry_id: EntryId) -> DeleteResult:
    await existing_entry(gallery, entry_id)
    await run_in_threadpool(gallery.delete, [entry_id])
    state.metrics.size.set(len(gallery))
    return DeleteResult(deleted=1)


@router.get(
    "/{entry_id}/image",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "the stored crop, PNG"}} | problem_responses(404),
)
async def entry_image(gallery: GalleryDep, entry_id: EntryId) -> Response:
    """The crop as stored at enrollment: a PNG of the decoded upload (RGB, its original size)."""
    entry = await existing_entry(gallery, entry_id)
    path = gallery.data_dir / entry.crop_path
    try:
        body = await run_in_threadpool(path.read_bytes)
    except FileNotFoundError:
        # A database restored without its crops folder (docs/API.md, Backup and restore).
        raise ApiError(404, "crop_not_found", f"the stored crop of entry {entry_id} is missing") from None
    return Response(body, media_type="image/png", headers={"X-Content-Type-Options": "nosniff"})
