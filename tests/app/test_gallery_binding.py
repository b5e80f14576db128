"""A gallery bound to its database, through ``app.gallery.Gallery`` on SQLite and PostgreSQL: a database restored
from a backup (ids and change numbers handed out again, to other people) is never paired with the old index, at
start-up, under a running replica or under its own writes; the writers' lock times out; crops shared by an upload
and a delete survive; database failures are told apart."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, text

from app.db import WRITE_LOCK, Entry, make_engine
from app.faults import WriteBusy, fatal_reason, is_busy
from app.gallery import Gallery, NewEntry
from tests.app.conftest import png_bytes

DIM = 8


def open_gallery(data_dir: Path, url: str, **kwargs) -> Gallery:
    gallery = Gallery(make_engine(url), data_dir, DIM, "Flat", fingerprint="f" * 64, **kwargs)
    gallery.open()
    return gallery


def unit(i: int) -> np.ndarray:
    """A template that only entry ``i`` of a test has: its nearest neighbour is unambiguous."""
    rng = np.random.default_rng(i)
    vector = rng.normal(size=DIM).astype(np.float32)
    return vector / np.linalg.norm(vector) * 4


def enroll(gallery: Gallery, person: str, seeds: range) -> list[int]:
    ids = []
    for i in seeds:
        crop = (f"{i:064x}", f"crops/{i:064x}.png", 32, 64)
        [entry] = gallery.add(person, None, {}, [crop], unit(i)[None])
        ids.append(entry.id)
    return ids


def nearest(gallery: Gallery, seed: int) -> tuple[int, str, float]:
    distances, ids = gallery.search(unit(seed)[None], 1)
    entry_id = int(ids[0, 0])
    return entry_id, gallery.summaries([entry_id])[entry_id].identity, float(distances[0, 0])


def restore(url: str, entries: int, changes: int) -> None:
    """What restoring a backup taken after ``entries`` entries and ``changes`` changes does: the later rows are gone
    and the database's counters are back where they were, so their ids and numbers are handed out again."""
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM reid_changes WHERE seq > :n"), {"n": changes})
        connection.execute(text("DELETE FROM reid_entries WHERE id > :n"), {"n": entries})
        if engine.dialect.name == "sqlite":
            connection.execute(text("UPDATE sqlite_sequence SET seq = :n WHERE name = 'reid_changes'"), {"n": changes})
            connection.execute(text("UPDATE sqlite_sequence SET seq = :n WHERE name = 'reid_entries'"), {"n": entries})
        else:
            for table, column, value in (("reid_changes", "seq", changes), ("reid_entries", "id", entries)):
                connection.execute(
                    text(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), :n)"), {"n": value}
                )
    engine.dispose()


@pytest.fixture
def url(tmp_path: Path, database_url: str | None) -> str:
    return database_url or f"sqlite:///{tmp_path / 'reid.db'}"


@pytest.fixture
def galleries() -> Iterator[list[Gallery]]:
    opened: list[Gallery] = []
    yield opened
    for gallery in opened:
        gallery.close()
        gallery.engine.dispose()


def test_a_snapshot_of_the_database_before_a_restore_is_not_used(tmp_path: Path, url: str) -> None:
    original = open_gallery(tmp_path / "a", url)
    enroll(original, "alice", range(20))
    enroll(original, "alice", range(20, 25))  # ids 21-25: in the snapshot, not in the backup
    original.snapshot()
    original.close()
    original.engine.dispose()
    restore(url, entries=20, changes=20)
    other = open_gallery(tmp_path / "b", url)  # the restored database, serving elsewhere
    assert enroll(other, "bob", range(100, 105)) == [21, 22, 23, 24, 25]
    other.close()
    other.engine.dispose()

    again = open_gallery(tmp_path / "a", url)
    try:
        assert again.rebuilt  # not the snapshot: its change 25 is not the database's change 25
        assert nearest(again, 100)[:2] == (21, "bob") and nearest(again, 100)[2] == pytest.approx(0, abs=1e-4)
        assert nearest(again, 20)[2] > 1  # alice's lost crop is not served under bob's name
    finally:
        again.close()
        again.engine.dispose()


def test_a_running_replica_rebuilds_when_the_database_is_restored_under_it(
    tmp_path: Path, url: str, galleries: list[Gallery]
) -> None:
    replica = open_gallery(tmp_path / "a", url)
    galleries.append(replica)
    enroll(replica, "alice", range(25))
    assert replica.ready()
    restore(url, entries=20, changes=20)
    assert not replica.ready()  # /ready says so before anything else happens
    writer = open_gallery(tmp_path / "b", url)
    galleries.append(writer)
    enroll(writer, "bob", range(100, 105))
    assert not replica.ready()  # the same numbers again, other changes: still not this index's database
    replica.catch_up()  # what its worker does next
    assert replica.resyncs == 1 and replica.ready() and len(replica) == 25
    assert nearest(replica, 103)[:2] == (24, "bob")
    assert nearest(replica, 23)[2] > 1


def test_a_replicas_own_write_after_a_restore_rebuilds_its_index(
    tmp_path: Path, url: str, galleries: list[Gallery]
) -> None:
    replica = open_gallery(tmp_path / "a", url)
    galleries.append(replica)
    enroll(replica, "alice", range(25))
    restore(url, entries=20, changes=20)
    assert enroll(replica, "bob", range(100, 103)) == [21, 22, 23]  # the ids alice's last crops had
    assert replica.resyncs == 1 and len(replica) == 23
    assert nearest(replica, 101)[:2] == (22, "bob") and nearest(replica, 21)[2] > 1


