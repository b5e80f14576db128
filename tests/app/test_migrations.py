"""A gallery made by the release before migrations (its schema frozen below as that release's create_all made
it) is upgraded in place, on SQLite and PostgreSQL, by ``reid-admin migrate`` or at start-up: every row and id
is kept, capture times are the enrolment times, and the service serves it."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import JSON, BigInteger, Column, DateTime, Integer, LargeBinary, MetaData, String, Table, select

from app import admin, migrate
from app.config import Settings
from app.db import Change, Entry, make_engine
from app.embedder import Embedder
from app.main import create_app
from tests.app.conftest import png_bytes

legacy = MetaData()
LEGACY_ENTRIES = Table(  # app/db.py's Entry before this change, as Base.metadata.create_all made it
    "reid_entries",
    legacy,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("identity", String(200), nullable=False, index=True),
    Column("camera", String(100), nullable=True, index=True),
    Column("metadata", JSON, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("content_sha256", String(64), nullable=False),
    Column("crop_path", String(300), nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("embedding", LargeBinary, nullable=False),
    sqlite_autoincrement=True,
)


def _legacy_gallery(settings: Settings) -> list[dict]:
    """Five entries written as the old release wrote them (embeddings from the test weights, crops on disk),
    the newest deleted so that SQLite's AUTOINCREMENT counter is ahead of the largest id."""
    embedder = Embedder.from_settings(settings)
    engine = make_engine(settings.sqlalchemy_url)
    legacy.create_all(engine)
    rows = []
    for seed in range(5):
        data = png_bytes(seed)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        relative = f"crops/{seed:02d}/{seed:064x}.png"
        (settings.data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        image.save(settings.data_dir / relative)
        rows.append(
            {
                "identity": f"p{seed % 2}",
                "camera": None if seed == 3 else f"c{seed}",
                "metadata": {"seed": seed},
                "created_at": datetime(2025, 6, 1, tzinfo=UTC) + timedelta(days=seed),
                "content_sha256": f"{seed:064x}",
                "crop_path": relative,
                "width": image.width,
                "height": image.height,
                "embedding": embedder.embed_sync([image])[0].astype("<f4").tobytes(),
            }
        )
    with engine.begin() as connection:
        for row in rows:
            row["id"] = connection.execute(LEGACY_ENTRIES.insert().values(**row)).inserted_primary_key[0]
        connection.execute(LEGACY_ENTRIES.delete().where(LEGACY_ENTRIES.c.id == rows[-1]["id"]))
    engine.dispose()
    return rows


@pytest.mark.parametrize("how", ["reid-admin migrate", "at start-up"])
def test_a_gallery_from_the_previous_release_is_upgraded_in_place(
    settings: Settings, database_url: str | None, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.model_copy(update={"database_url": database_url})
    settings.data_dir.mkdir(parents=True)
    rows = _legacy_gallery(settings)
    kept, deleted = rows[:-1], rows[-1]
    engine = make_engine(settings.sqlalchemy_url)
    assert migrate.current_revision(engine) == migrate.FIRST_REVISION
    if how == "reid-admin migrate":
        monkeypatch.setenv("REID_DATA_DIR", str(settings.data_dir))
        if database_url:
            monkeypatch.setenv("REID_DATABASE_URL", database_url)
        assert admin.main(["migrate"]) == 0
        assert migrate.current_revision(engine) == migrate.head_revision()
        assert admin.main(["migrate"]) == 0  # a second run changes nothing
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").status_code == 200
        page = client.get("/gallery").json()
        assert [e["id"] for e in page["items"]] == [r["id"] for r in kept]
        for entry, row in zip(page["items"], kept, strict=True):
            assert (entry["identity"], entry["camera"], entry["metadata"]) == (
                row["identity"],
                row["camera"],
                row["metadata"],
            )
            assert datetime.fromisoformat(entry["created_at"]) == row["created_at"]
        for seed, row in enumerate(kept):  # each old crop finds its own entry first
            files = {"file": ("q.png", png_bytes(seed), "image/png")}
            assert (
                client.post("/query", files=files, data={"top_k": 1}).json()["results"][0]["matches"][0]["id"]
                == (row["id"])
            )
        files = {"files": ("new.png", png_bytes(99), "image/png")}
        [new] = client.post("/gallery", files=files, data={"identity": "new"}).json()
        assert new["id"] > deleted["id"]  # ids are still never reused
    with engine.connect() as connection:
        captured = dict(connection.execute(select(Entry.id, Entry.captured_at)).all())
        changes = connection.execute(select(Change.op, Change.entry_id).order_by(Change.seq)).all()
    assert all(captured[r["id"]] == r["created_at"] for r in kept)
    assert changes == [("add", r["id"]) for r in kept] + [("add", new["id"])]
    engine.dispose()


def test_a_new_database_is_created_at_the_newest_revision(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    assert migrate.current_revision(engine) is None
    assert migrate.upgrade(engine) == (None, migrate.head_revision())
    assert migrate.upgrade(engine) == (migrate.head_revision(), migrate.head_revision())
    engine.dispose()


def test_start_up_without_migrating_names_the_command(settings: Settings) -> None:
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.sqlalchemy_url)
    legacy.create_all(engine)
    engine.dispose()
    with (
        pytest.raises(RuntimeError, match=r"at revision 0001.*reid-admin migrate"),
        TestClient(create_app(settings.model_copy(update={"migrate_on_start": False}))),
    ):
        pass


def test_the_migrations_build_the_schema_the_models_describe(tmp_path: Path, database_url: str | None) -> None:
    """Every table, column and index of app.db (the sightings' lookup index included) comes from a migration."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from app.db import Base

    engine = make_engine(database_url or f"sqlite:///{tmp_path / 'new.db'}")
    migrate.upgrade(engine)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()
