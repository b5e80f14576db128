"""Two replicas in step through PostgreSQL: two ``uvicorn app.main:app`` processes on one database schema (and
one shared data folder, as docs/DEPLOY.md deploys them). A change through one is seen by the other within 1 s
(LISTEN/NOTIFY); a replica killed while the other writes catches up from its watermark when it restarts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, select

from app.db import Entry
from tests.app.conftest import _postgres_schema_url, png_bytes
from tests.app.server import Server

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
PROPAGATION_S = 1.0  # the bound for a change to reach the other replica


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from _postgres_schema_url()


def _top(url: str, seed: int) -> int | None:
    files = {"file": ("q.png", png_bytes(seed), "image/png")}
    matches = httpx.post(f"{url}/query", files=files, data={"top_k": 1}, timeout=30).json()["results"][0]["matches"]
    return matches[0]["id"] if matches else None


def _enroll(url: str, seed: int) -> int:
    files = {"files": (f"{seed}.png", png_bytes(seed), "image/png")}
    response = httpx.post(f"{url}/gallery", files=files, data={"identity": f"p{seed}"}, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()[0]["id"]


def _within(seconds: float, condition) -> float | None:
    """Seconds until ``condition()`` held, or None if it did not within ``seconds``."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > seconds:
            return None
        time.sleep(0.02)


# The default, and a snapshot every few changes: a restart then replays from a snapshot, not only rebuilds.
@pytest.mark.parametrize("snapshot_every", ["10000", "3"])
def test_two_replicas_stay_in_step(tmp_path: Path, small_weights: Path, postgres_url: str, snapshot_every: str) -> None:
    data_dir = tmp_path / "data"
    # NOTIFY, not the poll, must be in time.
    env = {"REID_DATABASE_URL": postgres_url, "REID_REPLICA_POLL_S": "5", "REID_SNAPSHOT_EVERY": snapshot_every}
    a = Server(data_dir, small_weights, tmp_path / "a.log", **env)
    b = Server(data_dir, small_weights, tmp_path / "b.log", **env)
    try:
        a.start()
        b.start()
        # Enrolled through A: found by B.
        first = _enroll(a.url, 1)
        assert _within(PROPAGATION_S, lambda: _top(b.url, 1) == first) is not None, "B did not see A's enrolment"
        second = _enroll(b.url, 2)
        assert _within(PROPAGATION_S, lambda: _top(a.url, 2) == second) is not None, "A did not see B's enrolment"
        # Deleted through B: A stops returning it.
        assert httpx.delete(f"{b.url}/gallery/{first}", timeout=30).status_code == 200
        assert _within(PROPAGATION_S, lambda: _top(a.url, 1) != first) is not None, "A still returns a deleted entry"

        # SIGKILL B while A keeps writing, then restart B.
        stop, written, errors = threading.Event(), [], []

        def writer() -> None:
            seed = 100
            while not stop.is_set():
                try:
                    written.append(_enroll(a.url, seed))
                    if seed % 3 == 0:
                        assert httpx.delete(f"{a.url}/gallery/{written[-2]}", timeout=30).status_code == 200
                except Exception as exc:  # reported below
                    errors.append(repr(exc))
                    return
                seed += 1

        thread = threading.Thread(target=writer)
        thread.start()
        assert _within(60, lambda: len(written) >= 5 or errors) is not None and not errors, errors
        b.kill()
        assert _within(60, lambda: len(written) >= 15 or errors) is not None and not errors, errors
        b.start()
        assert _within(60, lambda: len(written) >= 20 or errors) is not None and not errors, errors
        stop.set()
        thread.join(60)
        assert not errors, errors

        engine = create_engine(postgres_url)
        with engine.connect() as connection:
            db = dict(connection.execute(select(Entry.id, Entry.identity)).all())
        engine.dispose()
        for server in (a, b):
            size = lambda server=server: httpx.get(f"{server.url}/health", timeout=30).json()["gallery_size"]  # noqa: E731
            assert _within(10, lambda size=size: size() == len(db)) is not None, (server.url, size(), len(db))
            assert httpx.get(f"{server.url}/ready", timeout=30).status_code == 200
            for entry_id, identity in db.items():
                assert _top(server.url, int(identity[1:])) == entry_id
    finally:
        a.stop()
        b.stop()
