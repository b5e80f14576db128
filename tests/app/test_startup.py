"""Start-up fails loudly: anything but an unreachable database stops the process with the reason logged and a
non-zero exit (an orchestrator restarts it, the operator reads why); a database that is down is retried."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from tests.app.conftest import png_bytes
from tests.app.server import Server, free_port
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
