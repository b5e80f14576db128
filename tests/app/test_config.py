"""Settings from the environment, a light import, and /ready before the lifespan has run."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.config import Settings
from app.main import create_app
from tests.conftest import REPO_ROOT


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REID_DATA_DIR", "/srv/reid")
    monkeypatch.setenv("REID_PORT", "9000")
    monkeypatch.setenv("REID_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("REID_INDEX_FACTORY", "HNSW32")
    settings = Settings()
    assert settings.data_dir == Path("/srv/reid") and settings.port == 9000 and settings.index_factory == "HNSW32"
    assert settings.cors_origin_list == ["https://a.example", "https://b.example"]
    assert settings.sqlalchemy_url == "sqlite:////srv/reid/reid.db"
    assert settings.host == "127.0.0.1" and settings.api_key is None and settings.device == "auto"


@pytest.mark.parametrize(("name", "value"), [("REID_DEVICE", "tpu"), ("REID_BACKBONE", "vgg"), ("REID_PORT", "0")])
def test_bad_settings_are_named(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("REID_").lower()):
        Settings()


def test_import_builds_nothing() -> None:
    code = "import sys, app.main; assert 'app' not in vars(app.main); assert callable(app.main.serve); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    assert importlib.import_module("app.main").create_app


def test_ready_is_503_before_the_lifespan(settings: Settings) -> None:
    client = TestClient(create_app(settings))  # no `with`: the lifespan has not run
    response = client.get("/ready")
    assert response.status_code == 503 and response.json()["code"] == "not_ready"
    assert client.get("/health").json()["ready"] is False
    assert client.get("/gallery").status_code == 503


def test_openapi_documents_every_field(settings: Settings) -> None:
    schema = create_app(settings).openapi()
    for name, component in schema["components"]["schemas"].items():
        if name.startswith(("Body_", "HTTPValidationError", "ValidationError")):
            continue
        for field, spec in component.get("properties", {}).items():
            assert spec.get("description"), f"{name}.{field} has no description"
