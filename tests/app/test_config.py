"""Settings from the environment, a light import, /ready before the lifespan has run, and the refusal to start
without a usable API key or the explicit opt-out."""

from __future__ import annotations

import importlib
import os
import re
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


# ---- authentication: a key, or an explicit opt-out ----------------------------------------------------------

GOOD_KEY = "9f2c4e7a1b3d5f60"  # 16 characters, as few as allowed


@pytest.fixture
def no_auth_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The environment of a shell that says nothing about authentication (the tests' own opt-out removed)."""
    monkeypatch.delenv("REID_API_KEY", raising=False)
    monkeypatch.delenv("REID_ALLOW_UNAUTHENTICATED", raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("value", "said"),
    [(None, "REID_API_KEY is not set"), ("", "REID_API_KEY is empty"), ("   ", "REID_API_KEY is empty")],
    ids=["unset", "empty", "blank"],
)
def test_no_key_and_no_opt_out_refuses_to_start_and_says_how(
    no_auth_env: pytest.MonkeyPatch, value: str | None, said: str
) -> None:
    if value is not None:
        no_auth_env.setenv("REID_API_KEY", value)
    with pytest.raises(ValidationError, match=said) as caught:
        Settings()
    message = str(caught.value)
    assert "openssl rand -hex 32" in message and "REID_ALLOW_UNAUTHENTICATED=true" in message
    if value == "":
        assert "does not turn authentication off" in message


@pytest.mark.parametrize("value", ["", "   "], ids=["empty", "blank"])
def test_an_empty_key_with_the_opt_out_is_no_key(no_auth_env: pytest.MonkeyPatch, value: str) -> None:
    no_auth_env.setenv("REID_API_KEY", value)
    no_auth_env.setenv("REID_ALLOW_UNAUTHENTICATED", "true")
    settings = Settings()
    assert settings.api_key is None and settings.auth == "disabled"


@pytest.mark.parametrize(
    ("key", "said"),
    [
        ("change-me", "placeholder ('change-me')"),
        ("changeme", "placeholder"),
        ("CHANGE_ME", "placeholder"),
        ("secret", "placeholder"),
        ("password", "placeholder"),
        ("test", "placeholder"),
        ("your-api-key", "placeholder"),
        ("please-change-me-before-production", "placeholder (it holds 'changeme')"),
        ("0a7f3c9e5b1d-example-2e4c6a8f", "placeholder (it holds 'example')"),
        ("3f9a1c7e2b", "has 10 characters, fewer than 16"),
        ("aaaaaaaaaaaaaaaaaaaaaaaa", "only 1 distinct characters"),
        ("0123456789abcdef 0123", "printable ASCII"),
        ("0123456789abcdéf", "printable ASCII"),
    ],
)
def test_a_weak_key_refuses_to_start(no_auth_env: pytest.MonkeyPatch, key: str, said: str) -> None:
    no_auth_env.setenv("REID_API_KEY", key)
    with pytest.raises(ValidationError, match=re.escape(said)) as caught:
        Settings()
    if not said.startswith("placeholder") or "holds" in said:  # only a well-known placeholder is echoed
        assert key not in str(caught.value)


def test_a_key_and_the_opt_out_contradict_each_other(no_auth_env: pytest.MonkeyPatch) -> None:
    no_auth_env.setenv("REID_API_KEY", GOOD_KEY)
    no_auth_env.setenv("REID_ALLOW_UNAUTHENTICATED", "true")
    with pytest.raises(ValidationError, match="contradict") as caught:
        Settings()
    assert GOOD_KEY not in str(caught.value)


def test_a_good_key_is_kept_without_surrounding_blanks(no_auth_env: pytest.MonkeyPatch) -> None:
    no_auth_env.setenv("REID_API_KEY", f" {GOOD_KEY}\n")
    settings = Settings()
    assert settings.api_key == GOOD_KEY and settings.auth == "api_key"
    assert GOOD_KEY not in repr(settings)


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({}, "REID_API_KEY is not set"),
        ({"REID_API_KEY": "change-me"}, "REID_API_KEY is a placeholder ('change-me')"),
        ({"REID_API_KEY": "", "REID_PORT": "0"}, "REID_PORT: Input should be greater than or equal to 1"),
    ],
    ids=["no-key", "placeholder", "bad-port"],
)
def test_the_real_process_exits_with_the_sentence_and_no_traceback(tmp_path: Path, env: dict, said: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", "1"]  # never reached: no port opened
    out = subprocess.run(
        command, cwd=REPO_ROOT, env={**clean, "REID_DATA_DIR": str(tmp_path), **env}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("invalid REID_* settings, nothing started:") and said in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_malformed_transit_table_stops_the_start_naming_its_line(tmp_path: Path) -> None:
    table = tmp_path / "transit.csv"
    table.write_text("camera_a,camera_b,min_seconds\ngate,hall,90\nhall,lobby\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REID_")}
    env = {
        "REID_DATA_DIR": str(tmp_path / "data"),
        "REID_ALLOW_UNAUTHENTICATED": "true",
        "REID_TRANSIT_TABLE": str(table),
    }
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", "1"]  # refused before any port is opened
    out = subprocess.run(command, cwd=REPO_ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert f"start-up failed: transit table {table}, line 3: expected 3 values" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
