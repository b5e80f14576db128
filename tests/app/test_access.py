"""Access: with an API key every route but /health answers 401 without it, the key is compared in constant
time and never logged or shown, /health says whether there is one; CORS is off unless origins are configured.
Starting without a key at all: test_config.py."""

from __future__ import annotations

import hmac
import logging
import re

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.app.conftest import png_bytes

KEY = "k3y-7f1c9e2b-never-in-a-log"


def _requests(schema: dict) -> list[tuple[str, str]]:
    """(method, url) for every operation of the schema, path parameters filled, plus the docs routes."""
    out = [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"), ("GET", "/no/such/route")]
    for path, operations in schema["paths"].items():
        url = re.sub(r"\{entry_id\}", "1", re.sub(r"\{identity\}", "alice", path))
        out += [(method.upper(), url) for method in operations]
    return out


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_key": KEY, "allow_unauthenticated": False})


def test_health_says_how_requests_are_authenticated(settings: Settings, keyed: Settings) -> None:
    # The app is built, not started: /health answers before the lifespan has loaded anything.
    assert settings.allow_unauthenticated  # the tests' explicit opt-out (tests/conftest.py)
    assert TestClient(create_app(settings)).get("/health").json()["auth"] == "disabled"
    assert TestClient(create_app(keyed)).get("/health").json()["auth"] == "api_key"


def test_every_route_but_health_needs_the_key(keyed: Settings) -> None:
    with TestClient(create_app(keyed)) as client:
        requests = _requests(client.app.openapi())
        assert len(requests) >= 17  # 13 operations and the docs routes
        for method, url in requests:
            for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY[:-1]}, {"X-API-Key": KEY + "x"}):
                files = {"files": ("a.png", png_bytes(1), "image/png")} if method == "POST" else None
                response = client.request(method, url, headers=headers, files=files)
                if url == "/health":
                    assert response.status_code == 200
                    continue
                assert response.status_code == 401, (method, url, headers, response.text)
                assert response.json()["code"] == "unauthorized"
                assert response.headers["www-authenticate"] == "ApiKey"
            if url not in ("/no/such/route", "/health"):
                files = {"files": ("a.png", png_bytes(1), "image/png")} if method == "POST" else None
                response = client.request(method, url, headers={"X-API-Key": KEY}, files=files)
                assert response.status_code != 401, (method, url)
        assert client.get("/gallery").json()["code"] == "unauthorized"  # nothing was enrolled without the key


def test_key_is_compared_in_constant_time(keyed: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    compare_digest = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr("app.api.deps.hmac.compare_digest", recording)
    with TestClient(create_app(keyed)) as client:
        for url in ("/gallery", "/ready", "/metrics", "/identities", "/openapi.json"):
            assert client.get(url, headers={"X-API-Key": "guess"}).status_code == 401
            assert client.get(url, headers={"X-API-Key": KEY}).status_code == 200
    assert (b"guess", KEY.encode()) in calls and (KEY.encode(), KEY.encode()) in calls
    assert len(calls) >= 10  # every check went through hmac.compare_digest, none through ==


def test_key_is_never_logged_or_shown(keyed: Settings, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert KEY not in repr(keyed) and KEY not in str(keyed)
    with TestClient(create_app(keyed)) as client:
        headers = {"X-API-Key": KEY}
        seen = [
            client.get("/health").text,
            client.get("/metrics", headers=headers).text,
            client.get("/openapi.json", headers=headers).text,
            client.get("/gallery/123", headers=headers).text,
            client.post("/embed", headers=headers, files={"files": ("x.png", b"junk", "image/png")}).text,
            client.get("/gallery", headers={"X-API-Key": KEY + "-wrong"}).text,
        ]
    assert caplog.records  # the service did log: start-up, warnings, errors
    for text in seen + [record.getMessage() for record in caplog.records] + [caplog.text]:
        assert KEY not in text and KEY[:12] not in text


def test_cors_preflight_only_for_configured_origins(keyed: Settings) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
    with TestClient(create_app(keyed)) as client:
        response = client.options("/query", headers={"Origin": "https://example.org", **preflight})
        assert "access-control-allow-origin" not in response.headers
        assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "https://x"}).headers
    allowed = keyed.model_copy(update={"cors_origins": "https://app.example.org"})
    with TestClient(create_app(allowed)) as client:
        response = client.options("/query", headers={"Origin": "https://app.example.org", **preflight})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example.org"
        other = client.options("/query", headers={"Origin": "https://evil.example", **preflight})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        # CORS lets the browser ask; the key is still required for the request itself.
        response = client.get("/gallery", headers={"Origin": "https://app.example.org"})
        assert response.status_code == 401
        assert response.headers["access-control-allow-origin"] == "https://app.example.org"
