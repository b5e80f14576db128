"""Liveness (``/health``) fails when the process needs a restart, and only then: a database that failed for good,
the gallery's worker stopped, or a thread pool with no thread to give. Busy is not dead."""

from __future__ import annotations

import threading
import time

import anyio.to_thread
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.app.conftest import png_bytes


def enrol(client: TestClient, seed: int) -> None:
    files = {"files": (f"{seed}.png", png_bytes(seed), "image/png")}
    assert client.post("/gallery", files=files, data={"identity": "a"}).status_code == 201


def test_a_database_that_fails_for_good_fails_liveness(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        enrol(client, 1)
        assert client.get("/health").status_code == 200
        (settings.data_dir / "reid.db").write_bytes(b"garbage " * 4096)  # the disk under the database went bad
        response = client.get("/gallery")
        assert response.status_code == 503 and response.json()["code"] == "database_failed", response.text
        assert "not a database" in response.json()["detail"] or "malformed" in response.json()["detail"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["code"] == "not_live"
        assert "database failed" in health.json()["detail"]


def test_a_stopped_gallery_worker_fails_liveness(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").status_code == 200
        worker = client.app.state.reid.gallery.worker
        worker.heartbeat = time.monotonic() - 3600  # its loop has not turned for an hour
        health = client.get("/health")
        assert health.status_code == 503 and "background worker" in health.json()["detail"]
        worker.heartbeat = time.monotonic()
        worker.fatal = "database or disk is full"
        health = client.get("/health")
        assert health.status_code == 503 and "disk is full" in health.json()["detail"]


def test_an_exhausted_thread_pool_fails_liveness(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    with TestClient(create_app(settings)) as client:
        gallery = client.app.state.reid.gallery
        release = threading.Event()
        original = gallery.list

        def stuck(*args, **kwargs):  # a database call that never returns
            release.wait(60)
            return original(*args, **kwargs)

        monkeypatch.setattr(gallery, "list", stuck)

        async def one_thread() -> None:
            anyio.to_thread.current_default_thread_limiter().total_tokens = 1

        client.portal.call(one_thread)
        blocked = threading.Thread(target=lambda: client.get("/gallery"))
        blocked.start()
        try:
            time.sleep(0.5)
            started = time.monotonic()
            health = client.get("/health")
            assert health.status_code == 503 and "thread pool is exhausted" in health.json()["detail"]
            assert time.monotonic() - started < 10
        finally:
            release.set()
            blocked.join(30)
        assert client.get("/health").status_code == 200
