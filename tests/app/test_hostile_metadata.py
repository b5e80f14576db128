"""A gallery one request can't break (issue 24): each poison payload is refused at the door with a 422 and a
sentence, nothing is stored, and every read afterwards still answers 200; forms are bounded while they are
parsed; an image larger than needed is downscaled before it is stored. SQLite and PostgreSQL in process, and
the payloads that used to answer 500 once more through a real uvicorn process."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.types import Message

from app.api.inputs import MetadataLimits, check_camera, check_identity, parse_metadata
from app.config import Settings
from app.errors import ApiError
from app.main import create_app
from tests.app.conftest import png_bytes
from tests.app.server import Server

GOOD = {"site": "A", "n": 2**53 - 1, "nested": {"a": {"b": {"c": {"d": {"e": {"f": [1.5, "x"]}}}}}}}  # 8 deep

# (name, form fields, code): each POST /gallery with one valid crop and these fields.
POISON = [
    ("object 300 deep", {"identity": "p", "metadata": '{"a":' * 300 + "1" + "}" * 300}, "invalid_metadata"),
    ("lone surrogate", {"identity": "p", "metadata": '{"x": "\\ud800"}'}, "invalid_metadata"),
    ("lone surrogate key", {"identity": "p", "metadata": '{"\\udc00": 1}'}, "invalid_metadata"),
    ("5000-digit integer", {"identity": "p", "metadata": '{"x": ' + "7" * 5000 + "}"}, "invalid_metadata"),
    ("array 2000 deep", {"identity": "p", "metadata": '{"x": ' + "[" * 2000 + "]" * 2000 + "}"}, "invalid_metadata"),
    ("NaN", {"identity": "p", "metadata": '{"x": NaN}'}, "invalid_metadata"),
    ("-Infinity", {"identity": "p", "metadata": '{"x": -Infinity}'}, "invalid_metadata"),
    ("1e400", {"identity": "p", "metadata": '{"x": 1e400}'}, "invalid_metadata"),
    ("2**53", {"identity": "p", "metadata": json.dumps({"x": 2**53})}, "invalid_metadata"),
    ("repeated key", {"identity": "p", "metadata": '{"x": 1, "x": 2}'}, "invalid_metadata"),
    ("257 keys", {"identity": "p", "metadata": json.dumps({f"k{i}": i for i in range(257)})}, "invalid_metadata"),
    ("17 KiB", {"identity": "p", "metadata": json.dumps({"x": "y" * 17_000})}, "invalid_metadata"),
    ("NUL in identity", {"identity": "a\x00b"}, "invalid_identity"),
    ("escape in identity", {"identity": "a\x1b[31mb"}, "invalid_identity"),
    ("blank identity", {"identity": " \t "}, "invalid_identity"),
    ("NUL in camera", {"identity": "p", "camera": "c\x001"}, "invalid_camera"),
]
# The ones that answered 500 (or committed, then failed every read) before the door checked them.
WERE_500 = ["object 300 deep", "lone surrogate", "5000-digit integer", "array 2000 deep", "NaN", "NUL in identity"]


def _crop() -> dict:
    return {"files": ("p.png", png_bytes(7), "image/png")}


def _assert_refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == code and problem["status"] == status, problem
    assert len(problem["detail"]) > 20 and "Traceback" not in response.text, problem  # a sentence, never a trace


def _reads_still_answer(client: TestClient | httpx.Client, entries: int) -> None:
    listed = client.get("/gallery")
    assert listed.status_code == 200 and listed.json()["total"] == entries, listed.text
    for item in listed.json()["items"]:
        assert client.get(f"/gallery/{item['id']}").status_code == 200
    assert client.get("/identities").status_code == 200


def test_poison_payloads_are_refused_and_nothing_is_stored(settings: Settings, database_url: str | None) -> None:
    settings = settings.model_copy(update={"database_url": database_url})
    with TestClient(create_app(settings)) as client:
        good = client.post("/gallery", files=_crop(), data={"identity": "ok", "metadata": json.dumps(GOOD)})
        assert good.status_code == 201, good.text
        assert good.json()[0]["metadata"] == GOOD  # at the limits (8 deep, 2**53 - 1) is still accepted
        for name, form, code in POISON:
            response = client.post("/gallery", files=_crop(), data=form)
            assert response.status_code == 422, f"{name}: {response.text}"
            _assert_refused(response, 422, code)
            _reads_still_answer(client, 1)
        # Identities and cameras that come in elsewhere: filters and paths (PostgreSQL refuses NUL in text).
        _assert_refused(client.get("/gallery", params={"identity": "a\x00b"}), 422, "invalid_identity")
        _assert_refused(client.delete("/identities/a%00b"), 422, "invalid_identity")
        for field in ("camera", "cameras", "exclude_cameras"):
            query = client.post("/query", files={"file": ("q.png", png_bytes(8), "image/png")}, data={field: "c\x00"})
            _assert_refused(query, 422, "invalid_camera")
        assert client.get("/gallery", params={"identity": "ok"}).json()["total"] == 1
        _reads_still_answer(client, 1)
        assert client.get("/ready").status_code == 200


def test_payloads_that_were_500s_are_422s_in_a_real_server(tmp_path: Path, small_weights: Path) -> None:
    server = Server(tmp_path / "data", small_weights, tmp_path / "server.log", REID_BACKEND="torch")
    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            poison = {name: (form, code) for name, form, code in POISON}
            for name in WERE_500:
                form, code = poison[name]
                _assert_refused(http.post("/gallery", files=_crop(), data=form), 422, code)
            # 2,000 tiny parts: refused while the form is parsed, and the process goes on serving.
            parts = [("files", (f"{i}.png", b"x", "image/png")) for i in range(2000)]
            _assert_refused(http.post("/embed", files=parts), 413, "too_many_files")
            _reads_still_answer(http, 0)
            assert http.post("/gallery", files=_crop(), data={"identity": "ok"}).status_code == 201
            _reads_still_answer(http, 1)
        assert server.process is not None and server.process.poll() is None
    finally:
        server.stop()
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def _multipart(boundary: str, parts: list[tuple[str, str | None, bytes]]) -> list[bytes]:
    """Each (field, filename or None, body) as its own chunk of a multipart body."""
    chunks = []
    for field, filename, body in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        chunks.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + body + b"\r\n")
    return chunks


def _send_streamed(client: TestClient, path: str, chunks: list[bytes], boundary: str) -> tuple[int, dict, int]:
    """POST ``chunks`` to the app one ASGI message each, as a slow client would: (status, body, how many chunks
    the app had read when it answered). TestClient itself hands the app the whole body at once."""
    read = 0
    closed = False
    answer: dict = {"status": 0, "body": b""}

    async def receive() -> Message:
        nonlocal read, closed
        if read < len(chunks):
            read += 1
            return {"type": "http.request", "body": chunks[read - 1], "more_body": True}
        if not closed:
            closed = True
            return {"type": "http.request", "body": f"--{boundary}--\r\n".encode(), "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        elif message["type"] == "http.response.body":
            answer["body"] += message.get("body", b"")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"content-type", f"multipart/form-data; boundary={boundary}".encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "state": {},
    }
    assert client.portal is not None
    client.portal.call(client.app, scope, receive, send)
    return answer["status"], json.loads(answer["body"]), read


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, small_weights: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("bounded"), weights=small_weights, device="cpu", backend="torch"
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_too_many_file_parts_are_refused_while_the_form_streams_in(client: TestClient) -> None:
    chunks = _multipart("b0undary", [("files", f"{i}.png", b"x") for i in range(2000)])
    status, problem, read = _send_streamed(client, "/embed", chunks, "b0undary")
    assert status == 413 and problem["code"] == "too_many_files", problem
    assert "REID_MAX_FILES_PER_REQUEST" in problem["detail"]
    assert read <= 65 + 1, f"the parser read {read} of 2000 parts before refusing"  # the 65th file is one too many


def test_too_many_text_fields_are_refused_while_the_form_streams_in(client: TestClient) -> None:
    chunks = _multipart("b0undary", [("file", "q.png", png_bytes(1))] + [("cameras", None, b"c1")] * 2000)
    status, problem, read = _send_streamed(client, "/query", chunks, "b0undary")
    assert status == 413 and problem["code"] == "too_many_fields", problem
    assert read <= 1 + 256 + 1, f"the parser read {read} of 2001 parts before refusing"


def test_oversized_text_field_is_refused(client: TestClient) -> None:
    huge = json.dumps({"x": "y" * 100_000})  # over 4 x REID_MAX_METADATA_BYTES: the parser stops reading it
    response = client.post("/gallery", files=_crop(), data={"identity": "p", "metadata": huge})
    _assert_refused(response, 413, "form_field_too_large")
    _reads_still_answer(client, 0)


def test_large_image_is_downscaled_before_it_is_stored(client: TestClient) -> None:
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (1500, 600, 3), dtype=np.uint8))  # 600 x 1500
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    response = client.post(
        "/gallery", files={"files": ("big.png", buffer.getvalue(), "image/png")}, data={"identity": "big"}
    )
    assert response.status_code == 201, response.text
    [entry] = response.json()
    assert (entry["width"], entry["height"]) == (410, 1024)  # longer side to REID_MAX_IMAGE_SIDE, aspect kept
    stored = Image.open(io.BytesIO(client.get(f"/gallery/{entry['id']}/image").content))
    assert stored.size == (410, 1024)
    client.delete(f"/gallery/{entry['id']}")


def test_identities_come_in_pages_by_default(client: TestClient) -> None:
    [limit] = [
        p
        for p in client.get("/openapi.json").json()["paths"]["/identities"]["get"]["parameters"]
        if p["name"] == "limit"
    ]
    assert limit["schema"]["default"] == 100 and limit["schema"]["maximum"] == 1000
    assert "x-total-count" in client.get("/identities").headers


LIMITS = MetadataLimits(max_bytes=16 * 1024, max_depth=8, max_keys=256)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"a":' * 9 + "1" + "}" * 9, "nests 9 levels deep: at most 8"),
        ('{"x": "[[[[[[[[[[[["} ' + "[" * 8, "must be a JSON object"),  # brackets in strings do not count
        ('{"x": Infinity}', "Infinity"),
        ('{"x": -9007199254740992}', r"beyond \+-\(2\*\*53 - 1\)"),
        ('{"x": "\\udfff"}', "lone surrogate"),
        ("[1, 2]", "must be a JSON object"),
        ("", None),
    ],
)
def test_parse_metadata(text: str, match: str | None) -> None:
    if match is None:
        assert parse_metadata(text, LIMITS) == {}
        return
    with pytest.raises(ApiError, match=match) as refused:
        parse_metadata(text, LIMITS)
    assert refused.value.status == 422 and refused.value.code == "invalid_metadata"


def test_labels_are_printable_text() -> None:
    assert check_identity("0001 Ünïcode 人") == "0001 Ünïcode 人" and check_camera("") == ""
    for bad, match in [("a\x00b", "U\\+0000"), ("\ud800", "lone surrogate"), ("a\x85", "U\\+0085"), ("x" * 201, "201")]:
        with pytest.raises(ApiError, match=match):
            check_identity(bad)
    with pytest.raises(ApiError, match="at most 100"):
        check_camera("c" * 101)
