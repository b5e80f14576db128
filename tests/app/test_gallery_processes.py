"""The gallery's failures in real processes (``uvicorn app.main:app``, ``reid-admin``, ``psql``): a corrupt or
read-only database stops start-up at once with the driver's reason; a database restored behind the snapshot is
not paired with it; a stuck writer elsewhere gets writes a 503 while reads are answered; a re-embed survives a
replica deleting entries under it."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.app.conftest import png_bytes
from tests.app.server import Server
from tests.conftest import REPO_ROOT


def enrol(url: str, seed: int, identity: str) -> int:
    files = {"files": (f"{seed}.png", png_bytes(seed), "image/png")}
    response = httpx.post(f"{url}/gallery", files=files, data={"identity": identity}, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()[0]["id"]


def best_match(url: str, seed: int) -> dict:
    files = {"file": ("q.png", png_bytes(seed), "image/png")}
    response = httpx.post(f"{url}/query", files=files, data={"top_k": 1}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["matches"][0]


def exits_at_start_up(server: Server, within_s: float) -> int:
    """Start ``server`` expecting it to stop by itself; its exit status."""
    # Server.start fails the test when the process exits: that is what is expected here.
    with contextlib.suppress(pytest.fail.Exception):
        server.start()
    assert server.process is not None
    return server.process.wait(within_s)


@pytest.mark.parametrize("damage", ["corrupt", "read-only"])
def test_a_corrupt_or_read_only_database_stops_start_up_with_the_reason(
    tmp_path: Path, small_weights: Path, damage: str
) -> None:
    data = tmp_path / "data"
    first = Server(data, small_weights, tmp_path / "first.log")
    first.start()
    enrol(first.url, 1, "a")
    first.stop()
    database = data / "reid.db"
    env = {}
    if damage == "corrupt":
        database.write_bytes(b"garbage " * 4096)  # what a disk or a bad copy leaves
        reason = "file is not a database"
    else:
        (data / "gallery.faiss").unlink()  # a start that has to write (rebuild, snapshot, epoch)
        env["REID_DATABASE_URL"] = f"sqlite:///file:{database}?mode=ro&uri=true"
        reason = "readonly database"
    server = Server(data, small_weights, tmp_path / "server.log", REID_LOG_LEVEL="INFO", **env)
    started = time.monotonic()
    status = exits_at_start_up(server, 60)
    log = server.log.read_text()
    assert status != 0 and reason in log, log[-2000:]
    assert "retrying" not in log  # not taken for a network blip
    assert time.monotonic() - started < 60


def test_a_database_restored_behind_the_snapshot_is_not_paired_with_it(tmp_path: Path, small_weights: Path) -> None:
    """The review's reproduction: a backup of 20 entries, 5 more snapshotted, the backup restored and 5 other
    people enrolled into it elsewhere (ids 21-25 again), then the first data folder started."""
    database = tmp_path / "reid.db"
    url = f"sqlite:///{database}"
    original = Server(tmp_path / "a", small_weights, tmp_path / "a.log", REID_DATABASE_URL=url)
    original.start()
    for seed in range(20):
        enrol(original.url, seed, f"alice{seed}")
    shutil.copy(database, tmp_path / "backup.db")  # SQLite's WAL is off: the file is the database
    assert [enrol(original.url, seed, f"alice{seed}") for seed in range(20, 25)] == [21, 22, 23, 24, 25]
    original.stop()  # a clean stop writes the snapshot: watermark 25
    shutil.copy(tmp_path / "backup.db", database)
    elsewhere = Server(tmp_path / "b", small_weights, tmp_path / "b.log", REID_DATABASE_URL=url)
    elsewhere.start()
    assert [enrol(elsewhere.url, seed, f"bob{seed}") for seed in range(100, 105)] == [21, 22, 23, 24, 25]
    elsewhere.stop()

    original.start()
    try:
        match = best_match(original.url, 20)  # alice's crop first enrolled as 21, lost with the restore
        assert not (match["id"] == 21 and match["distance"] < 1e-3), match
        match = best_match(original.url, 100)
        assert match["id"] == 21 and match["identity"] == "bob100" and match["distance"] < 1e-3
    finally:
        original.stop()
    assert "restored from a backup" in original.log.read_text()


@pytest.mark.postgres
def test_a_stuck_writer_elsewhere_gets_writes_a_503_and_reads_are_answered(tmp_path: Path, small_weights: Path) -> None:
    from app.db import WRITE_LOCK
    from tests.app.conftest import POSTGRES_URL, _postgres_schema_url

    schema = _postgres_schema_url()
    url = next(schema)
    server = Server(tmp_path / "data", small_weights, tmp_path / "server.log", REID_DATABASE_URL=url,
                    REID_WRITE_LOCK_TIMEOUT_S="1")  # fmt: skip
    psql = None
    try:
        server.start()
        enrol(server.url, 1, "a")
        dsn = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
        psql = subprocess.Popen(
            ["psql", dsn, "-v", "ON_ERROR_STOP=1", "-c", f"SELECT pg_advisory_lock({WRITE_LOCK}), pg_sleep(60)"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # psql holds the lock
        assert psql.poll() is None, psql.stderr.read() if psql.stderr else ""
        files = {"files": ("2.png", png_bytes(2), "image/png")}
        started = time.monotonic()
        response = httpx.post(f"{server.url}/gallery", files=files, data={"identity": "b"}, timeout=30)
        assert response.status_code == 503 and response.json()["code"] == "write_busy", response.text
        assert response.headers["Retry-After"] and time.monotonic() - started < 10
        assert best_match(server.url, 1)["identity"] == "a"  # reads go on
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # busy is not dead
        # psql gone, its backend would sleep on: what an operator does to a stuck session.
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE :q AND pid <> pg_backend_pid()"
                ),
                {"q": f"%pg_advisory_lock({WRITE_LOCK})%"},
            )
        engine.dispose()
        psql.wait(30)
        assert enrol(server.url, 2, "b") == 2  # the writer gone, writes work again
    finally:
        if psql is not None and psql.poll() is None:
            psql.kill()
        server.stop()
        next(schema, None)


@pytest.mark.postgres
def test_reembed_skips_entries_a_replica_deletes_while_it_runs(
    tmp_path: Path, small_weights: Path, small_weights_no_mask: Path
) -> None:
    from tests.app.conftest import _postgres_schema_url

    schema = _postgres_schema_url()
    url = next(schema)
    server = Server(tmp_path / "data", small_weights, tmp_path / "server.log", REID_DATABASE_URL=url)
    try:
        server.start()
        ids = [enrol(server.url, seed, f"p{seed}") for seed in range(120)]
        deleted: list[int] = []
        stop = threading.Event()

        def delete_while_reembedding() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for entry_id in reversed(ids):
                    if stop.is_set() or client.delete(f"/gallery/{entry_id}").status_code != 200:
                        return  # the switch makes this replica's weights stale: it stops writing
                    deleted.append(entry_id)
                    time.sleep(0.02)

        deleter = threading.Thread(target=delete_while_reembedding)
        deleter.start()
        env = {
            **server.env,
            "REID_WEIGHTS": str(small_weights_no_mask),
            "REID_BACKEND": "torch",
            "REID_LOG_LEVEL": "INFO",
        }
        try:
            result = subprocess.run(
                [sys.executable, "-m", "app.admin", "reembed", "--batch-size", "2"],
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
        finally:
            stop.set()
            deleter.join(60)
        assert result.returncode == 0, result.stderr[-3000:]
        assert deleted, "no entry was deleted while the re-embed ran"
        assert "re-embedded" in result.stderr
        engine = create_engine(url)
        with engine.connect() as connection:
            left = connection.scalar(text("SELECT count(*) FROM reid_entries"))
            pending = connection.scalar(text("SELECT count(*) FROM reid_entries WHERE embedding_next IS NOT NULL"))
            switched = connection.scalar(text("SELECT count(*) FROM reid_changes WHERE op = 'reembed'"))
        engine.dispose()
        assert left == len(ids) - len(deleted) and pending == 0 and switched == 1
    finally:
        server.stop()
        next(schema, None)


@pytest.mark.postgres
def test_a_replica_running_through_a_postgres_restore_rebuilds_and_says_so(tmp_path: Path, small_weights: Path) -> None:
    """Two replicas on one PostgreSQL database; the database is restored to a backup of 20 entries under them and
    other people enrolled into it (ids 21-25 again). The replica that served the lost entries must not pair them
    with the new names: /ready fails at once, then it rebuilds, counts it in /metrics and answers right."""
    from tests.app.conftest import _postgres_schema_url
    from tests.app.test_gallery_binding import restore

    schema = _postgres_schema_url()
    url = next(schema)
    first = Server(tmp_path / "a", small_weights, tmp_path / "a.log", REID_DATABASE_URL=url, REID_REPLICA_POLL_S="0.2")
    second = Server(tmp_path / "b", small_weights, tmp_path / "b.log", REID_DATABASE_URL=url, REID_REPLICA_POLL_S="0.2")
    try:
        first.start()
        second.start()
        assert [enrol(first.url, seed, f"alice{seed}") for seed in range(25)][-1] == 25
        restore(url, entries=20, changes=20)
        assert httpx.get(f"{first.url}/ready", timeout=10).status_code == 503  # before anything else happens
        assert [enrol(second.url, seed, f"bob{seed}") for seed in range(100, 105)] == [21, 22, 23, 24, 25]
        deadline = time.monotonic() + 60
        while httpx.get(f"{first.url}/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the replica never rebuilt after the restore"
            time.sleep(0.2)
        match = best_match(first.url, 103)
        assert (match["id"], match["identity"]) == (24, "bob103") and match["distance"] < 1e-3
        assert not (best_match(first.url, 23)["id"] == 24 and best_match(first.url, 23)["distance"] < 1e-3)
        metrics = httpx.get(f"{first.url}/metrics", timeout=10).text
        assert "reid_gallery_resyncs 1.0" in metrics, metrics[-2000:]
    finally:
        first.stop()
        second.stop()
        next(schema, None)
    assert "restored from a backup" in first.log.read_text() or "rebuild" in first.log.read_text()
