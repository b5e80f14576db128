"""``/gallery``: enrol crops, list, read and delete entries."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    FORM_CAMERA,
    FORM_TEXT,
    FORM_TIME,
    EntryId,
    GalleryDep,
    ReadyDep,
    templates_and_crops,
    uploads,
    utc,
)
from app.api.inputs import (
    MAX_CAMERA_LENGTH,
    MAX_IDENTITY_LENGTH,
    MetadataLimits,
    check_camera,
    check_identity,
    check_new_identity,
    parse_metadata,
)
from app.db import Entry
from app.errors import ApiError, problem_responses
from app.gallery import Gallery, NewEntry
from app.images import Upload
from app.schemas import DeleteResult, EntryOut, EntryPage

IDEMPOTENCY_HEADER = "Idempotency-Key"  # the IETF draft's name, as Stripe's and PayPal's APIs take it
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias=IDEMPOTENCY_HEADER,
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="a unique key per request (e.g. a UUID): a retry with the same key and request gets the first "
        "answer back instead of enrolling twice (kept 24 h)",
    ),
]
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


def answerable(identity: str, camera: str | None, meta: dict[str, Any], captured_at: datetime | None) -> None:
    """The answer's fields that come from the request, built and written as JSON before anything is stored: what
    cannot be answered is refused now (422), never committed to fail every later read of it."""
    now = datetime.now(UTC)
    probe = EntryOut(
        id=1,
        identity=identity,
        camera=camera,
        metadata=meta,
        created_at=now,
        captured_at=captured_at or now,
        width=1,
        height=1,
    )
    try:
        json.dumps(probe.model_dump(mode="json"), allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise ApiError(422, "unstorable_entry", f"the entry could not be written back as JSON: {exc}") from exc


async def existing_entry(gallery: Gallery, entry_id: int) -> Entry:
    entry = await run_in_threadpool(gallery.get, entry_id)
    if entry is None:
        raise ApiError(404, "entry_not_found", f"no gallery entry with id {entry_id}")
    return entry


# OpenAPI links: what a client (and schemathesis' stateful fuzzing) can do next with an enrolled entry.
_ENTRY = {"entry_id": "$response.body#/0/id"}
ENROLLED_LINKS = {
    "GetEntry": {"operationId": "get_entry_gallery__entry_id__get", "parameters": _ENTRY},
    "GetEntryImage": {"operationId": "entry_image_gallery__entry_id__image_get", "parameters": _ENTRY},
    "GetEntryMask": {"operationId": "mask_of_entry_mask__entry_id__get", "parameters": _ENTRY},
    "DeleteEntry": {"operationId": "delete_entry_gallery__entry_id__delete", "parameters": _ENTRY},
    "ListIdentity": {
        "operationId": "list_entries_gallery_get",
        "parameters": {"identity": "$response.body#/0/identity"},
    },
    "DeleteIdentity": {
        "operationId": "delete_identity_identities__identity__delete",
        "parameters": {"identity": "$response.body#/0/identity"},
    },
}


@router.post(
    "",
    status_code=201,
    response_model=list[EntryOut],
    responses={201: {"description": "the entries enrolled", "links": ENROLLED_LINKS}} | problem_responses(400, 415),
)
async def enroll(
    state: ReadyDep,
    files: Annotated[list[UploadFile], File(min_length=1, description="one or more person crops")],
    identity: Annotated[
        str,
        Form(
            min_length=1,
            max_length=MAX_IDENTITY_LENGTH,
            description="identity label: printable text, not only whitespace",
            examples=["0001"],
        ),
    ],
    camera: Annotated[
        str | None,
        Form(max_length=MAX_CAMERA_LENGTH, description="camera id: printable text", examples=["c1"]),
        FORM_CAMERA,
    ] = None,
    metadata: Annotated[
        str | None,
        Form(
            description="free metadata, a JSON object (I-JSON: no NaN or Infinity, integers within +-(2**53 - 1), "
            "no lone surrogate, no repeated key), within REID_MAX_METADATA_BYTES, _DEPTH and _KEYS",
            examples=['{"site": "A"}'],
        ),
        FORM_TEXT,
    ] = None,
    captured_at: Annotated[
        datetime | None,
        Form(description="when the crops were taken (RFC 3339; no offset = UTC); default: now, the upload time"),
        FORM_TIME,
    ] = None,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Enroll crops of one identity: each becomes an entry (answered 201). With ``Idempotency-Key``, a retry of a
    request whose answer was lost (a timeout, a dropped connection) is answered as the first one was, with
    ``Idempotent-Replayed: true``, whether or not the first was still running when it timed out."""
    settings = state.settings
    check_new_identity(identity)
    camera = check_camera(camera) if camera else None
    limits = MetadataLimits(settings.max_metadata_bytes, settings.max_metadata_depth, settings.max_metadata_keys)
    meta = parse_metadata(metadata, limits)
    captured_at = utc(captured_at)
    answerable(identity, camera, meta, captured_at)
    loaded = await uploads(state, files)
    gallery = state.gallery
    assert gallery is not None
    fingerprint = request_fingerprint(identity, camera, metadata, captured_at, loaded)
    if idempotency_key is not None:  # a retry is answered without running the network again
        previous = await run_in_threadpool(gallery.idempotent_answer, idempotency_key, fingerprint)
        if previous is not None:
            return replayed(previous)
    vectors, crops = await templates_and_crops(state, loaded)
    enrolled = await run_in_threadpool(
        gallery.enroll_held,
        [NewEntry(identity, camera, meta, captured_at) for _ in loaded],
        crops,
        vectors,
        idempotency_key=idempotency_key,
        request_sha256=fingerprint,
        answer=lambda entries: json.dumps([entry_out(e).model_dump(mode="json") for e in entries]),
    )
    if enrolled.replayed is not None:  # the first request committed while this one ran
        return replayed(enrolled.replayed)
    state.metrics.size.set(len(gallery))
    return [entry_out(e) for e in enrolled.entries]


def request_fingerprint(
    identity: str, camera: str | None, metadata: str | None, captured_at: datetime | None, loaded: list[Upload]
) -> str:
    """sha256 of what makes an enrolment: a key sent again with another request is refused, not replayed."""
    digest = hashlib.sha256()
    for part in (identity, camera or "", metadata or "", captured_at.isoformat() if captured_at else ""):
        digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    for upload in loaded:
        digest.update(hashlib.sha256(upload.data).digest())
    return digest.hexdigest()


def replayed(body: str) -> Response:
    return Response(body, status_code=201, media_type="application/json", headers={"Idempotent-Replayed": "true"})


@router.get("", response_model=EntryPage)
async def list_entries(
    gallery: GalleryDep,
    identity: Annotated[
        str | None, Query(max_length=MAX_IDENTITY_LENGTH, description="only this identity", examples=["0001"])
    ] = None,
    offset: Annotated[int, Query(ge=0, le=2**31, description="first entry")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 50,
) -> EntryPage:
    if identity is not None:
        check_identity(identity)
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
    """The crop as stored at enrollment: a PNG of the decoded upload (RGB; its longer side at most
    REID_MAX_IMAGE_SIDE, downscaled when it was larger)."""
    entry = await existing_entry(gallery, entry_id)
    path = gallery.data_dir / entry.crop_path
    try:
        body = await run_in_threadpool(path.read_bytes)
    except FileNotFoundError:
        # A database restored without its crops folder (docs/API.md, Backup and restore).
        raise ApiError(404, "crop_not_found", f"the stored crop of entry {entry_id} is missing") from None
    return Response(body, media_type="image/png", headers={"X-Content-Type-Options": "nosniff"})
