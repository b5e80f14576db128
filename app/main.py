"""The FastAPI application: ``create_app(settings)`` builds it and its lifespan loads the model and the gallery
once; ``app.main:app`` is the ASGI app and ``reid-serve`` runs it with uvicorn on REID_HOST:REID_PORT. The
routes are in ``app/api/routes/``, their dependencies in ``app/api/deps.py``, the middlewares beside them."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn

from fastapi import Depends, FastAPI
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, require_api_key
from app.api.middleware import install_middlewares
from app.api.routes import KEYED, OPEN
from app.config import Settings, load_settings
from app.db import make_engine
from app.embedder import Embedder
from app.errors import install_error_handlers
from app.events import Events
from app.faults import WriteBusy, fatal_reason
from app.gallery import Gallery
from app.regroup import Linkage, regroup
from app.sightings import join_threshold
from app.transit import TransitTable
from app.ui import install_ui

logger = logging.getLogger(__name__)


def _log_to_stderr(level: str) -> None:
    """The service's own records at ``level``. Under a bare ``uvicorn app.main:app`` nothing else shows them
    (uvicorn configures its own loggers only): the backend choice, the start-up summary, warnings."""
    app_logger = logging.getLogger("app")
    app_logger.setLevel(level)
    if not app_logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        app_logger.addHandler(handler)


def exit_on_failure(opener: asyncio.Future[None]) -> None:
    """Done-callback of a gallery opener that outlived start-up: a failure other than an unreachable database
    (those are retried) cannot heal, so the process exits non-zero with the reason logged, for an orchestrator
    to restart it and the operator to see why."""
    if opener.cancelled() or opener.exception() is None:
        return
    logger.critical("start-up failed: %s", opener.exception(), exc_info=opener.exception())
    logging.shutdown()
    os._exit(1)


def refuse_to_start(reason: BaseException) -> NoReturn:
    """A setting that cannot work (a weights file that is not there, CUDA asked for on a CPU): one sentence in
    the log and a non-zero exit, not a traceback an operator must read to the bottom."""
    logger.critical("start-up failed: %s", reason)
    logging.shutdown()
    os._exit(1)


def create_app(settings: Settings | None = None, entry_point: bool = False) -> FastAPI:
    """The service. ``entry_point``: this process serves only it (``app.main:app``, ``reid-serve``), so a setting
    that cannot work ends the process with one sentence; elsewhere (tests, benches) the error is raised."""
    settings = settings or load_settings()
    _log_to_stderr(settings.log_level.upper())
    state = State(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            if settings.transit_table is not None:
                state.transit = TransitTable.load(settings.transit_table)
            embedder = await run_in_threadpool(Embedder.from_settings, settings)
        except (FileNotFoundError, ValueError) as exc:  # a setting names a missing file, a bad one, no CUDA
            if entry_point:
                refuse_to_start(exc)
            raise
        await run_in_threadpool(embedder.warm_up)
        state.embedder = embedder
        engine = make_engine(settings.sqlalchemy_url, settings.db_connect_timeout_s)
        use_gpu = embedder.device.type == "cuda"
        gallery = Gallery.from_settings(settings, engine, embedder.feat_dim, embedder.fingerprint, use_gpu)
        embedder.start()

        async def open_gallery() -> None:
            # A database that is down at start-up is retried: /ready and the API answer 503 meanwhile.
            while True:
                try:
                    await run_in_threadpool(gallery.open)
                    break
                except (OperationalError, DBAPIError) as exc:
                    reason = fatal_reason(exc)
                    if reason is not None:  # corrupt, read-only or full: no retry heals it
                        raise RuntimeError(f"the database at {engine.url!r} cannot be used: {reason}") from exc
                    logger.error("database unreachable at start-up (%s); retrying in 2 s", type(exc).__name__)
                    await asyncio.sleep(2.0)
                except WriteBusy as exc:  # another writer holds the lock for now: it will be let go
                    logger.error("%s at start-up; retrying in 2 s", exc)
                    await asyncio.sleep(2.0)
            gallery.start_background()
            if settings.regroup_interval_s > 0:
                background.append(asyncio.ensure_future(regroup_periodically(gallery)))
            state.gallery = gallery
            state.metrics.size.set(len(gallery))
            state.ready = True
            logger.info("ready: %d gallery entries, %s on %s", len(gallery), embedder.backend_name, embedder.device)

        background: list[asyncio.Future[None]] = []

        async def regroup_periodically(gallery: Gallery) -> None:
            threshold, source = join_threshold(settings, embedder.provenance, embedder.trained)
            if threshold is None:
                logger.warning("sightings are not re-grouped: no join threshold (set REID_JOIN_THRESHOLD)")
                return
            while True:
                await asyncio.sleep(settings.regroup_interval_s)
                try:
                    await run_in_threadpool(
                        regroup,
                        gallery,
                        threshold,
                        Linkage.from_settings(settings),
                        correct_averaging=settings.tracklet_spread_correction,
                        transit=state.transit,
                    )
                except Exception:  # the next run tries again; a failed database is the worker's to report
                    logger.exception("re-grouping failed (threshold %g from %s)", threshold, source)

        async def start_events(events: Events) -> None:
            try:
                await run_in_threadpool(events.start)  # replays the outbox: what was owed before a restart goes out
            except (OSError, RuntimeError) as exc:  # an unwritable data folder, every outbox slot held
                if entry_point:
                    refuse_to_start(exc)
                raise
            state.events = events

        opener = asyncio.ensure_future(open_gallery())
        await asyncio.wait([opener], timeout=settings.db_connect_timeout_s * 2)  # usually done at once
        # Any other start-up failure stops the process with the reason logged (non-zero exit).
        if not opener.done():
            opener.add_done_callback(exit_on_failure)
        elif opener.exception() is not None:
            await gallery.stop()
            await embedder.stop()
            engine.dispose()
            raise opener.exception()
        events = Events(settings)
        try:
            await start_events(events)
            yield
        finally:
            state.ready = False
            opener.cancel()
            for task in background:
                task.cancel()
            await gallery.stop()
            await embedder.stop()
            await run_in_threadpool(events.stop)  # after the last request; what is pending waits in the outbox
            engine.dispose()

    # Counted while the form streams in, before a part is spooled: 2,000 tiny parts are refused at the 65th file
    # or the 257th field (413), not parsed whole. A text field may be 4x the metadata limit, so that an
    # oversized metadata field still gets its own sentence (422 invalid_metadata).
    form_limits = {
        "max_files": settings.max_files_per_request,
        "max_fields": settings.max_form_fields,
        "max_part_size": 4 * settings.max_metadata_bytes,
    }
    app = FastAPI(title="Person re-ID service", version="1.1.0", lifespan=lifespan, form_limits=form_limits)
    app.state.reid = state
    install_error_handlers(app)
    # With a key set, its routes declare the X-API-Key scheme (OpenAPI shows it) and check it; the middleware
    # also guards the docs and unknown paths.
    keyed = [Depends(require_api_key)] if settings.api_key is not None else []
    for router in KEYED:
        app.include_router(router, dependencies=keyed)
    for router in OPEN:
        app.include_router(router)
    install_ui(app)  # the page at /ui: its shell and assets are served without the key (they hold no data)
    install_middlewares(app, state)
    return app


def __getattr__(name: str) -> Any:
    # `app.main:app` built on first access, so importing this module builds nothing.
    if name == "app":
        global app
        app = create_app(entry_point=True)
        return app
    raise AttributeError(name)


def serve() -> None:
    """The ``reid-serve`` entry point: uvicorn on REID_HOST:REID_PORT."""
    import uvicorn

    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper())
    uvicorn.run(
        create_app(settings, entry_point=True),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
    )
