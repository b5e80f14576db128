"""Every index type through ``app.gallery.Gallery`` on SQLite and PostgreSQL: enroll, delete and query checked
against a NumPy brute force over the database's own embeddings, the index ids equal to the database ids after
each step, filters applied inside FAISS, IVF below and above its training size, HNSW tombstones compacted."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import faiss
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from app.db import Entry, make_engine
from app.gallery import EntryFilter, Gallery
from app.index import GPU_MAX_K, VectorIndex, capped_k, id_selector, validate
from tests.app.conftest import _postgres_schema_url, png_bytes

DIM = 16
T0 = datetime(2026, 1, 1, tzinfo=UTC)
CAMERAS = ["c1", "c2", "c3", None]


def make_gallery(tmp_path: Path, url: str | None, factory: str, **kwargs) -> Gallery:
    engine = make_engine(url or f"sqlite:///{tmp_path / 'reid.db'}")
    options = {"nprobe": 4, "ef_search": 256, "fingerprint": "f" * 64, **kwargs}
    gallery = Gallery(engine, tmp_path / "data", DIM, factory, **options)
    gallery.open()
    return gallery


@pytest.fixture
def opened(tmp_path: Path, database_url: str | None) -> Iterator:
    galleries: list[Gallery] = []

    def factory(name: str, **kwargs) -> Gallery:
        galleries.append(make_gallery(tmp_path, database_url, name, **kwargs))
        return galleries[-1]

    yield factory
    for gallery in galleries:
        gallery.close()
        gallery.engine.dispose()


def enroll(gallery: Gallery, rng: np.random.Generator, n: int, start: int) -> None:
    """n entries, one add() each batch of 10, cameras and capture times cycling."""
    for i in range(start, start + n, 10):
        batch = range(i, min(i + 10, start + n))
        vectors = rng.normal(size=(len(batch), DIM)).astype(np.float32)
        for j, vector in zip(batch, vectors, strict=True):
            crop = (f"{j:064x}", f"crops/{j:064x}.png", 32, 64)
            gallery.add(f"p{j % 7}", CAMERAS[j % 4], {}, [crop], vector[None], captured_at=T0 + timedelta(hours=j))


def database(gallery: Gallery) -> tuple[np.ndarray, np.ndarray, list[str | None], list[datetime]]:
    with gallery.sessions() as session:
        rows = session.execute(select(Entry.id, Entry.embedding, Entry.camera, Entry.captured_at).order_by(Entry.id))
        rows = rows.all()
    ids = np.array([r.id for r in rows], np.int64)
    vectors = np.stack([np.frombuffer(r.embedding, "<f4") for r in rows])
    return ids, vectors, [r.camera for r in rows], [r.captured_at for r in rows]


def check_against_brute_force(gallery: Gallery, rng: np.random.Generator, where: EntryFilter | None = None) -> None:
    ids, vectors, cameras, captured = database(gallery)
    assert sorted(gallery.index.ids().tolist()) == ids.tolist() == gallery.db_ids().tolist()
    assert len(gallery) == len(ids) and gallery.ready()
    keep = np.ones(len(ids), bool)
    if where is not None:
        if where.cameras is not None:
            keep &= np.array([c in where.cameras for c in cameras])
        keep &= np.array([c not in where.exclude_cameras for c in cameras])
        if where.after is not None:
            keep &= np.array([t >= where.after for t in captured])
        if where.before is not None:
            keep &= np.array([t < where.before for t in captured])
    queries = rng.normal(size=(6, DIM)).astype(np.float32)
    k = 8
    distances, found = gallery.search(queries, k, where)
    assert found.shape == distances.shape == (6, k)
    brute = ((queries[:, None, :] - vectors[keep][None]) ** 2).sum(-1)
    order = np.argsort(brute, axis=1)[:, :k]
    expected = np.full((6, k), -1, np.int64)
    expected[:, : order.shape[1]] = ids[keep][order]
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(distances[:, : order.shape[1]], np.take_along_axis(brute, order, 1), rtol=1e-4)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW16"])
def test_enroll_delete_query_match_brute_force(opened, factory: str) -> None:
    rng = np.random.default_rng(0)
    gallery = opened(factory)
    enroll(gallery, rng, 60, 0)
    check_against_brute_force(gallery, rng)
    ids = gallery.db_ids()
    assert gallery.delete(ids[::3].tolist()) == len(ids[::3])
    check_against_brute_force(gallery, rng)
    assert gallery.delete_identity("p1") > 0
    check_against_brute_force(gallery, rng)
    assert gallery.delete([10**9]) == 0  # an unknown id: nothing
    for where in (
        EntryFilter(cameras=("c1", "c3")),
        EntryFilter(exclude_cameras=("c1",)),  # entries with no camera are kept
        EntryFilter(cameras=("c2", "nowhere")),
        EntryFilter(after=T0 + timedelta(hours=20), before=T0 + timedelta(hours=45)),
        EntryFilter(cameras=("c1", "c2"), exclude_cameras=("c2",), after=T0 + timedelta(hours=5)),
        EntryFilter(cameras=("nowhere",)),
    ):
        check_against_brute_force(gallery, rng, where)


def test_ivf_searches_exactly_until_it_can_train_then_trains_in_the_background(opened) -> None:
    rng = np.random.default_rng(1)
    gallery = opened("IVF4,Flat")  # 4 lists want 4 x 39 = 156 vectors
    enroll(gallery, rng, 150, 0)
    assert gallery.index.mode == "flat" and gallery.index.needs_rebuild() is None
    check_against_brute_force(gallery, rng)
    enroll(gallery, rng, 20, 150)
    assert gallery.index.needs_rebuild()
    gallery._rebuild()  # what the background thread runs
    assert gallery.index.mode == "ivf" and gallery.index.trained_on == 170
    check_against_brute_force(gallery, rng)  # nprobe 4 of 4 lists: exact
    gallery.delete(gallery.db_ids()[:30].tolist())
    enroll(gallery, rng, 10, 170)
    check_against_brute_force(gallery, rng, EntryFilter(cameras=("c2",)))


def test_changes_made_during_a_background_rebuild_are_kept(opened, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    gallery = opened("HNSW16")
    enroll(gallery, rng, 60, 0)
    gallery.delete(gallery.db_ids()[:20].tolist())  # a third of the graph is tombstones
    assert "tombstones" in gallery.index.needs_rebuild()
    build = gallery._build
    deleted: list[int] = []

    def build_while_writing(**kwargs):
        state = build(**kwargs)
        enroll(gallery, rng, 5, 100)  # enrolled and deleted after the rebuild read the database
        deleted.extend(gallery.db_ids()[-7:-5].tolist())
        gallery.delete(deleted)
        return state

    monkeypatch.setattr(gallery, "_build", build_while_writing)
    gallery._rebuild()
    # The 20 old tombstones are compacted away; the 2 deletions journalled during the rebuild are new ones.
    assert gallery.index.dead == set(deleted) and gallery.index.ntotal == len(gallery.db_ids()) + 2
    check_against_brute_force(gallery, rng)


def test_snapshot_and_replay_after_a_crash(tmp_path: Path, database_url: str | None) -> None:
    rng = np.random.default_rng(3)
    gallery = make_gallery(tmp_path, database_url, "HNSW16")
    enroll(gallery, rng, 30, 0)
    gallery.delete(gallery.db_ids()[:3].tolist())  # tombstones travel with the snapshot
    gallery.snapshot()
    enroll(gallery, rng, 12, 30)  # committed, never snapshotted: then the process dies
    gallery.delete(gallery.db_ids()[5:9].tolist())
    if gallery._lock_file is not None:
        gallery._lock_file.close()  # what the kernel does for a killed process
    gallery.engine.dispose()

    again = make_gallery(tmp_path, database_url, "HNSW16")
    try:
        assert not again.rebuilt and again.replayed == 12 + 4
        assert len(again.index.dead) == 3 + 4
        check_against_brute_force(again, rng)
    finally:
        again.close()
        again.engine.dispose()
    # close() wrote a snapshot at the current watermark: nothing to replay next time.
    third = make_gallery(tmp_path, database_url, "HNSW16")
    try:
        assert not third.rebuilt and third.replayed == 0
        check_against_brute_force(third, rng, EntryFilter(cameras=("c1",)))
    finally:
        third.close()
        third.engine.dispose()


@pytest.mark.parametrize("change", ["fingerprint", "factory"])
def test_a_foreign_snapshot_is_rebuilt_from_the_database(tmp_path: Path, change: str) -> None:
    rng = np.random.default_rng(4)
    gallery = make_gallery(tmp_path, None, "Flat", fingerprint=None)
    enroll(gallery, rng, 20, 0)
    gallery.close()
    kwargs = {"fingerprint": None} if change == "factory" else {"fingerprint": "a" * 64}
    again = make_gallery(tmp_path, None, "HNSW16" if change == "factory" else "Flat", **kwargs)
    try:
        assert again.rebuilt
        check_against_brute_force(again, rng)
    finally:
        again.close()


def test_deleting_entries_deletes_their_unshared_crops(tmp_path: Path, database_url: str | None) -> None:
    gallery = make_gallery(tmp_path, database_url, "Flat")
    try:
        crops = []
        for seed in (1, 2):
            data = png_bytes(seed)
            image = Image.open(io.BytesIO(data)).convert("RGB")
            digest, relative = gallery.store_crop(data, image)
            crops.append((digest, relative, image.width, image.height))
        vectors = np.ones((1, DIM), np.float32)
        [a] = gallery.add("a", None, {}, [crops[0]], vectors)
        gallery.add("b", None, {}, [crops[0]], vectors)  # the same picture twice: one shared file
        [c] = gallery.add("c", None, {}, [crops[1]], vectors)
        shared, alone = gallery.data_dir / crops[0][1], gallery.data_dir / crops[1][1]
        gallery.delete([a.id])
        assert shared.exists()  # b still uses it
        gallery.delete_identity("b")
        gallery.delete([c.id])
        if gallery.crops.shared:
            # Replicas share the folder, not their uploads in flight: a delete leaves the files to the sweep,
            # which takes them once they have been unused for hours.
            assert shared.exists() and alone.exists() and gallery.sweep_crops() == 0
            for path in (shared, alone):
                os.utime(path, (0, 0))
            assert gallery.sweep_crops() == 2
        assert not shared.exists() and not alone.exists()
        # A crash after a delete's commit and before its unlink leaves an orphan: the start-up sweep removes it.
        orphan = gallery.crops_dir / "ab" / ("ab" * 32 + ".png")
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(b"x")
        young = gallery.crops_dir / "cd" / ("cd" * 32 + ".png")
        young.parent.mkdir(parents=True, exist_ok=True)
        young.write_bytes(b"x")
        old = datetime.now().timestamp() - gallery.crops.grace_s - 60
        os.utime(orphan, (old, old))
        assert gallery.sweep_crops() == 1
        assert not orphan.exists() and young.exists()  # a young file may be an upload on its way in
    finally:
        gallery.close()
        gallery.engine.dispose()


def test_a_second_process_on_a_sqlite_data_folder_is_refused(tmp_path: Path) -> None:
    gallery = make_gallery(tmp_path, None, "Flat")
    try:
        with pytest.raises(RuntimeError, match="single-process store"):
            make_gallery(tmp_path, None, "Flat")
    finally:
        gallery.close()
    make_gallery(tmp_path, None, "Flat").close()  # released on close


@pytest.mark.parametrize(
    ("factory", "nprobe", "use_gpu", "message"),
    [
        ("IVF4096,PQ64", 16, False, "unsupported index factory 'IVF4096,PQ64'; choose Flat"),
        ("Flat,SQ8", 16, False, "unsupported index factory"),
        ("IVF8", 16, False, "REID_INDEX_NPROBE=16 is more than the 8 lists"),
        ("HNSW32", 16, True, "no GPU HNSW"),
        ("HNSW1", 16, False, "HNSW M must be between 2 and 256"),
    ],
)
def test_a_combination_that_cannot_work_is_refused(factory: str, nprobe: int, use_gpu: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate(factory, nprobe, 64, use_gpu)


def test_k_is_capped_at_the_gpu_limit_on_a_gpu_only() -> None:
    assert capped_k(5000, on_gpu=True) == GPU_MAX_K == 2048
    assert capped_k(100, on_gpu=True) == 100
    assert capped_k(5000, on_gpu=False) == 5000


@pytest.mark.parametrize("factory", ["SQ8", "IVF4,SQ8", "HNSW16,SQ8"])
def test_sq8_indexes_train_once_they_have_enough_vectors(factory: str) -> None:
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(1200, DIM)).astype(np.float32)
    ids = np.arange(1, 1201, dtype=np.int64)
    small = VectorIndex.build(DIM, factory, ids[:100], vectors[:100])
    assert small.mode == "flat" and small.trained_on == 0  # too few to learn SQ8's ranges: exact
    big = VectorIndex.build(DIM, factory, ids, vectors, nprobe=4, ef_search=128)
    assert big.trained_on == 1200 and big.mode == big.spec.kind
    exact = ((vectors[:20, None] - vectors[None]) ** 2).sum(-1).argsort(1)[:, :10] + 1
    found = big.search(vectors[:20], 10)[1]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
    assert recall >= 0.8  # 8-bit codes: near, not exact


def test_the_gpu_copy_drops_tombstones_and_grows_with_the_master() -> None:
    """The GPU search path without a GPU: a CPU clone stands in for the copy index_cpu_to_gpu would make."""
    rng = np.random.default_rng(6)
    vectors = rng.normal(size=(60, DIM)).astype(np.float32)
    ids = np.arange(1, 61, dtype=np.int64)
    index = VectorIndex.build(DIM, "Flat", ids[:50], vectors[:50])
    index.use_gpu, index._gpu = True, faiss.clone_index(index.index)
    index.remove(ids[:5])
    index.add(ids[50:], vectors[50:])  # reaches the copy too
    live = np.arange(5, 60)
    distances, found = index.search(vectors[:4], 10)
    brute = ((vectors[:4, None] - vectors[live][None]) ** 2).sum(-1)
    order = np.argsort(brute, 1)[:, :10]
    np.testing.assert_array_equal(found, ids[live][order])
    np.testing.assert_allclose(distances, np.take_along_axis(brute, order, 1), rtol=1e-4)
    assert index._gpu.ntotal == 60  # searched on the copy, which keeps the tombstones


def test_id_selector_keeps_exactly_its_ids() -> None:
    """Both forms (the bitmap for dense ids, the hash set for sparse ones) answer membership exactly, past the
    largest id too (FAISS's bitmap size is in bytes: a size in bits would read past the buffer)."""
    for ids in (np.array([1, 2, 3, 5, 8, 13, 21, 33]), np.array([7, 10_000_000])):
        selector, _buffer = id_selector(ids)
        members = [i for i in range(0, 2000) if selector.is_member(i)] + [
            i for i in (10_000_000, 10_000_001) if selector.is_member(i)
        ]
        assert members == ids.tolist()


def test_ivf_asks_to_retrain_once_the_gallery_outgrows_its_lists() -> None:
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(800, DIM)).astype(np.float32)
    ids = np.arange(1, 801, dtype=np.int64)
    index = VectorIndex.build(DIM, "IVF4,Flat", ids[:200], vectors[:200])
    assert index.mode == "ivf" and index.trained_on == 200 and index.needs_rebuild() is None
    index.add(ids[200:], vectors[200:])
    assert "outgrown" in index.needs_rebuild()
    auto = VectorIndex.build(DIM, "IVF", ids, vectors)  # lists from the data: 4 sqrt(800) = 113 want 4407
    assert auto.mode == "flat" and auto.needs_rebuild() is None


