"""Crash consistency: the service as a real uvicorn process on a data folder, killed with SIGKILL at random
moments while clients enrol and delete as fast as they can; after every restart each acknowledged entry is
there, each acknowledged deletion stays deleted, the index and the database hold the same ids, and queries
find the entries. Loopback only."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from app.config import Settings
from app.db import Entry
from app.index import VectorIndex
from app.main import create_app
from tests.app.conftest import SMALL, png_bytes
from tests.app.server import Server

KILLS = 4
CLIENTS = 2


@dataclass
class Ledger:
    """What the clients were told: acknowledged entries (id -> image seed) and deletions, and what is in doubt."""

    acked: dict[int, int] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)
    sent: set[int] = field(default_factory=set)  # seeds of every enrol request, answered or not
    doubtful_deletes: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _client_loop(url: str, first_seed: int, ledger: Ledger, errors: list[str]) -> None:
    """Enrol one new image after another, deleting every fourth acknowledged entry, until the server dies."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for seed in range(first_seed, first_seed + 5000):
            with ledger.lock:
                ledger.sent.add(seed)
            try:
                response = client.post(
                    "/gallery",
                    files={"files": (f"{seed}.png", png_bytes(seed), "image/png")},
                    data={"identity": f"p{seed}"},
                )
            except httpx.TransportError:
                return  # killed mid-request: this enrolment is in doubt
            if response.status_code != 201:
                errors.append(f"enrol answered {response.status_code}: {response.text}")
                return
            [entry] = response.json()
            with ledger.lock:
                ledger.acked[entry["id"]] = seed
            if seed % 4 == 3:
                with ledger.lock:
                    victim = min(ledger.acked.keys() - ledger.deleted - ledger.doubtful_deletes)
                    ledger.doubtful_deletes.add(victim)
                try:
                    response = client.delete(f"/gallery/{victim}")
                except httpx.TransportError:
                    return  # killed mid-request: this deletion is in doubt
                if response.status_code != 200:
                    errors.append(f"delete answered {response.status_code}: {response.text}")
                    return
                with ledger.lock:
                    ledger.doubtful_deletes.discard(victim)
                    ledger.deleted.add(victim)


def _gallery(url: str) -> dict[int, str]:
    """Every entry (id -> identity), page by page."""
    entries: dict[int, str] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for offset in range(0, 100_000, 1000):
            page = client.get("/gallery", params={"offset": offset, "limit": 1000}).json()
            entries.update({e["id"]: e["identity"] for e in page["items"]})
            if offset + 1000 >= page["total"]:
                assert len(entries) == page["total"]
                return entries
    raise AssertionError("gallery paging did not end")


def _check_after_restart(url: str, ledger: Ledger, rng: random.Random) -> dict[int, str]:
    # Ready: opened on this database (its epoch, the change at the watermark), index and columns agreeing.
    assert httpx.get(f"{url}/ready", timeout=30).status_code == 200
    entries = _gallery(url)
    kept = ledger.acked.keys() - ledger.deleted - ledger.doubtful_deletes
    missing = kept - entries.keys()
    assert not missing, f"acknowledged entries lost after SIGKILL: {sorted(missing)}"
    assert not ledger.deleted & entries.keys(), "acknowledged deletions came back after SIGKILL"
    assert all(entries[i] == f"p{s}" for i, s in ledger.acked.items() if i in entries), "an entry changed"
    unknown = {i: name for i, name in entries.items() if i not in ledger.acked}
    assert all(name.startswith("p") and int(name[1:]) in ledger.sent for name in unknown.values()), unknown
    assert httpx.get(f"{url}/health", timeout=30).json()["gallery_size"] == len(entries)
    # Queries still find the entries: each crop's own image ranks it first.
    with httpx.Client(base_url=url, timeout=30) as client:
        for entry_id in rng.sample(sorted(kept), min(5, len(kept))):
            seed = ledger.acked[entry_id]
            response = client.post("/query", files={"file": ("q.png", png_bytes(seed), "image/png")}, data={"top_k": 1})
            assert response.status_code == 200, response.text
            assert response.json()["results"][0]["matches"][0]["id"] == entry_id
    return entries


# The default, and a snapshot every few changes: each restart then replays from a snapshot, not only rebuilds.
@pytest.mark.parametrize("snapshot_every", ["10000", "5"])
def test_acknowledged_entries_survive_sigkill(tmp_path: Path, small_weights: Path, snapshot_every: str) -> None:
    data_dir = tmp_path / "data"
    server = Server(data_dir, small_weights, tmp_path / "server.log", REID_SNAPSHOT_EVERY=snapshot_every)
    ledger, errors, rng = Ledger(), [], random.Random(7)
    try:
        server.start()
        for round_ in range(KILLS):
            before = len(ledger.acked)
            clients = [
                threading.Thread(
                    target=_client_loop, args=(server.url, 10_000 * (round_ * CLIENTS + c), ledger, errors)
                )
                for c in range(CLIENTS)
            ]
            for client in clients:
                client.start()
            # A random moment once the clients are under way: mid-commit, mid-index-write or between requests.
            for _ in range(600):
                if len(ledger.acked) > before + 2 or errors:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.5))
            server.kill()
            for client in clients:
                client.join(60)
                assert not client.is_alive(), "a client did not notice the killed server"
            assert not errors, errors
            assert len(ledger.acked) > before, "no entry was acknowledged before the kill"
            server.start()
            _check_after_restart(server.url, ledger, rng)
    finally:
        server.stop()

    # After the last restart the index file on disk holds exactly the database's ids.
    engine = create_engine(Settings(data_dir=data_dir).sqlalchemy_url)
    with engine.connect() as connection:
        db_ids = np.array(sorted(connection.scalars(select(Entry.id))), dtype=np.int64)
    engine.dispose()
    index = VectorIndex.load(data_dir / "gallery.faiss", SMALL.feat_dim)
    np.testing.assert_array_equal(np.sort(index.ids()), db_ids)
    assert len(db_ids) >= len(ledger.acked) - len(ledger.deleted) - len(ledger.doubtful_deletes)


def test_deleted_ids_are_never_reused(settings: Settings, database_url: str | None) -> None:
    """An id names one crop forever: deleting the newest entry must not hand its id to the next one."""
    settings = settings.model_copy(update={"database_url": database_url})
    with TestClient(create_app(settings)) as client:

        def enrol(seed: int) -> int:
            files = {"files": (f"{seed}.png", png_bytes(seed), "image/png")}
            return client.post("/gallery", files=files, data={"identity": "a"}).json()[0]["id"]

        first, newest = enrol(1), enrol(2)
        assert client.delete(f"/gallery/{newest}").status_code == 200
        again = enrol(3)
        assert again not in (first, newest) and again > newest
    with TestClient(create_app(settings)) as client:  # and not after a restart either
        assert client.delete(f"/gallery/{again}").status_code == 200
        files = {"files": ("4.png", png_bytes(4), "image/png")}
        assert client.post("/gallery", files=files, data={"identity": "a"}).json()[0]["id"] > again