def test_a_snapshot_of_another_database_is_not_used(tmp_path: Path, url: str, galleries: list[Gallery]) -> None:
    first = open_gallery(tmp_path / "a", url)
    enroll(first, "alice", range(5))
    first.snapshot()
    first.close()
    first.engine.dispose()
    engine = make_engine(url)  # the database recreated under the same URL: same numbers, another gallery
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM reid_meta WHERE key = 'epoch'"))
    engine.dispose()
    again = open_gallery(tmp_path / "a", url)
    galleries.append(again)
    assert again.rebuilt and len(again) == 5


def test_unfinished_snapshot_files_are_removed_at_start_up(tmp_path: Path, url: str, galleries: list[Gallery]) -> None:
    data = tmp_path / "a"
    data.mkdir()
    leftover = data / ".gallery.faiss.k1ll3d.tmp"
    leftover.write_bytes(b"\0" * 1024)  # what a SIGKILL during a snapshot leaves
    galleries.append(open_gallery(data, url))
    if galleries[0].postgres:  # replicas may share the folder: only an old one is someone's abandoned file
        assert leftover.exists()
    else:
        assert not leftover.exists()


@pytest.mark.postgres
def test_the_writers_lock_times_out_and_reads_go_on(tmp_path: Path, galleries: list[Gallery]) -> None:
    from tests.app.conftest import _postgres_schema_url

    schema = _postgres_schema_url()
    url = next(schema)
    try:
        gallery = open_gallery(tmp_path / "a", url, write_lock_timeout_s=0.5)
        galleries.append(gallery)
        enroll(gallery, "alice", range(3))
        holder = make_engine(url).connect()  # a stuck writer elsewhere
        holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": WRITE_LOCK})
        try:
            started = time.monotonic()
            with pytest.raises(WriteBusy, match="write lock"):
                enroll(gallery, "bob", range(10, 11))
            assert time.monotonic() - started < 5
            assert nearest(gallery, 1)[:2] == (2, "alice")  # reads are answered meanwhile
        finally:
            holder.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": WRITE_LOCK})
            holder.close()
        assert enroll(gallery, "bob", range(10, 11)) == [4]
    finally:
        for gallery in galleries:
            gallery.close()
            gallery.engine.dispose()
        galleries.clear()
        next(schema, None)


def test_a_picture_enrolled_while_another_entry_of_it_is_deleted_keeps_its_crop(
    tmp_path: Path, url: str, galleries: list[Gallery]
) -> None:
    import io

    from PIL import Image

    gallery = open_gallery(tmp_path / "a", url)
    galleries.append(gallery)
    data = png_bytes(7)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    [first] = gallery.enroll([NewEntry("a", None, {})], [(data, image)], unit(1)[None]).entries
    path = gallery.data_dir / first.crop_path
    # The interleaving that lost crops: an upload of the same picture stored (the file exists already), then the
    # other entry deleted, then the upload committed.
    crop = gallery.store_crop(data, image)
    gallery.delete([first.id])
    assert path.exists()
    [second] = gallery.add("b", None, {}, [(*crop, 32, 64)], unit(2)[None])
    assert path.exists() and second.crop_path == first.crop_path
    # And raced for real: every committed entry keeps its crop.
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            while not stop.is_set():
                [entry] = gallery.enroll([NewEntry("c", None, {})], [(data, image)], unit(3)[None]).entries
                gallery.delete([entry.id])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for i in range(30):
            [entry] = gallery.enroll([NewEntry(f"d{i}", None, {})], [(data, image)], unit(4)[None]).entries
            assert (gallery.data_dir / entry.crop_path).exists()
            gallery.delete([entry.id])
    finally:
        stop.set()
        thread.join(30)
    assert not errors
    with gallery.sessions() as session:
        for entry in session.scalars(select(Entry)):
            assert (gallery.data_dir / entry.crop_path).exists(), entry.id


def test_a_large_delete_goes_in_batches(tmp_path: Path, url: str, galleries: list[Gallery], monkeypatch) -> None:
    import app.gallery.writes as writes

    monkeypatch.setattr(writes, "IN_LIST", 7)  # PostgreSQL's real bound is 65,535 parameters a statement
    gallery = open_gallery(tmp_path / "a", url)
    galleries.append(gallery)
    enroll(gallery, "alice", range(30))
    assert gallery.delete_identity("alice") == 30 and len(gallery) == 0 and not gallery.db_ids().size


def test_database_failures_are_told_apart(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database file" * 100)
    with pytest.raises(Exception) as caught, make_engine(f"sqlite:///{corrupt}").connect() as connection:
        connection.execute(text("SELECT count(*) FROM sqlite_master"))
    assert "not a database" in fatal_reason(caught.value)

    sound = tmp_path / "sound.db"
    sqlite3.connect(sound).execute("CREATE TABLE t (x)").connection.close()
    read_only = make_engine(f"sqlite:///file:{sound}?mode=ro&uri=true")
    with pytest.raises(Exception) as caught, read_only.begin() as connection:
        connection.execute(text("INSERT INTO t VALUES (1)"))
    assert "readonly" in fatal_reason(caught.value)

    locked = tmp_path / "locked.db"
    shutil.copy(sound, locked)
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Exception) as caught:
            engine = make_engine(f"sqlite:///{locked}", connect_timeout_s=1)
            with engine.begin() as connection:
                connection.execute(text("INSERT INTO t VALUES (1)"))
        assert fatal_reason(caught.value) is None and is_busy(caught.value)
    finally:
        holder.close()
