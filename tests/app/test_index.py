"""The FAISS index against a NumPy brute force, and the index rebuilt from the database when its snapshot is
missing or corrupt, or brought up to date from the change log when it is stale."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.embedder import Embedder
from app.index import VectorIndex
from app.main import create_app
from tests.app.conftest import png_bytes


def test_index_matches_brute_force(tmp_path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 16)).astype(np.float32)
    ids = rng.permutation(10_000)[:200].astype(np.int64)
    index = VectorIndex(16)
    index.add(ids, vectors)
    index.remove(ids[:20])
    kept_ids, kept = ids[20:], vectors[20:]
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    distances, found = index.search(queries, 7)
    brute = ((queries[:, None, :] - kept[None]) ** 2).sum(-1)
    order = np.argsort(brute, axis=1)[:, :7]
    np.testing.assert_array_equal(found, kept_ids[order])
    np.testing.assert_allclose(distances, np.take_along_axis(brute, order, 1), rtol=1e-4)
    assert len(index) == 180 and set(index.ids()) == set(kept_ids)
    index.save(tmp_path / "i.faiss")
    again = VectorIndex.load(tmp_path / "i.faiss", 16)
    np.testing.assert_array_equal(again.search(queries, 7)[1], found)
    assert index.search(queries, 1000)[1].shape == (5, 180)


def test_hnsw_factory_finds_exact_neighbour_of_itself() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(300, 8)).astype(np.float32)
    index = VectorIndex(8, "HNSW32")
    index.add(np.arange(300), vectors)
    assert (index.search(vectors[:10], 1)[1][:, 0] == np.arange(10)).all()


def _enroll(client: TestClient, n: int) -> list[int]:
    files = [("files", (f"{i}.png", png_bytes(i), "image/png")) for i in range(n)]
    return [e["id"] for e in client.post("/gallery", files=files, data={"identity": "p"}).json()]


def _answers(client: TestClient) -> list[list[int]]:
    return [
        [
            m["id"]
            for m in client.post("/query", files={"file": ("q.png", png_bytes(s), "image/png")}).json()["results"][0][
                "matches"
            ]
        ]
        for s in range(3)
    ]


@pytest.mark.parametrize("damage", ["removed", "corrupt", "stale", "missing_entry"])
def test_index_rebuilt_or_replayed_from_database(settings: Settings, damage: str) -> None:
    """A missing, corrupt or foreign snapshot is rebuilt from the database; a stale one (the crash between a
    commit and the next snapshot) is brought up to date by replaying the change log after its watermark."""
    with TestClient(create_app(settings)) as client:
        ids = _enroll(client, 4)
        expected = _answers(client)
        index_path = client.app.state.reid.gallery.index_path
    stale = index_path.read_bytes()  # the snapshot written at shutdown
    with TestClient(create_app(settings)) as client:
        more = _enroll(client, 2)
        expected_after = _answers(client)
    if damage == "removed":
        index_path.unlink()
    elif damage == "corrupt":
        index_path.write_bytes(b"not a faiss index" * 10)
    elif damage == "stale":
        index_path.write_bytes(stale)
    else:
        # An id in the index that the database lacks (a ghost) must not survive a restart either.
        index = VectorIndex.load(index_path, 64)
        index.add(np.array([999_999]), np.zeros((1, 64), np.float32))
        index.save(index_path)
    with TestClient(create_app(settings)) as client:
        gallery = client.app.state.reid.gallery
        assert gallery.rebuilt == (damage != "stale")
        assert gallery.replayed == (2 if damage == "stale" else 0)
        assert sorted(gallery.index.ids().tolist()) == sorted(ids + more)
        assert client.get("/ready").status_code == 200
        assert _answers(client) == expected_after
    assert expected  # the answers before the last enrolment were real rankings
    with TestClient(create_app(settings)) as client:
        assert not client.app.state.reid.gallery.rebuilt  # the snapshot written at shutdown is used as is
        assert client.app.state.reid.gallery.replayed == 0


def test_micro_batching_gives_the_same_vectors(small_weights, tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, weights=small_weights, device="cpu", batch_max_wait_ms=50)
    embedder = Embedder.from_settings(settings)
    images = [Image.open(io.BytesIO(png_bytes(i))).convert("RGB") for i in range(6)]
    alone = np.stack([embedder.embed_sync([image])[0] for image in images])

    async def concurrent() -> list[np.ndarray]:
        embedder.start()
        try:
            return await asyncio.gather(*(embedder.embed([image]) for image in images))
        finally:
            await embedder.stop()

    calls_before = len(embedder.inference_seconds)
    together = np.concatenate(asyncio.run(concurrent()))
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    assert len(embedder.inference_seconds) - calls_before < len(images)  # shared forward passes


def test_concurrent_enroll_query_delete_keeps_index_and_database_equal(settings: Settings) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with TestClient(create_app(settings)) as client:

        def worker(n: int) -> list[int]:
            kept = []
            for i in range(4):
                entry = client.post(
                    "/gallery",
                    files={"files": ("a.png", png_bytes(100 * n + i), "image/png")},
                    data={"identity": f"w{n}"},
                ).json()[0]
                assert client.post("/query", files={"file": ("q.png", png_bytes(n), "image/png")}).status_code == 200
                if i % 2:
                    assert client.delete(f"/gallery/{entry['id']}").status_code == 200
                else:
                    kept.append(entry["id"])
            return kept

        with ThreadPoolExecutor(4) as pool:
            kept = sorted(i for ids in pool.map(worker, range(4)) for i in ids)
        gallery = client.app.state.reid.gallery
        assert sorted(gallery.index.ids().tolist()) == kept == gallery.db_ids().tolist()
        assert client.get("/ready").status_code == 200
