"""What the page at /ui needs from the API: the stored crop of an entry, identities paged with a thumbnail, and
the page itself served without the key, with strict headers, while every data route stays behind it."""

from __future__ import annotations

import fnmatch
import io
import tomllib

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from tests.app.conftest import png_bytes
from tests.conftest import REPO_ROOT

KEY = "ui-api-key-0c1d-5e8a"


def _enroll(client: TestClient, identity: str, seeds: list[int], **headers: str) -> list[int]:
    files = [("files", (f"{identity}_{s}.png", png_bytes(s), "image/png")) for s in seeds]
    response = client.post("/gallery", files=files, data={"identity": identity}, headers=headers)
    assert response.status_code == 201, response.text
    return [e["id"] for e in response.json()]


def test_entry_image_is_the_stored_crop(settings: Settings, database_url: str | None) -> None:
    settings = settings.model_copy(update={"database_url": database_url})
    with TestClient(create_app(settings)) as client:
        # A JPEG upload is stored as the PNG of its decoded pixels: the image answers exactly those.
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 24, 3), np.uint8)).save(buffer, "JPEG")
        files = {"files": ("a.jpg", buffer.getvalue(), "image/jpeg")}
        [entry] = client.post("/gallery", files=files, data={"identity": "alice"}).json()
        response = client.get(f"/gallery/{entry['id']}/image")
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-content-type-options"] == "nosniff"
        shown = np.asarray(Image.open(io.BytesIO(response.content)))
        np.testing.assert_array_equal(shown, np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
        assert shown.shape == (entry["height"], entry["width"], 3)

        missing = client.get("/gallery/999999/image")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        assert missing.json()["code"] == "entry_not_found"
        assert client.get("/gallery/0/image").json()["code"] == "validation_error"

        # A database restored without its crops folder: a 404 that says so, not a 500.
        for crop in (settings.data_dir / "crops").rglob("*.png"):
            crop.unlink()
        gone = client.get(f"/gallery/{entry['id']}/image")
        assert gone.status_code == 404 and gone.json()["code"] == "crop_not_found"


def test_identities_are_paged_with_a_thumbnail_and_a_total(settings: Settings, database_url: str | None) -> None:
    settings = settings.model_copy(update={"database_url": database_url})
    with TestClient(create_app(settings)) as client:
        ids = {name: _enroll(client, name, [i, i + 10]) for i, name in enumerate(["carol", "alice", "bob", "dave"])}
        _enroll(client, "alice", [30])  # a later crop of alice: her thumbnail stays the first one

        everything = client.get("/identities")  # no parameters: the first page of 100, here every identity
        assert everything.headers["x-total-count"] == "4"
        assert everything.json() == [
            {"identity": "alice", "entries": 3, "thumbnail": ids["alice"][0]},
            {"identity": "bob", "entries": 2, "thumbnail": ids["bob"][0]},
            {"identity": "carol", "entries": 2, "thumbnail": ids["carol"][0]},
            {"identity": "dave", "entries": 2, "thumbnail": ids["dave"][0]},
        ]
        page = client.get("/identities", params={"offset": 1, "limit": 2})
        assert page.headers["x-total-count"] == "4"
        assert [i["identity"] for i in page.json()] == ["bob", "carol"]
        past = client.get("/identities", params={"offset": 10, "limit": 2})
        assert past.json() == [] and past.headers["x-total-count"] == "4"
        for bad in ({"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "x"}):
            refused = client.get("/identities", params=bad)
            assert refused.status_code == 422 and refused.json()["code"] == "validation_error", bad

        client.delete(f"/gallery/{ids['bob'][0]}")  # the thumbnail moves to the first crop left
        assert client.get("/identities", params={"offset": 1, "limit": 1}).json() == [
            {"identity": "bob", "entries": 1, "thumbnail": ids["bob"][1]}
        ]


def test_page_needs_no_key_and_data_routes_do(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_key": KEY})
    with TestClient(create_app(keyed)) as client:
        for path in ("/ui", "/ui/", "/ui/static/app.js", "/ui/static/masks.js", "/ui/static/style.css"):
            response = client.get(path)
            assert response.status_code == 200, path
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
            assert response.headers["x-content-type-options"] == "nosniff"
        assert client.get("/ui").headers["content-type"] == "text/html; charset=utf-8"
        slash = client.get("/ui/", follow_redirects=False)  # the page's relative URLs need no trailing slash
        assert slash.status_code == 308 and slash.headers["location"] == "../ui"
        assert client.get("/ui/static/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/ui/static/nothing.js").status_code == 404
        # The page's own path prefix opens nothing else: these are data routes or none at all.
        for path in ("/ui/../identities", "/ui/static/../../identities", "/uix", "/identities?x=/ui"):
            assert client.get(path).status_code in (401, 404), path
        [entry_id] = _enroll(client, "alice", [1], **{"X-API-Key": KEY})
        for path in ("/identities", f"/gallery/{entry_id}/image", f"/mask/{entry_id}?view=overlay"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"X-API-Key": KEY}).status_code == 200, path
        schema = client.get("/openapi.json", headers={"X-API-Key": KEY}).json()
        assert not [p for p in schema["paths"] if p.startswith("/ui")]  # the page is no API operation


def test_every_page_asset_is_package_data() -> None:
    """The wheel ships app/ui/static (pyproject's package-data): no file of the page is left behind."""
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["app.ui"]
    package = REPO_ROOT / "app" / "ui"
    assets = [p.relative_to(package) for p in (package / "static").rglob("*") if p.is_file()]
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in assets}
    assert all(any(fnmatch.fnmatch(str(p), pattern) for pattern in patterns) for p in assets), assets
