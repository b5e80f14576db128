"""The middlewares: the request body's byte limit while it streams, and the guard around every request (the
API key, Content-Length, the time limit and its deadline for queued work, metrics, no traceback ever out)."""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import API_KEY_HEADER, State, key_matches
from app.embedder import request_deadline
from app.errors import problem
from app.ui import is_public_path

logger = logging.getLogger(__name__)

# Metric labels: a label set lives for ever, so invented methods are one "other", unknown paths "unmatched".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OPEN_PATHS = frozenset({"/health"})  # answered without the API key: liveness probes carry none


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


class Guard:
    """Around every request: the API key, Content-Length, the time limit and its deadline for queued work,
    metrics, and never a traceback out (a 500 problem instead).

    A plain ASGI middleware rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs the app in
    a task group of its own and streams the response through a memory stream, work per request for nothing here
    (measured end to end, ``POST /query`` was as fast either way, within the runs' spread). The time limit covers
    the request until its response starts, as it did there: a large response that has begun streaming is not cut
    off."""

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.settings = state.settings
        self.metrics = state.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings
        request = Request(scope)
        route = request.url.path
        key = settings.api_key
        public = route in OPEN_PATHS or is_public_path(route)  # the page's shell and assets hold no data
        if key is not None and not public and not key_matches(request.headers.get(API_KEY_HEADER), key):
            # the docs and the schema too
            await problem(401, "unauthorized", "missing or wrong X-API-Key header")(scope, receive, send)
            return
        body_limit = settings.body_limit
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > body_limit):
            detail = f"the request body is over the {body_limit}-byte limit"
            await problem(413, "request_too_large", detail)(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None
        timeout = asyncio.timeout(settings.request_timeout_s)
        timing = True  # while the time limit runs

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if timing:
                    timeout.reschedule(None)  # the response has started: the limit is met
                self._observe(scope, status, start)
            await send(message)

        # Queued forward passes of this request are dropped once it is past its time (it was answered 504).
        token = request_deadline.set(time.monotonic() + settings.request_timeout_s)
        failure: Response | None = None
        try:
            async with timeout:
                await self.app(scope, receive, send_observed)
        except TimeoutError:
            logger.warning("request %s %s timed out after %.1f s", scope["method"], route, settings.request_timeout_s)
            failure = problem(504, "timeout", f"the request took over {settings.request_timeout_s} s")
        except Exception:
            if status is not None:
                raise  # the response has begun: only the server can close it
            logger.exception("unhandled error on %s %s", scope["method"], route)
            failure = problem(500, "internal_error", "an unexpected error occurred; it has been logged")
        finally:
            timing = False
            request_deadline.reset(token)
        if failure is not None and status is None:
            await failure(scope, receive, send_observed)

    def _observe(self, scope: Scope, status: int, start: float) -> None:
        matched = scope.get("route")
        name = getattr(matched, "path", "unmatched")
        method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
        self.metrics.requests.labels(method, name, str(status)).inc()
        self.metrics.latency.labels(name).observe(time.perf_counter() - start)


def install_middlewares(app: FastAPI, state: State) -> None:
    settings = state.settings
    app.add_middleware(BodyLimit, limit=settings.body_limit)
    app.add_middleware(Guard, state=state)

    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["*"], allow_headers=["*"]
        )
