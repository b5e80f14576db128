"""Hostile uploads under the default limits, beyond test_bad_input's catalogue: each is accepted and embedded
as its RGB image, or refused with the right 4xx, and the service keeps answering afterwards."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.images import downscale
from app.main import create_app
from models import to_rgb
from tests.app.conftest import png_bytes


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, small_weights) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("hostile"), weights=small_weights, device="cpu")
    with TestClient(create_app(settings)) as client:
        yield client


def _still_serving(client: TestClient) -> None:
    assert client.get("/ready").status_code == 200
    files = {"files": ("ok.png", png_bytes(5, (8, 16)), "image/png")}
    assert client.post("/embed", files=files).status_code == 200


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(side: int) -> bytes:
    """A real greyscale PNG of side x side black pixels: a few hundred kB that inflate to side**2 bytes."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("size", "stored"),
    [((1, 1), (1, 1)), ((50_000, 10), (1024, 1)), ((10, 50_000), (1, 1024))],
    ids=["1x1", "50000x10", "10x50000"],
)
def test_extreme_sizes_are_embedded_as_their_rgb(
    client: TestClient, size: tuple[int, int], stored: tuple[int, int]
) -> None:
    """Embedded as their RGB image downscaled to REID_MAX_IMAGE_SIDE (1024), as they are stored."""
    data = _encoded(_noise(*size))
    response = client.post("/embed", files={"files": ("odd.png", data, "image/png")})
    assert response.status_code == 200, response.text
    got = np.array(response.json()["results"][0]["embedding"], dtype=np.float32)
    rgb = downscale(to_rgb(Image.open(io.BytesIO(data))), 1024)
    expected = client.app.state.reid.embedder.embed_sync([rgb])[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    enrolled = client.post("/gallery", files={"files": ("odd.png", data, "image/png")}, data={"identity": "odd"})
    assert enrolled.status_code == 201 and (enrolled.json()[0]["width"], enrolled.json()[0]["height"]) == stored
    _still_serving(client)


def test_decompression_bomb_is_refused_before_decoding(client: TestClient) -> None:
    bomb = _png_bomb(20_000)  # 400 Mpixel, 400 MB decoded: over the 2048 x 2048 default and PIL's own bound
    assert len(bomb) < 1_000_000
    for route, field in (("/embed", "files"), ("/gallery", "files"), ("/query", "file"), ("/mask", "file")):
        data = {"identity": "bomb"} if route == "/gallery" else {}
        response = client.post(route, files={field: ("bomb.png", bomb, "image/png")}, data=data)
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "image_too_large" and "bomb" in response.json()["detail"]
    _still_serving(client)


def test_image_just_over_the_pixel_limit_is_refused(client: TestClient) -> None:
    data = _encoded(Image.new("L", (2049, 2048)))
    response = client.post("/embed", files={"files": ("big.png", data, "image/png")})
    assert response.status_code == 413 and response.json()["code"] == "image_too_large"
    _still_serving(client)


@pytest.mark.parametrize(
    ("name", "body", "status", "code"),
    [
        ("text.jpg", b"just text, named like a JPEG\n" * 20, 415, "unsupported_image"),
        ("html.png", b"<html><script>alert(1)</script></html>", 415, "unsupported_image"),
        ("zeros.jpg", b"\x00" * 4096, 415, "unsupported_image"),
        ("header_only.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", 400, "corrupt_image"),
        ("truncated.png", b"", 400, "empty_file"),
    ],
)
def test_files_that_are_not_images(client: TestClient, name: str, body: bytes, status: int, code: str) -> None:
    if name == "truncated.png":
        body = _encoded(_noise(64, 128))[:300]
        code = "corrupt_image"
    response = client.post("/gallery", files={"files": (name, body, "image/jpeg")}, data={"identity": "x"})
    assert response.status_code == status, response.text
    assert response.json()["code"] == code and name in response.json()["detail"]
    _still_serving(client)


def test_huge_multipart_body_without_content_length_is_refused(tmp_path, small_weights) -> None:
    """A chunked body carries no Content-Length: it is counted as it streams and cut at the limit, before the
    multipart parser spools it (which would answer file_too_large only once the whole body is on disk)."""
    settings = Settings(data_dir=tmp_path, weights=small_weights, device="cpu", max_upload_bytes=1000)
    settings = settings.model_copy(update={"max_files_per_request": 2})
    limit = 1000 * 2 + 1024 * 1024
    assert settings.body_limit == limit

    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
        for _ in range(64):  # 64 MiB
            yield b"\x00" * (1 << 20)
        yield b"\r\n--b--\r\n"

    with TestClient(create_app(settings)) as client:
        response = client.post("/embed", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "request_too_large" and str(limit) in response.json()["detail"]
        assert "content-length" not in {k.lower() for k in response.request.headers}
        _still_serving(client)


def test_one_huge_file_part_is_cut_at_the_request_limit(tmp_path, small_weights) -> None:
    """One file part far over REID_MAX_UPLOAD_BYTES is only refused by the multipart parser once spooled whole:
    the request limit (REID_MAX_REQUEST_BYTES) cuts it first, whatever the file count allows."""
    settings = Settings(data_dir=tmp_path, weights=small_weights, device="cpu", max_request_bytes=2 * 1024 * 1024)

    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
        for _ in range(100):  # 100 MiB, within 64 files x 10 MiB
            yield b"\x00" * (1 << 20)
        yield b"\r\n--b--\r\n"

    with TestClient(create_app(settings)) as client:
        response = client.post("/embed", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert response.status_code == 413 and response.json()["code"] == "request_too_large", response.text
        assert str(2 * 1024 * 1024) in response.json()["detail"]
        _still_serving(client)


def test_many_parts_are_refused(client: TestClient) -> None:
    files = [("files", (f"{i}.png", png_bytes(i, (4, 4)), "image/png")) for i in range(65)]
    response = client.post("/embed", files=files)
    assert response.status_code == 413 and response.json()["code"] == "too_many_files"
    _still_serving(client)


def test_limits_have_safe_defaults() -> None:
    """Upload, pixel, form, metadata, batch and time limits are all set out of the box."""
    settings = Settings()
    assert settings.max_upload_bytes == 10 * 1024 * 1024
    assert settings.max_image_pixels == 2048 * 2048 and settings.max_image_side == 1024
    assert settings.max_form_fields == 256 and settings.max_metadata_bytes == 16 * 1024
    assert settings.max_metadata_depth == 8 and settings.max_metadata_keys == 256
    assert settings.max_files_per_request == 64 and settings.batch_max_size == 32
    assert settings.max_request_bytes == 64 * 1024 * 1024 and settings.body_limit == 64 * 1024 * 1024
    assert settings.request_timeout_s == 60 and settings.db_connect_timeout_s == 5
    assert settings.api_key is None and settings.cors_origins == "" and settings.host == "127.0.0.1"
