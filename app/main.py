"""The FastAPI application: ``create_app(settings)`` builds it; ``app.main:app`` is the ASGI app and
``reid-serve`` runs it with uvicorn on REID_HOST:REID_PORT."""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import WithJsonSchema
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.db import Entry, make_engine
from app.embedder import Embedder
from app.errors import ApiError, install_error_handlers, problem, problem_responses
from app.gallery import Gallery, exit_on_failure
from app.images import decode_image, read_upload
from app.schemas import (
    DeleteResult,
    EmbedResponse,
    EmbedResult,
    EntryOut,
    EntryPage,
    Health,
    IdentityMatch,
    IdentityOut,
    Match,
    QueryResponse,
    QueryResult,
    Ready,
)
from models import extractor_fingerprint

logger = logging.getLogger(__name__)

View = Annotated[
    Literal["mask", "overlay", "hidden"],
    Query(description="mask: the mask as grey; overlay: heat map over the crop; hidden: top 30% hidden"),
]
# Ids are SQL BIGINT and FAISS int64 keys: a larger number is refused (422), not sent to the database.
EntryId = Annotated[int, Path(ge=1, le=2**63 - 1, description="entry id")]
# A multipart form has no null: an optional field is absent. Without these FastAPI would document
# `anyOf [..., null]`, and a client sending the text "null" as that allows would get a 422.
FORM_TEXT = WithJsonSchema({"type": "string"})
FORM_CAMERA = WithJsonSchema({"type": "string", "maxLength": 100})
FORM_THRESHOLD = WithJsonSchema({"type": "number", "minimum": 0})
# Metric labels: a label set lives for ever, so invented methods are one "other", unknown paths "unmatched".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
NO_WEIGHTS_WARNING = "no trained weights loaded (REID_WEIGHTS unset): matches are meaningless"


def similarity(distance: float) -> float:
    """1 / (1 + d) for the Euclidean distance d: 1 for identical templates, towards 0 far away."""
    return 1.0 / (1.0 + distance)


