"""The routes' dependencies as ``Annotated`` aliases: the service state, the ready gallery and embedder (the
503 "not ready" check, written once here), the API key as an ``APIKeyHeader`` (so that OpenAPI shows the
security scheme), and the uploads of a request read within their limits."""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated

import numpy as np
from fastapi import Depends, Path, Request, Security, UploadFile
from fastapi.security import APIKeyHeader
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import StringConstraints, WithJsonSchema
from starlette.concurrency import run_in_threadpool

from app.api.inputs import MAX_CAMERA_LENGTH
from app.config import Settings
from app.embedder import Embedder, QueueFull
from app.errors import ApiError
from app.events import Events
from app.gallery import Gallery, StoredCrop
from app.images import Upload, read_images
from app.transit import TransitTable

API_KEY_HEADER = "X-API-Key"
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="REID_API_KEY, when it is set")


class Metrics:
    """The Prometheus series, in a registry of this app's own (two apps in one process do not mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("reid_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("reid_request_seconds", "request latency", ["route"], registry=self.registry)
        self.inference = Histogram(
            "reid_inference_seconds",
            "a request's crops from entering the batcher to their templates (queue wait and forward pass)",
            registry=self.registry,
        )
        self.size = Gauge("reid_gallery_size", "entries in the gallery", registry=self.registry)
        self.overloaded = Counter("reid_overloaded", "requests refused: batch queue full", registry=self.registry)
        self.resyncs = Gauge(
            "reid_gallery_resyncs",
            "index rebuilds since start because the database changed under it (restored, failed over)",
            registry=self.registry,
        )


@dataclass
class State:
    """What the lifespan loads, held by ``app.state.reid``."""

    settings: Settings
    embedder: Embedder | None = None
    gallery: Gallery | None = None
    events: Events | None = None  # person.seen events (app/events), once started
    transit: TransitTable | None = None  # REID_TRANSIT_TABLE, read at start-up
    ready: bool = False
    fatal: str | None = None  # why this process can no longer serve (a failed database): liveness fails
    metrics: Metrics = field(default_factory=Metrics)


def key_matches(given: str | None, key: str) -> bool:
    """Constant-time comparison: how long it takes says nothing about how much of the key was right."""
    return hmac.compare_digest((given or "").encode(), key.encode())


# The dependencies are `async def` though they never await: FastAPI runs a plain `def` dependency in the thread
# pool, a hop per dependency per request for a few attribute reads.
async def get_state(request: Request) -> State:
    return request.app.state.reid


StateDep = Annotated[State, Depends(get_state)]


async def require_api_key(state: StateDep, given: Annotated[str | None, Security(api_key_header)]) -> None:
    """The key check of every route but /health (the middleware also guards the docs and unknown paths)."""
    key = state.settings.api_key
    if key is not None and not key_matches(given, key):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")


async def ready_state(state: StateDep) -> State:
    if not state.ready or state.embedder is None or state.gallery is None:
        raise ApiError(
            503, "not_ready", "the service is starting: model or index not ready yet", headers={"Retry-After": "2"}
        )
    return state


ReadyDep = Annotated[State, Depends(ready_state)]


async def ready_gallery(state: ReadyDep) -> Gallery:
    assert state.gallery is not None
    return state.gallery


async def ready_embedder(state: ReadyDep) -> Embedder:
    assert state.embedder is not None
    return state.embedder


GalleryDep = Annotated[Gallery, Depends(ready_gallery)]
EmbedderDep = Annotated[Embedder, Depends(ready_embedder)]


async def templates_and_crops(state: State, loaded: list[Upload]) -> tuple[np.ndarray, list[StoredCrop]]:
    """The crops' templates, and the crops stored durably and held for the enrolment (``Gallery.hold_crops``),
    side by side: the crop files' fsyncs run while the network does. Held crops are let go if the network
    refuses the request."""
    gallery = state.gallery
    assert gallery is not None
    held = asyncio.ensure_future(run_in_threadpool(gallery.hold_crops, [(u.data, u.image) for u in loaded]))
    try:
        vectors = await templates_of(state, [u.image for u in loaded])
    except BaseException:
        gallery.release_crops(await held)
        raise
    return vectors, await held


async def templates_of(state: State, images: list) -> np.ndarray:
    """(n, feat_dim) templates through the micro-batcher; a full queue is a 503 with Retry-After."""
    assert state.embedder is not None
    start = time.perf_counter()
    try:
        vectors = await state.embedder.embed(images)
    except QueueFull as exc:
        raise _overloaded(state, exc) from exc
    state.metrics.inference.observe(time.perf_counter() - start)
    return vectors


async def masks_of(state: State, images: list) -> list[np.ndarray]:
    """The images' masks through the mask generator's micro-batcher (409 when the weights hold none)."""
    assert state.embedder is not None
    if not state.embedder.has_mask_generator:
        raise no_mask()
    try:
        return await state.embedder.generate_masks(images)
    except QueueFull as exc:
        raise _overloaded(state, exc) from exc


def _overloaded(state: State, exc: QueueFull) -> ApiError:
    state.metrics.overloaded.inc()
    return ApiError(
        503, "overloaded", f"the service is busy: {exc}; retry shortly", headers={"Retry-After": str(RETRY_AFTER_S)}
    )


def no_mask() -> ApiError:
    return ApiError(409, "no_mask_generator", "the loaded weights have no mask generator; load weights that do")


RETRY_AFTER_S = 1


async def uploads(state: State, files: list[UploadFile]) -> list[Upload]:
    s = state.settings
    return await read_images(
        files, s.max_files_per_request, s.max_upload_bytes, s.max_image_pixels, s.max_request_pixels, s.max_image_side
    )


# Ids are SQL BIGINT and FAISS int64 keys: a larger number is refused (422), not sent to the database.
EntryId = Annotated[int, Path(ge=1, le=2**63 - 1, description="entry id")]
# A multipart form has no null: an optional field is absent. Without these FastAPI would document
# `anyOf [..., null]`, and a client sending the text "null" as that allows would get a 422.
FORM_TEXT = WithJsonSchema({"type": "string"})
FORM_CAMERA = WithJsonSchema({"type": "string", "maxLength": MAX_CAMERA_LENGTH})
FORM_CAMERAS = WithJsonSchema(
    {"type": "array", "items": {"type": "string", "maxLength": MAX_CAMERA_LENGTH}, "maxItems": 100}
)
FORM_THRESHOLD = WithJsonSchema({"type": "number", "minimum": 0})
# An empty form field is an absent one (HTML forms send every field): "" is allowed beside a date-time.
FORM_TIME = WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "string", "maxLength": 0}]})
# Its length here (a validation_error); what it may hold is app.api.inputs.check_camera's (invalid_camera).
Camera = Annotated[str, StringConstraints(max_length=MAX_CAMERA_LENGTH)]


def utc(value: datetime | None) -> datetime | None:
    """A form's date-time in UTC; one without an offset is read as UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
