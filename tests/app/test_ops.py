"""Operations and limits: /ready costs O(1) (no read of every id), the API key is an OpenAPI security scheme
when set, /health names the backend, and a request's decoded pixels have a limit."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.backends.select import fastest
from app.config import Settings
from app.gallery import mismatch_message
from app.main import create_app
from tests.app.conftest import png_bytes


def test_ready_reads_no_ids(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        client.post("/gallery", files={"files": ("a.png", png_bytes(1), "image/png")}, data={"identity": "a"})
        gallery = client.app.state.reid.gallery

        def forbidden(*args: object) -> None:
            raise AssertionError("a readiness probe read every id")

        gallery.db_ids = forbidden
        gallery.index.ids = forbidden
        for _ in range(3):
            assert client.get("/ready").json() == {"ready": True}


def test_api_key_is_a_documented_security_scheme_only_when_set(settings: Settings) -> None:
    keyed = create_app(settings.model_copy(update={"api_key": "7c0e5d2a9b4f1e36"})).openapi()
    assert keyed["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "REID_API_KEY, when it is set",
    }
    paths = keyed["paths"]
    assert paths["/query"]["post"]["security"] == [{"APIKeyHeader": []}]
    assert paths["/ready"]["get"]["security"] == [{"APIKeyHeader": []}]
    assert "security" not in paths["/health"]["get"]
    open_schema = create_app(settings).openapi()
    assert "securitySchemes" not in open_schema.get("components", {})
    assert all("security" not in op for ops in open_schema["paths"].values() for op in ops.values())


def test_health_names_backend_and_fingerprint(settings: Settings) -> None:
    default_candidates = Settings.model_fields["backend_candidates"].default
    with TestClient(create_app(settings.model_copy(update={"backend_candidates": default_candidates}))) as client:
        health = client.get("/health").json()
        embedder = client.app.state.reid.embedder
        assert health["backend"] == embedder.backend.name
        assert health["fingerprint"] == embedder.fingerprint and len(health["fingerprint"]) == 64
        # auto on a CPU with no crops yet: the fp32 runtimes timed, the fastest serving; bf16 and INT8 wait for crops.
        extractor = health["backends"]["extractor"]
        assert set(extractor["auto_timings_ms"]) == {"onnxruntime", "openvino"}
        assert extractor["kind"] == fastest(extractor["auto_timings_ms"])
        assert extractor["parity"]["ok"] and extractor["parity"]["check_set"] == "4 seeded noise inputs"
        assert set(extractor["refused"]) == {"openvino-bf16", "onnxruntime-int8", "openvino-int8"}
        assert health["backends"]["mask_generator"]["name"] == embedder.mask_backend.name


def test_request_pixel_limit(settings: Settings) -> None:
    # Each crop is 32x64 = 2048 pixels: two fit in 5000, the third does not.
    with TestClient(create_app(settings.model_copy(update={"max_request_pixels": 5000}))) as client:
        files = [("files", (f"{i}.png", png_bytes(i), "image/png")) for i in range(3)]
        response = client.post("/embed", files=files)
        assert response.status_code == 413 and response.json()["code"] == "request_too_many_pixels"
        assert "2.png" in response.json()["detail"]
        assert client.post("/embed", files=files[:2]).status_code == 200


def test_a_gallery_reembedded_under_other_weights_answers_503_with_the_way_out(settings: Settings) -> None:
    """A replica still running the old weights after another re-embedded the gallery: no 500, no matches."""
    with TestClient(create_app(settings)) as client:
        client.post("/gallery", files={"files": ("a.png", png_bytes(1), "image/png")}, data={"identity": "a"})
        gallery = client.app.state.reid.gallery
        gallery.failure = mismatch_message("a" * 64, "b" * 64)
        answer = client.post("/query", files={"file": ("q.png", png_bytes(2), "image/png")})
        assert answer.status_code == 503
        assert answer.json()["code"] == "model_mismatch" and "reembed" in answer.json()["detail"]
        assert client.get("/ready").status_code == 503