class State:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.embedder: Embedder | None = None
        self.gallery: Gallery | None = None
        self.ready = False
        self.registry = CollectorRegistry()
        self.requests = Counter("reid_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("reid_request_seconds", "request latency", ["route"], registry=self.registry)
        self.inference = Histogram("reid_inference_seconds", "forward pass time", registry=self.registry)
        self.size = Gauge("reid_gallery_size", "entries in the gallery", registry=self.registry)


def _state(request: Request) -> State:
    return request.app.state.reid


def _ready_state(request: Request) -> State:
    state = _state(request)
    if not state.ready or state.embedder is None or state.gallery is None:
        raise ApiError(503, "not_ready", "the service is starting: model or index not ready yet")
    return state


def _entry_out(entry: Entry) -> EntryOut:
    return EntryOut(
        id=entry.id,
        identity=entry.identity,
        camera=entry.camera,
        metadata=entry.meta or {},
        created_at=entry.created_at,
        width=entry.width,
        height=entry.height,
    )


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _heat(mask: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8, a blue-to-red "jet"-like colour map."""
    r = np.clip(1.5 - np.abs(4 * mask - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * mask - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * mask - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def render_mask(image: Image.Image, mask: np.ndarray, view: str, ratio: float) -> bytes:
    if view == "mask":
        return _png((mask * 255).round().astype(np.uint8))
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if view == "overlay":
        return _png((0.5 * rgb + 0.5 * _heat(mask)).astype(np.uint8))
    # hidden: the paper's view, the `ratio` share of pixels where the mask is highest set to black.
    cutoff = np.quantile(mask, 1.0 - ratio) if ratio > 0 else np.inf
    hidden = rgb.copy()
    hidden[mask >= cutoff] = 0
    return _png(hidden.astype(np.uint8))


async def _images(state: State, files: list[UploadFile]) -> list[tuple[bytes, Image.Image, str | None]]:
    settings = state.settings
    if len(files) > settings.max_files_per_request:
        raise ApiError(413, "too_many_files", f"{len(files)} files: at most {settings.max_files_per_request} a request")
    out = []
    for upload in files:
        data = await read_upload(upload, settings.max_upload_bytes)
        name = upload.filename or "upload"
        image = await run_in_threadpool(decode_image, data, settings.max_image_pixels, name)
        out.append((data, image, upload.filename))
    return out


async def _embed(state: State, images: list[Image.Image]) -> np.ndarray:
    assert state.embedder is not None
    start = time.perf_counter()
    vectors = await state.embedder.embed(images)
    state.inference.observe(time.perf_counter() - start)
    return vectors


def _search(state: State, vectors: np.ndarray, top_k: int, camera: str | None, exclude: bool) -> list[list[Match]]:
    """Nearest entries per query; with a camera filter, search wider until top_k survive it."""
    gallery = state.gallery
    assert gallery is not None
    results: list[list[Match]] = []
    total = len(gallery)
    for vector in vectors:
        k = top_k if camera is None else min(total, top_k * 4)
        while True:
            distances, ids = gallery.search(vector[None], k)
            found = [(int(i), float(d)) for i, d in zip(ids[0], distances[0], strict=True) if i >= 0]
            entries = gallery.get_many([i for i, _ in found])
            matches = []
            for entry_id, squared in found:
                entry = entries.get(entry_id)
                if entry is None:
                    continue  # deleted meanwhile
                if camera is not None and ((entry.camera == camera) == exclude):
                    continue
                distance = float(np.sqrt(max(squared, 0.0)))
                matches.append(
                    Match(
                        id=entry_id,
                        identity=entry.identity,
                        camera=entry.camera,
                        distance=distance,
                        similarity=similarity(distance),
                    )
                )
            if len(matches) >= top_k or k >= total:
                break
            k = min(total, k * 4)
        results.append(matches[:top_k])
    return results


def _identities(matches: list[Match], threshold: float | None) -> list[IdentityMatch]:
    best: dict[str, IdentityMatch] = {}
    for m in matches:
        if m.identity not in best:
            best[m.identity] = IdentityMatch(
                identity=m.identity,
                distance=m.distance,
                similarity=m.similarity,
                hits=0,
                match=threshold is None or m.distance <= threshold,
            )
        best[m.identity].hits += 1
    return sorted(best.values(), key=lambda i: i.distance)


def _parse_metadata(metadata: str | None) -> dict[str, Any]:
    if not metadata:
        return {}
    try:
        value = json.loads(metadata)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_metadata", f"metadata must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_metadata", 'metadata must be a JSON object, e.g. {"site": "A"}')
    return value


UPLOAD_ERRORS = problem_responses(400, 415)


def build_router() -> APIRouter:
    router = APIRouter(responses=problem_responses(401, 413, 422, 503, 504))

    @router.post("/gallery", status_code=201, response_model=list[EntryOut], responses=UPLOAD_ERRORS, tags=["gallery"])
    async def enroll(
        request: Request,
        files: Annotated[list[UploadFile], File(min_length=1, description="one or more person crops")],
        identity: Annotated[str, Form(min_length=1, max_length=200, description="identity label", examples=["0001"])],
        camera: Annotated[
            str | None, Form(max_length=100, description="camera id", examples=["c1"]), FORM_CAMERA
        ] = None,
        metadata: Annotated[
            str | None, Form(description="free metadata, a JSON object", examples=['{"site": "A"}']), FORM_TEXT
        ] = None,
    ) -> list[EntryOut]:
        """Enroll crops of one identity: each becomes an entry (answered 201)."""
        state = _ready_state(request)
        meta = _parse_metadata(metadata)
        loaded = await _images(state, files)
        vectors = await _embed(state, [image for _, image, _ in loaded])
        gallery = state.gallery
        assert gallery is not None
        crops = []
        for data, image, _ in loaded:
            digest, relative = await run_in_threadpool(gallery.store_crop, data, image)
            crops.append((digest, relative, image.width, image.height))
        entries = await run_in_threadpool(gallery.add, identity, camera or None, meta, crops, vectors)
        state.size.set(len(gallery))
        return [_entry_out(e) for e in entries]

    @router.get("/gallery", response_model=EntryPage, tags=["gallery"])
    async def list_entries(
        request: Request,
        identity: Annotated[str | None, Query(description="only this identity", examples=["0001"])] = None,
        offset: Annotated[int, Query(ge=0, le=2**31, description="first entry")] = 0,
        limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 50,
    ) -> EntryPage:
        state = _ready_state(request)
        assert state.gallery is not None
        total, entries = await run_in_threadpool(state.gallery.list, identity, offset, limit)
        return EntryPage(total=total, offset=offset, limit=limit, items=[_entry_out(e) for e in entries])

    async def _entry(state: State, entry_id: int) -> Entry:
        assert state.gallery is not None
        entry = await run_in_threadpool(state.gallery.get, entry_id)
        if entry is None:
            raise ApiError(404, "entry_not_found", f"no gallery entry with id {entry_id}")
        return entry

    @router.get("/gallery/{entry_id}", response_model=EntryOut, responses=problem_responses(404), tags=["gallery"])
    async def get_entry(request: Request, entry_id: EntryId) -> EntryOut:
        return _entry_out(await _entry(_ready_state(request), entry_id))

    @router.delete(
        "/gallery/{entry_id}", response_model=DeleteResult, responses=problem_responses(404), tags=["gallery"]
    )
    async def delete_entry(request: Request, entry_id: EntryId) -> DeleteResult:
        state = _ready_state(request)
        await _entry(state, entry_id)
        assert state.gallery is not None
        await run_in_threadpool(state.gallery.delete, [entry_id])
        state.size.set(len(state.gallery))
        return DeleteResult(deleted=1)

    @router.get("/identities", response_model=list[IdentityOut], tags=["identities"])
    async def list_identities(request: Request) -> list[IdentityOut]:
        state = _ready_state(request)
        assert state.gallery is not None
        rows = await run_in_threadpool(state.gallery.identities)
        return [IdentityOut(identity=i, entries=n) for i, n in rows]

    @router.delete(
        "/identities/{identity}", response_model=DeleteResult, responses=problem_responses(404), tags=["identities"]
    )
    async def delete_identity(request: Request, identity: str) -> DeleteResult:
        state = _ready_state(request)
        assert state.gallery is not None
        ids = await run_in_threadpool(state.gallery.ids_of_identity, identity)
        if not ids:
            raise ApiError(404, "identity_not_found", f"no entries with identity {identity!r}")
        await run_in_threadpool(state.gallery.delete, ids)
        state.size.set(len(state.gallery))
        return DeleteResult(deleted=len(ids))

    @router.post("/query", response_model=QueryResponse, responses=problem_responses(400, 409, 415), tags=["query"])
    async def query(
        request: Request,
        file: Annotated[list[UploadFile], File(min_length=1, description="one or more query crops, answered in order")],
        top_k: Annotated[int, Form(ge=1, le=1000, description="matches per query", examples=[10])] = 10,
        camera: Annotated[
            str | None, Form(max_length=100, description="camera filter", examples=["c1"]), FORM_CAMERA
        ] = None,
        exclude_camera: Annotated[
            bool, Form(description="true: drop entries of `camera` (as in evaluation); false: keep only them")
        ] = True,
        threshold: Annotated[
            float | None, Form(ge=0, description="L2 distance over which no match", examples=[5.0]), FORM_THRESHOLD
        ] = None,
        include_mask: Annotated[bool, Form(description="also return the query's attention mask")] = False,
    ) -> QueryResponse:
        """Rank the gallery for each uploaded crop: entries and identities, nearest first."""
        state = _ready_state(request)
        assert state.embedder is not None
        if include_mask and state.embedder.mask_generator is None:
            raise _no_mask()
        loaded = await _images(state, file)
        vectors = await _embed(state, [image for _, image, _ in loaded])
        ranked = await run_in_threadpool(_search, state, vectors, top_k, camera or None, exclude_camera)
        results = []
        for (_, image, name), matches in zip(loaded, ranked, strict=True):
            mask_b64 = None
            if include_mask:
                mask = await run_in_threadpool(state.embedder.mask_sync, image)
                mask_b64 = base64.b64encode(render_mask(image, mask, "mask", 0.0)).decode()
            results.append(
                QueryResult(
                    filename=name,
                    matches=matches,
                    identities=_identities(matches, threshold),
                    threshold=threshold,
                    mask_png_base64=mask_b64,
                )
            )
        return QueryResponse(results=results)

    @router.post("/embed", response_model=EmbedResponse, responses=UPLOAD_ERRORS, tags=["embed"])
    async def embed(
        request: Request, files: Annotated[list[UploadFile], File(min_length=1, description="crops to embed")]
    ) -> EmbedResponse:
        """The templates of uploaded crops, for integrators who keep their own store."""
        state = _ready_state(request)
        loaded = await _images(state, files)
        vectors = await _embed(state, [image for _, image, _ in loaded])
        assert state.embedder is not None
        return EmbedResponse(
            dim=state.embedder.feat_dim,
            results=[
                EmbedResult(filename=name, embedding=v.tolist())
                for (_, _, name), v in zip(loaded, vectors, strict=True)
            ],
        )

    def _no_mask() -> ApiError:
        return ApiError(409, "no_mask_generator", "the loaded weights have no mask generator; load weights that do")

    png = {200: {"content": {"image/png": {}}, "description": "PNG at the crop's size"}}

    @router.get("/mask/{entry_id}", response_class=Response, responses=png | problem_responses(404, 409), tags=["mask"])
    async def mask_of_entry(request: Request, entry_id: EntryId, view: View = "mask") -> Response:
        state = _ready_state(request)
        entry = await _entry(state, entry_id)
        assert state.embedder is not None and state.gallery is not None
        if state.embedder.mask_generator is None:
            raise _no_mask()
        path = state.gallery.data_dir / entry.crop_path
        image = await run_in_threadpool(lambda: Image.open(path).convert("RGB"))
        mask = await run_in_threadpool(state.embedder.mask_sync, image)
        body = await run_in_threadpool(render_mask, image, mask, view, state.embedder.config.mask_ratio)
        return Response(body, media_type="image/png")

    @router.post("/mask", response_class=Response, responses=png | problem_responses(400, 409, 415), tags=["mask"])
    async def mask_of_upload(
        request: Request, file: Annotated[UploadFile, File(description="a crop")], view: View = "mask"
    ) -> Response:
        state = _ready_state(request)
        assert state.embedder is not None
        if state.embedder.mask_generator is None:
            raise _no_mask()
        [(_, image, _)] = await _images(state, [file])
        mask = await run_in_threadpool(state.embedder.mask_sync, image)
        body = await run_in_threadpool(render_mask, image, mask, view, state.embedder.config.mask_ratio)
        return Response(body, media_type="image/png")

    return router


def build_ops_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/health", response_model=Health, responses=problem_responses(413, 504))
    async def health(request: Request) -> Health:
        state = _state(request)
        e, s = state.embedder, state.settings
        return Health(
            status="ok",
            ready=state.ready,
            trained_weights=bool(e and e.trained),
            warning=None if e is not None and e.trained else NO_WEIGHTS_WARNING,
            weights=str(s.weights) if s.weights else None,
            backbone=e.config.backbone if e else s.backbone,
            feat_dim=e.feat_dim if e else 0,
            mask_generator=bool(e and e.mask_generator is not None),
            provenance=e.provenance if e else {},
            device=str(e.device) if e else s.device,
            gallery_size=len(state.gallery) if state.gallery else 0,
        )

    @router.get("/ready", response_model=Ready, responses=problem_responses(401, 413, 503, 504))
    async def ready(request: Request) -> Any:
        state = _state(request)
        ok = state.ready and state.gallery is not None and await run_in_threadpool(state.gallery.consistent)
        if not ok:
            return problem(503, "not_ready", "model not warmed up or index not matching the database yet")
        return Ready(ready=True)

    @router.get("/metrics", response_class=Response, responses=problem_responses(401, 413, 504))
    async def metrics(request: Request) -> Response:
        state = _state(request)
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    return router


class BodyLimit:
    """Counts the request body as it streams in and refuses it (413) once past ``limit`` bytes: a body sent
    without Content-Length (chunked) would otherwise be spooled to disk whole before any upload check."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                # An HTTPException is what FastAPI lets out of its body parsing, to the 413 problem handler.
                raise StarletteHTTPException(413, f"the request body is over the {self.limit}-byte limit")
            return message

        await self.app(scope, counted, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    logging.getLogger("app").setLevel(settings.log_level.upper())
    state = State(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        embedder = await run_in_threadpool(Embedder.from_settings, settings)
        await run_in_threadpool(embedder.warm_up)
        state.embedder = embedder
        engine = make_engine(settings.sqlalchemy_url, settings.db_connect_timeout_s)
        use_gpu = embedder.device.type == "cuda"
        fingerprint = extractor_fingerprint(embedder.config, embedder.extractor.state_dict())
        gallery = Gallery.from_settings(settings, engine, embedder.feat_dim, fingerprint, use_gpu)
        embedder.start()

        async def open_gallery() -> None:
            # A database that is down at start-up is retried: /ready and the API answer 503 meanwhile.
            while True:
                try:
                    await run_in_threadpool(gallery.open)
                    break
                except (OperationalError, DBAPIError) as exc:
                    logger.error("database unreachable at start-up (%s); retrying in 2 s", type(exc).__name__)
                    await asyncio.sleep(2.0)
            gallery.start_background()
            state.gallery = gallery
            state.size.set(len(gallery))
            state.ready = True
            logger.info("ready: %d gallery entries on %s", len(gallery), embedder.device)

        opener = asyncio.ensure_future(open_gallery())
        await asyncio.wait([opener], timeout=settings.db_connect_timeout_s * 2)  # usually done at once
        # Any other start-up failure stops the process with the reason logged (non-zero exit).
        try:
            opener.result() if opener.done() else opener.add_done_callback(exit_on_failure)
        except BaseException:
            await gallery.stop()
            await embedder.stop()
            engine.dispose()
            raise
        try:
            yield
        finally:
            state.ready = False
            opener.cancel()
            await gallery.stop()
            await embedder.stop()
            engine.dispose()

    app = FastAPI(title="Person re-ID service", version="1.0.0", lifespan=lifespan)
    app.state.reid = state
    install_error_handlers(app)

    app.include_router(build_router())
    ops = build_ops_router()
    app.include_router(ops)
    body_limit = settings.max_upload_bytes * settings.max_files_per_request + 1024 * 1024
    app.add_middleware(BodyLimit, limit=body_limit)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        route = request.url.path
        if settings.api_key is not None and route != "/health":  # the docs and the schema too
            given = request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return problem(401, "unauthorized", "missing or wrong X-API-Key header")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > body_limit):
            return problem(413, "request_too_large", f"the request body is over the {body_limit}-byte limit")
        start = time.perf_counter()
        try:
            response = await asyncio.wait_for(call_next(request), settings.request_timeout_s)
        except TimeoutError:
            logger.warning("request %s %s timed out after %.1f s", request.method, route, settings.request_timeout_s)
            response = problem(504, "timeout", f"the request took over {settings.request_timeout_s} s")
        except Exception:
            logger.exception("unhandled error on %s %s", request.method, route)
            response = problem(500, "internal_error", "an unexpected error occurred; it has been logged")
        matched = request.scope.get("route")
        name = getattr(matched, "path", "unmatched")
        method = request.method if request.method in HTTP_METHODS else "other"
        state.requests.labels(method, name, str(response.status_code)).inc()
        state.latency.labels(name).observe(time.perf_counter() - start)
        return response

    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["*"], allow_headers=["*"]
        )
    return app


def __getattr__(name: str) -> Any:
    # `app.main:app` built on first access, so importing this module builds nothing.
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(name)


def serve() -> None:
    """The ``reid-serve`` entry point: uvicorn on REID_HOST:REID_PORT."""
    import uvicorn

    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper())
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower())
