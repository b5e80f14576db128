"""Concurrency: many clients mixing enrol, query, list and delete against a real uvicorn process for a bounded
number of rounds. No request fails, no entry is lost or duplicated, the index and the database hold the same
ids, and the process's memory stops growing once warm. SQLite and PostgreSQL; loopback only."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.embedder import Embedder
from app.index import VectorIndex
from app.main import create_app
from tests.app.conftest import SMALL, _postgres_schema_url, png_bytes
from tests.app.server import Server

CLIENTS = 8
ROUNDS = 5
OPS_PER_ROUND = 8  # per client: an enrolment (one or two crops), a query, a listing, every other time a delete
# Resident memory may grow by this much from the end of the first round to the end of the last: allocator
# slack and caches, not a leak (a leak of the crops or templates would be ~ the uploads times the rounds).
RSS_SLACK = 96 * 1024 * 1024


@dataclass
class Client:
    """One client's view: what it enrolled (id -> image seed), what it deleted, what went wrong."""

    number: int
    enrolled: dict[int, int] = field(default_factory=dict)
    deleted: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    seed: int = 0

    @property
    def identity(self) -> str:
        return f"client{self.number}"

    def run_round(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            for op in range(OPS_PER_ROUND):
                self.seed += 1
                seeds = [self.number * 100_000 + self.seed * 2 + i for i in range(1 + op % 2)]
                files = [("files", (f"{s}.png", png_bytes(s), "image/png")) for s in seeds]
                response = http.post("/gallery", files=files, data={"identity": self.identity})
                if response.status_code != 201:
                    self.errors.append(f"enrol: {response.status_code} {response.text}")
                    return
                self.enrolled.update({e["id"]: s for e, s in zip(response.json(), seeds, strict=True)})
                response = http.post("/query", files={"file": ("q.png", png_bytes(seeds[0]), "image/png")})
                if response.status_code != 200:
                    self.errors.append(f"query: {response.status_code} {response.text}")
                    return
                if op % 2:
                    victim = min(self.enrolled.keys() - self.deleted)
                    response = http.delete(f"/gallery/{victim}")
                    if response.status_code != 200:
                        self.errors.append(f"delete {victim}: {response.status_code} {response.text}")
                        return
                    self.deleted.add(victim)
                response = http.get("/gallery", params={"identity": self.identity, "limit": 1000})
                if response.status_code != 200:
                    self.errors.append(f"list: {response.status_code} {response.text}")
                    return
                # Its own entries are all there, once, whatever the other clients are doing.
                listed = [e["id"] for e in response.json()["items"]]
                if sorted(listed) != sorted(self.enrolled.keys() - self.deleted):
                    self.errors.append(f"listing {sorted(listed)} != {sorted(self.enrolled.keys() - self.deleted)}")
                    return


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request: pytest.FixtureRequest, tmp_path: Path, small_weights: Path) -> Iterator[Server]:
    env: dict[str, str] = {}
    urls = _postgres_schema_url() if request.param == "postgres" else iter([None])
    for url in urls:
        if url is not None:
            env["REID_DATABASE_URL"] = url
        server = Server(tmp_path / "data", small_weights, tmp_path / "server.log", **env)
        server.start()
        try:
            yield server
        finally:
            server.stop()


def test_concurrent_clients_lose_nothing_and_memory_stays_bounded(server: Server) -> None:
    clients = [Client(n) for n in range(CLIENTS)]
    rss: list[int] = []
    for _ in range(ROUNDS):
        threads = [threading.Thread(target=c.run_round, args=(server.url,)) for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
            assert not thread.is_alive(), "a client did not finish its round"
        assert not [e for c in clients for e in c.errors], [e for c in clients for e in c.errors]
        rss.append(server.rss_bytes())

    kept = {i: (c, s) for c in clients for i, s in c.enrolled.items() if i not in c.deleted}
    enrolled = sum(len(c.enrolled) for c in clients)
    assert len({i for c in clients for i in c.enrolled}) == enrolled  # ids unique across clients
    with httpx.Client(base_url=server.url, timeout=120) as http:
        assert http.get("/ready").status_code == 200
        page = http.get("/gallery", params={"limit": 1000}).json()
        listed = [e["id"] for e in page["items"]]
        assert page["total"] == len(listed) == len(set(listed)) == len(kept)  # nothing lost, nothing twice
        assert set(listed) == kept.keys()
        assert {e["id"]: e["identity"] for e in page["items"]} == {i: c.identity for i, (c, _) in kept.items()}
        identities = [{k: i[k] for k in ("identity", "entries")} for i in http.get("/identities").json()]
        assert identities == sorted(
            [{"identity": c.identity, "entries": len(c.enrolled) - len(c.deleted)} for c in clients],
            key=lambda i: i["identity"],
        )
        assert http.get("/health").json()["gallery_size"] == len(kept)
        for entry_id, (_, seed) in list(kept.items())[:: max(1, len(kept) // 8)]:
            files = {"file": ("q.png", png_bytes(seed), "image/png")}
            top = http.post("/query", files=files, data={"top_k": 1}).json()["results"][0]["matches"][0]
            assert top["id"] == entry_id
    growth = max(rss[1:]) - rss[0]
    assert growth < RSS_SLACK, f"resident memory grew by {growth / 2**20:.0f} MiB over the rounds: {rss}"
    server.stop()  # a clean stop writes the snapshot: the index's own ids, compared with the database's
    index = VectorIndex.load(Path(server.env["REID_DATA_DIR"]) / "gallery.faiss", SMALL.feat_dim)
    assert sorted(index.ids().tolist()) == sorted(kept)


def test_odd_methods_and_paths_do_not_grow_the_metrics(settings: Settings) -> None:
    """Every distinct label set is kept for ever by Prometheus: a client inventing methods or paths must not
    be able to add them one by one."""
    with TestClient(create_app(settings)) as client:
        for i in range(50):
            client.request(f"X{i}", "/gallery")
            client.get(f"/no/such/{i}")
            client.request(f"Y{i}", f"/gallery/{i}")
        series = [line for line in client.get("/metrics").text.splitlines() if line.startswith("reid_requests_total{")]
        assert 0 < len(series) <= 8, series


def test_forward_pass_timings_are_a_bounded_window(settings: Settings) -> None:
    embedder = Embedder.from_settings(settings)
    embedder.extractor = torch.nn.Flatten()  # the bookkeeping is under test, not the network: cheap passes
    image = Image.open(io.BytesIO(png_bytes(1)))
    window = embedder.inference_seconds.maxlen
    assert window is not None
    for _ in range(window + 3):
        embedder.embed_sync([image])
    assert len(embedder.inference_seconds) == window
