"""Start-up fails loudly: anything but an unreachable database stops the process with the reason logged and a
non-zero exit (an orchestrator restarts it, the operator reads why); a database that is down is retried."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import make_url

from app.config import Settings
from app.main import create_app
from tests.app.conftest import _postgres_schema_url, png_bytes
from tests.app.server import Server, free_port
from tests.app.test_faults import TcpProxy
from tests.conftest import REPO_ROOT


def test_a_foreign_model_stops_the_process_with_the_reason(
    tmp_path: Path, small_weights: Path, small_weights_no_mask: Path
) -> None:
    data_dir = tmp_path / "data"
    server = Server(data_dir, small_weights, tmp_path / "first.log")
    try:
        server.start()
        files = {"files": ("a.png", png_bytes(1), "image/png")}
        assert httpx.post(f"{server.url}/gallery", files=files, data={"identity": "a"}).status_code == 201
    finally:
        server.stop()
    other = Server(data_dir, small_weights_no_mask, tmp_path / "second.log")
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(free_port())]
    done = subprocess.run(command, cwd=REPO_ROOT, env=other.env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "fingerprint" in done.stderr and "reid-admin reembed" in done.stderr, done.stderr[-3000:]


def test_a_missing_weights_file_stops_the_process_with_one_sentence(tmp_path: Path) -> None:
    """Compose fixes REID_WEIGHTS: a stack started before the file is copied must say so, not print a traceback."""
    server = Server(tmp_path / "data", tmp_path / "weights" / "reid.safetensors", tmp_path / "server.log")
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(free_port())]
    done = subprocess.run(command, cwd=REPO_ROOT, env=server.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"start-up failed: weights file {tmp_path}/weights/reid.safetensors does not exist" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize(
    ("update", "error", "message"),
    [
        ({"index_factory": "IVF4096,PQ64"}, ValueError, "unsupported index factory 'IVF4096,PQ64'; choose Flat"),
        ({"index_factory": "IVF8", "index_nprobe": 32}, ValueError, "REID_INDEX_NPROBE=32 is more than the 8 lists"),
    ],
)
def test_a_setting_that_cannot_work_fails_start_up(settings: Settings, update: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message), TestClient(create_app(settings.model_copy(update=update))):
        pass


def test_a_data_folder_that_is_not_writable_fails_start_up(settings: Settings) -> None:
    # Root ignores file modes, so the unwritable place is a folder's name taken by a file.
    settings.data_dir.mkdir(parents=True)
    (settings.data_dir / "crops").write_bytes(b"a file where the crops folder goes")
    with pytest.raises(FileExistsError), TestClient(create_app(settings)):
        pass


def test_a_second_process_on_the_same_sqlite_folder_is_refused(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").status_code == 200
        with pytest.raises(RuntimeError, match="SQLite is a single-process store"), TestClient(create_app(settings)):
            pass
        assert client.get("/ready").status_code == 200  # the first one serves on


@pytest.mark.postgres
def test_a_failure_after_the_database_comes_back_still_stops_the_process(
    settings: Settings, small_weights: Path, small_weights_no_mask: Path, tmp_path: Path
) -> None:
    """The database is down at start-up (retried, 503 meanwhile); once it answers, the gallery turns out to
    belong to other weights: the process exits non-zero with the reason, instead of staying unready for ever."""
    for url in _postgres_schema_url():
        with TestClient(create_app(settings.model_copy(update={"database_url": url}))) as client:
            files = {"files": ("a.png", png_bytes(1), "image/png")}
            assert client.post("/gallery", files=files, data={"identity": "a"}).status_code == 201
        parsed = make_url(url)
        proxy = TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432))  # not started: nothing listens
        proxied = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        other = Server(tmp_path / "other", small_weights_no_mask, tmp_path / "other.log", REID_DATABASE_URL=proxied)
        other.env["REID_DB_CONNECT_TIMEOUT_S"] = "1"
        command = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(free_port())]
        with other.log.open("w") as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=other.env, stdout=log, stderr=log)
        try:
            for _ in range(1200):  # torch imported, the opener retrying the database
                if process.poll() is not None or "database unreachable at start-up" in other.log.read_text():
                    break
                time.sleep(0.1)
            proxy.start()
            process.wait(120)
        finally:
            proxy.stop()
            if process.poll() is None:
                process.kill()
                process.wait()
        output = other.log.read_text()
        assert process.returncode == 1, output[-3000:]
        assert "start-up failed" in output and "reid-admin reembed" in output, output[-3000:]
