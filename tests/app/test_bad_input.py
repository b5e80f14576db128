"""Every bad input of the issue: the right 4xx with a stable code as problem+json, nothing stored touched."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from tests.app.conftest import png_bytes


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, small_weights) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("bad"),
        weights=small_weights,
        device="cpu",
        max_upload_bytes=20_000,
        max_image_pixels=100 * 100,
    )
    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/gallery", files={"files": ("a.png", png_bytes(1), "image/png")}, data={"identity": "a"}
        )
        assert response.status_code == 201
        yield client


def _truncated() -> bytes:
    return png_bytes(2, fmt="JPEG")[:200]


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buffer, format="PNG")  # a few kB, 4 Mpixel: over the limit
    return buffer.getvalue()


def _tga() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="TGA")  # a real image, not on the allow-list
    return buffer.getvalue()


UPLOADS = [
    ("not_an_image", b"hello, this is text", 415, "unsupported_image"),
    ("zero_bytes", b"", 400, "empty_file"),
    ("truncated_jpeg", None, 400, "corrupt_image"),
    ("unsupported_format", None, 415, "unsupported_image"),
    ("pixel_bomb", None, 413, "image_too_large"),
    ("over_byte_limit", b"\xff" * 30_000, 413, "file_too_large"),
]


@pytest.mark.parametrize(("name", "body", "status", "code"), UPLOADS, ids=[u[0] for u in UPLOADS])
@pytest.mark.parametrize("route", ["/gallery", "/query", "/embed", "/mask"])
def test_bad_uploads(client: TestClient, name: str, body: bytes | None, status: int, code: str, route: str) -> None:
    body = {"truncated_jpeg": _truncated, "unsupported_format": _tga, "pixel_bomb": _bomb}.get(name, lambda: body)()
    field = "files" if route in ("/gallery", "/embed") else "file"
    data = {"identity": "b"} if route == "/gallery" else {}
    response = client.post(route, files={field: ("x.jpg", body, "image/jpeg")}, data=data)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code and problem["status"] == status and problem["detail"] and problem["title"]
    assert "Traceback" not in response.text
    # The service keeps serving and nothing stored was touched.
    assert client.get("/gallery").json()["total"] == 1
    assert client.get("/ready").status_code == 200


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "code"),
    [
        ("post", "/gallery", {"files": {"files": ("a.png", png_bytes(1), "image/png")}}, 422, "validation_error"),
        ("post", "/gallery", {"data": {"identity": "a"}}, 422, "validation_error"),
        ("post", "/query", {"data": {"top_k": "5"}}, 422, "validation_error"),
        (
            "post",
            "/query",
            {"files": {"file": ("a.png", png_bytes(1), "image/png")}, "data": {"top_k": "0"}},
            422,
            "validation_error",
        ),
        (
            "post",
            "/query",
            {"files": {"file": ("a.png", png_bytes(1), "image/png")}, "data": {"top_k": "100000"}},
            422,
            "validation_error",
        ),
        (
            "post",
            "/gallery",
            {"files": {"files": ("a.png", png_bytes(1), "image/png")}, "data": {"identity": "a", "metadata": "[1, 2]"}},
            422,
            "invalid_metadata",
        ),
        ("get", "/gallery/999999", {}, 404, "entry_not_found"),
        ("get", "/gallery/abc", {}, 422, "validation_error"),
        ("delete", "/gallery/999999", {}, 404, "entry_not_found"),
        ("delete", "/identities/nobody", {}, 404, "identity_not_found"),
        ("get", "/mask/999999", {}, 404, "entry_not_found"),
        ("get", "/mask/1?view=xray", {}, 422, "validation_error"),
        ("get", "/no/such/route", {}, 404, "not_found"),
        ("put", "/gallery", {}, 405, "method_not_allowed"),
    ],
)
def test_bad_requests(client: TestClient, method: str, url: str, kwargs: dict, status: int, code: str) -> None:
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code
    assert client.get("/gallery").json()["total"] == 1


def test_body_over_limit_refused_from_content_length(client: TestClient) -> None:
    response = client.post("/embed", content=b"x" * 10, headers={"content-length": str(10**12)})
    assert response.status_code == 413 and response.json()["code"] == "request_too_large"


def test_too_many_files(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_files_per_request": 2}))) as client:
        files = [("files", (f"{i}.png", png_bytes(i), "image/png")) for i in range(3)]
        response = client.post("/embed", files=files)
        assert response.status_code == 413 and response.json()["code"] == "too_many_files"


def test_api_key(settings: Settings) -> None:
    key = "5b8e0c3f7a1d9e24"
    with TestClient(create_app(settings.model_copy(update={"api_key": key}))) as client:
        assert client.get("/health").status_code == 200
        for url in ("/gallery", "/identities", "/ready", "/metrics"):
            for headers in ({}, {"X-API-Key": "wrong"}):
                response = client.get(url, headers=headers)
                assert response.status_code == 401 and response.json()["code"] == "unauthorized"
            assert client.get(url, headers={"X-API-Key": key}).status_code == 200
        assert client.post("/embed", files={"files": ("a.png", png_bytes(1), "image/png")}).status_code == 401


def test_cors_off_unless_configured(settings: Settings) -> None:
    origin = {"Origin": "https://example.org"}
    with TestClient(create_app(settings)) as client:
        assert "access-control-allow-origin" not in client.get("/health", headers=origin).headers
    with TestClient(create_app(settings.model_copy(update={"cors_origins": "https://example.org"}))) as client:
        assert client.get("/health", headers=origin).headers["access-control-allow-origin"] == "https://example.org"


def test_database_down_gives_503_then_recovers(settings: Settings, tmp_path) -> None:
    with TestClient(create_app(settings)) as client:
        gallery = client.app.state.reid.gallery
        good = gallery.engine
        from app.db import make_engine

        gallery.engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", 1)
        gallery.sessions.configure(bind=gallery.engine)
        response = client.get("/gallery")
        assert response.status_code == 503 and response.json()["code"] == "database_unavailable"
        gallery.engine = good
        gallery.sessions.configure(bind=good)
        assert client.get("/gallery").status_code == 200


def test_no_mask_generator(settings: Settings, small_weights_no_mask) -> None:
    with TestClient(create_app(settings.model_copy(update={"weights": small_weights_no_mask}))) as client:
        response = client.post("/mask", files={"file": ("a.png", png_bytes(1), "image/png")})
        assert response.status_code == 409 and response.json()["code"] == "no_mask_generator"
        response = client.post(
            "/query", files={"file": ("a.png", png_bytes(1), "image/png")}, data={"include_mask": "true"}
        )
        assert response.status_code == 409 and response.json()["code"] == "no_mask_generator"


def test_database_down_at_start_up_gives_503_not_a_crash(tmp_path, small_weights) -> None:
    settings = Settings(
        data_dir=tmp_path,
        weights=small_weights,
        device="cpu",
        database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
        db_connect_timeout_s=1,
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").json()["ready"] is False
        for url in ("/ready", "/gallery"):
            response = client.get(url)
            assert response.status_code == 503 and response.json()["code"] == "not_ready"


def _encoded(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_odd_but_valid_images_are_embedded_as_their_rgb(client: TestClient) -> None:
    import numpy as np

    from models import to_rgb

    base = Image.open(io.BytesIO(png_bytes(3)))
    frames = [base, Image.new("RGB", base.size, (255, 0, 0))]
    cases = {
        "cmyk.jpg": base.convert("CMYK"),
        "grey16.png": Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257),
        "palette.png": base.convert("P"),
        "alpha.png": base.convert("RGBA"),
    }
    uploads = {name: _encoded(image, "JPEG" if name.endswith("jpg") else "PNG") for name, image in cases.items()}
    uploads["animated.gif"] = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    files = [("files", (name, data, "application/octet-stream")) for name, data in uploads.items()]
    response = client.post("/embed", files=files)
    assert response.status_code == 200, response.text
    got = np.array([r["embedding"] for r in response.json()["results"]], dtype=np.float32)
    embedder = client.app.state.reid.embedder
    expected = embedder.embed_sync([to_rgb(Image.open(io.BytesIO(data))) for data in uploads.values()])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # the GIF's first frame, RGB conversions
