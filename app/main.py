"""The FastAPI application: ``create_app(settings)`` builds it and its lifespan loads the model and the gallery
once; ``app.main:app`` is the ASGI app and ``reid-serve`` runs it with uvicorn on REID_HOST:REID_PORT. The
routes are in ``app/api/routes/``, their dependencies in ``app/api/deps.py``, the middlewares beside them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, require_api_key
from app.api.middleware import install_middlewares
from app.api.routes import KEYED, OPEN
from app.config import Settings
from app.db import make_engine
from app.embedder import Embedder
from app.errors import install_error_handlers
from app.gallery import Gallery, exit_on_failure
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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    _log_to_stderr(settings.log_level.upper())
    state = State(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        embedder = await run_in_threadpool(Embedder.from_settings, settings)
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
                    logger.error("database unreachable at start-up (%s); retrying in 2 s", type(exc).__name__)
                    await asyncio.sleep(2.0)
            gallery.start_background()
            state.gallery = gallery
            state.metrics.size.set(len(gallery))
            state.ready = True
            logger.info("ready: %d gallery entries, %s on %s", len(gallery), embedder.backend_name, embedder.device)

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
        try:
            yield
        finally:
            state.ready = False
            opener.cancel()
            await gallery.stop()
            await embedder.stop()
            engine.dispose()

    app = FastAPI(title="Person re-ID service", version="1.1.0", lifespan=lifespan)
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
        app = create_app()
        return app
    raise AttributeError(name)


def serve() -> None:
    """The ``reid-serve`` entry point: uvicorn on REID_HOST:REID_PORT."""
    import uvicorn

    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper())
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower())
