"""The page at ``/ui``: one HTML shell and its ES modules and stylesheet, shipped inside the package.

The shell and its assets hold no data, so they are served without the API key (the page must load to ask
for it); every data request the page makes carries ``X-API-Key``. Both answer with strict headers: scripts
only from this origin and never inline, no framing, no MIME sniffing, nothing sent to or loaded from any
other origin."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
PAGE_PATH = "/ui"
ASSETS_PATH = "/ui/static"

# Crops and masks are fetched with the key header and shown as blob: URLs (an <img src> cannot send headers).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",  # revalidate: after an upgrade the shell and its modules never mix versions
}


class _Assets(StaticFiles):
    """Starlette's static files (path checks, ETags, ranges) with the page's headers on every answer."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def is_public_path(path: str) -> bool:
    """True for the page's shell and assets, which the API key does not cover."""
    return path in (PAGE_PATH, PAGE_PATH + "/") or path.startswith(ASSETS_PATH + "/")


def install_ui(app: FastAPI) -> None:
    """Serve the page at ``/ui`` and its assets under ``/ui/static/``; neither is in the OpenAPI schema."""

    @app.get(PAGE_PATH, include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    # The page names its assets and the API relative to its own URL, so that it also works behind a proxy
    # that serves the service under a path prefix; "/ui/" would shift them one level down.
    @app.get(PAGE_PATH + "/", include_in_schema=False)
    async def page_with_slash() -> RedirectResponse:
        return RedirectResponse("../ui", status_code=308)

    app.mount(ASSETS_PATH, _Assets(directory=STATIC_DIR), name="ui-static")
