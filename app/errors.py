"""RFC 9457 problem details: every 4xx/5xx answer is ``application/problem+json`` with a stable ``code``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.faults import IdempotencyKeyReused, ModelMismatch, Resyncing, WriteBusy, fatal_reason, is_busy
from app.schemas import Problem

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class ApiError(Exception):
    """An answer the client can act on: HTTP status, stable code, human message."""

    def __init__(
        self, status: int, code: str, detail: str, title: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or code.replace("_", " ")
        self.headers = headers  # e.g. Retry-After on a 503


def problem(
    status: int,
    code: str,
    detail: str,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: object,
) -> JSONResponse:
    body = {
        "type": f"https://reid.example/problems/{code}",
        "title": title or code.replace("_", " "),
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    headers = {**({"WWW-Authenticate": "ApiKey"} if status == 401 else {}), **(headers or {})}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


_DESCRIPTIONS = {
    400: "an empty, truncated or corrupt image",
    401: "missing or wrong X-API-Key header",
    404: "no such entry or identity",
    409: "the loaded weights have no mask generator",
    413: "a file, an image, the number of files or form fields, a text field or the request body over its limit",
    415: "not an image of an allowed format",
    422: "invalid parameters or form fields",
    503: "the service is starting or overloaded, another writer holds the write lock, the index is being rebuilt "
    "after the database changed (all with Retry-After); the database is unreachable or failed, or the gallery was "
    "re-embedded under other weights",
    504: "the request took longer than REID_REQUEST_TIMEOUT_S",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` documenting these error statuses as ``application/problem+json``."""
    schema = Problem.model_json_schema()
    return {
        status: {"description": _DESCRIPTIONS[status], "content": {PROBLEM_JSON: {"schema": schema}}}
        for status in statuses
    }


RETRY = {"Retry-After": "2"}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "request_too_large"}
# Starlette stops parsing a form at its limits (app.main's form_limits) with a 400 whose sentence starts so;
# they are sizes of the request, answered 413 like every other limit: (code, the setting behind it).
_FORM_LIMITS = {
    "Too many files": ("too_many_files", "REID_MAX_FILES_PER_REQUEST"),
    "Too many fields": ("too_many_fields", "REID_MAX_FORM_FIELDS"),
    "Part exceeded maximum size": ("form_field_too_large", "4 x REID_MAX_METADATA_BYTES a text field"),
    "Field exceeded maximum size": ("form_field_too_large", "4 x REID_MAX_METADATA_BYTES a text field"),
}


def form_limit_code(exc: StarletteHTTPException) -> tuple[str, str] | None:
    """(code, setting) when ``exc`` is Starlette refusing a form past one of its limits, else None."""
    if exc.status_code != 400:
        return None
    detail = str(exc.detail)
    return next((over for start, over in _FORM_LIMITS.items() if detail.startswith(start)), None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return problem(exc.status, exc.code, exc.detail, exc.title, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
        return problem(422, "validation_error", detail, "request validation failed", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        over = form_limit_code(exc)
        if over is not None:
            code, setting = over
            return problem(413, code, f"{exc.detail} The form is refused while it is read ({setting}).")
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return problem(exc.status_code, code, str(exc.detail))

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        reason = fatal_reason(exc)
        if reason is not None:
            # Corrupt, read-only or full: retrying cannot heal it. Liveness fails from now on (/health 503), so
            # an orchestrator restarts the process, whose start-up then exits with the same reason.
            request.app.state.reid.fatal = f"the database failed: {reason}"
            logger.critical("database failure on %s %s: %s", request.method, request.url.path, reason)
            return problem(503, "database_failed", f"the database failed and needs an operator: {reason}")
        if is_busy(exc):
            return problem(503, "write_busy", "the database is locked by another writer; retry shortly", headers=RETRY)
        logger.error("database error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return problem(503, "database_unavailable", "the database is unreachable; retry later", headers=RETRY)

    @app.exception_handler(WriteBusy)
    async def _write_busy(request: Request, exc: WriteBusy) -> JSONResponse:
        return problem(503, "write_busy", f"{exc}; retry shortly (reads are answered meanwhile)", headers=RETRY)

    @app.exception_handler(Resyncing)
    async def _resyncing(request: Request, exc: Resyncing) -> JSONResponse:
        return problem(503, "index_resyncing", f"the index is being rebuilt: {exc}", headers=RETRY)

    @app.exception_handler(IdempotencyKeyReused)
    async def _key_reused(request: Request, exc: IdempotencyKeyReused) -> JSONResponse:
        return problem(422, "idempotency_key_reused", str(exc))

    @app.exception_handler(ModelMismatch)
    async def _model_mismatch(request: Request, exc: ModelMismatch) -> JSONResponse:
        # Another replica re-embedded the gallery under other weights: this one's templates no longer compare.
        return problem(503, "model_mismatch", str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return problem(500, "internal_error", "an unexpected error occurred; it has been logged")