@pytest.mark.postgres
def test_a_replica_without_notifications_catches_up_by_polling(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    for url in _postgres_schema_url():
        writer = make_gallery(tmp_path / "a", url, "HNSW16")
        reader = make_gallery(tmp_path / "b", url, "HNSW16", listen=False, poll_interval_s=0.05)
        reader.start_background()
        try:
            enroll(writer, rng, 20, 0)
            writer.delete(writer.db_ids()[:4].tolist())
            for _ in range(200):
                if reader.state.watermark == writer.state.watermark:
                    break
                threading.Event().wait(0.05)
            check_against_brute_force(reader, rng, EntryFilter(cameras=("c1", "c2")))
        finally:
            reader.close()
            writer.close()
            reader.engine.dispose()
            writer.engine.dispose()


def test_an_ivf_query_alone_or_in_a_batch_gets_the_same_answer() -> None:
    """A lone query is split over the lists it probes (both cores), a batch over its queries: the same result."""
    rng = np.random.default_rng(9)
    vectors = rng.normal(size=(400, DIM)).astype(np.float32)
    index = VectorIndex.build(DIM, "IVF4,Flat", np.arange(1, 401, dtype=np.int64), vectors, nprobe=2)
    assert index.mode == "ivf"
    queries = rng.normal(size=(6, DIM)).astype(np.float32)
    batch_d, batch_ids = index.search(queries, 5)
    for row, query in enumerate(queries):
        alone_d, alone_ids = index.search(query[None], 5)
        np.testing.assert_array_equal(alone_ids[0], batch_ids[row])
        np.testing.assert_allclose(alone_d[0], batch_d[row], rtol=1e-5)


def test_a_new_gallery_starts_quietly_and_a_lost_snapshot_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(6)
    with caplog.at_level("INFO", logger="app.gallery"):
        gallery = make_gallery(tmp_path, None, "Flat")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # nothing to rebuild, nothing lost
    assert any("no index snapshot" in r.getMessage() for r in caplog.records)
    enroll(gallery, rng, 10, 0)
    assert [e[:2] for e in gallery.identities()] == [(f"p{i}", 2 if i < 3 else 1) for i in range(7)]
    assert gallery.identities()[0][2] == min(gallery.ids_of_identity("p0"))  # the first crop: the thumbnail
    gallery.close()
    gallery.engine.dispose()
    (tmp_path / "data" / "gallery.faiss").unlink()
    caplog.clear()
    with caplog.at_level("INFO", logger="app.gallery"):
        again = make_gallery(tmp_path, None, "Flat")
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("rebuilding the index from the database: no index snapshot" in m for m in warnings)
    finally:
        again.close()
        again.engine.dispose()
