"""A gallery bound to its model: starting with other weights fails naming both fingerprints and the way out;
``reid-admin reembed`` recomputes every template from the stored crops (resuming after an interruption) and
switches the fingerprint, after which the service starts and matches under the new weights."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from app import admin
from app.config import Settings
from app.db import META_FINGERPRINT, Entry, GalleryMeta, make_engine
from app.embedder import Embedder
from app.gallery import Gallery, ModelMismatch
from app.main import create_app
from app.reembed import reembed
from models import ModelConfig, build_extractor, extractor_fingerprint, load_weights, save_weights
from tests.app.conftest import png_bytes
from tests.models.test_weights import as_format


def _fingerprint(settings: Settings) -> tuple[Embedder, str]:
    embedder = Embedder.from_settings(settings)
    return embedder, extractor_fingerprint(embedder.config, embedder.extractor.state_dict())


def test_other_weights_are_refused_until_the_gallery_is_reembedded(
    settings: Settings,
    database_url: str | None,
    small_weights_no_mask: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings.model_copy(update={"database_url": database_url})
    new_settings = settings.model_copy(update={"weights": small_weights_no_mask})
    old_embedder, old = _fingerprint(settings)
    new_embedder, new = _fingerprint(new_settings)
    assert old != new
    with TestClient(create_app(settings)) as client:
        files = [("files", (f"{s}.png", png_bytes(s), "image/png")) for s in range(5)]
        ids = [e["id"] for e in client.post("/gallery", files=files, data={"identity": "p"}).json()]

    with pytest.raises(ModelMismatch) as refused, TestClient(create_app(new_settings)):
        pass
    assert old in str(refused.value) and new in str(refused.value) and "reid-admin reembed" in str(refused.value)

    # An interrupted re-embed (the third batch fails) keeps what it staged, and a second run resumes.
    engine = make_engine(new_settings.sqlalchemy_url)
    calls = []

    def flaky(images: list[Image.Image]) -> np.ndarray:
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return new_embedder.embed_sync(images)

    with pytest.raises(KeyboardInterrupt):
        reembed(engine, new_settings.data_dir, flaky, new, batch_size=2)
    with engine.connect() as connection:
        staged = connection.scalar(select(func.count(Entry.id)).where(Entry.embedding_next.is_not(None)))
        assert staged == 4
        assert connection.scalar(select(GalleryMeta.value).where(GalleryMeta.key == META_FINGERPRINT)) == old
    monkeypatch.setenv("REID_DATA_DIR", str(new_settings.data_dir))
    monkeypatch.setenv("REID_WEIGHTS", str(small_weights_no_mask))
    monkeypatch.setenv("REID_DEVICE", "cpu")
    if database_url:
        monkeypatch.setenv("REID_DATABASE_URL", database_url)
    assert admin.main(["reembed", "--batch-size", "2"]) == 0
    with engine.connect() as connection:
        assert connection.scalar(select(GalleryMeta.value).where(GalleryMeta.key == META_FINGERPRINT)) == new
        stored = dict(connection.execute(select(Entry.id, Entry.embedding)).all())
        assert connection.scalar(select(func.count(Entry.id)).where(Entry.embedding_next.is_not(None))) == 0
    engine.dispose()
    for seed, entry_id in enumerate(ids):
        image = Image.open(io.BytesIO(png_bytes(seed))).convert("RGB")
        np.testing.assert_allclose(
            np.frombuffer(stored[entry_id], "<f4"), new_embedder.embed_sync([image])[0], rtol=1e-4, atol=1e-5
        )

    with TestClient(create_app(new_settings)) as client:
        assert client.app.state.reid.gallery.rebuilt  # the old snapshot belonged to the old weights
        for seed, entry_id in enumerate(ids):
            files = {"file": ("q.png", png_bytes(seed), "image/png")}
            top = client.post("/query", files=files, data={"top_k": 1}).json()["results"][0]["matches"][0]
            assert top["id"] == entry_id
    with pytest.raises(ModelMismatch), TestClient(create_app(settings)):
        pass  # and now the old weights are the foreign ones
    assert old_embedder.feat_dim == new_embedder.feat_dim


def test_a_running_replica_stops_matching_when_the_gallery_is_reembedded_under_other_weights(
    tmp_path: Path, database_url: str | None
) -> None:
    url = database_url or f"sqlite:///{tmp_path / 'reid.db'}"
    old, same_as_new = Gallery(make_engine(url), tmp_path / "a", 8, fingerprint="1" * 64), None
    old.open()
    try:
        crops = []
        for seed in range(3):
            data = png_bytes(seed)
            crops.append((*old.store_crop(data, Image.open(io.BytesIO(data)).convert("RGB")), 32, 64))
        old.add("p", None, {}, crops, np.eye(3, 8, dtype=np.float32))
        same_as_new = Gallery(make_engine(url), tmp_path / "b", 8, fingerprint=None)
        same_as_new.open()

        def embed(images: list[Image.Image]) -> np.ndarray:
            return np.stack([np.asarray(i, np.float32).mean((0, 1)).repeat(3)[:8] for i in images])

        assert reembed(make_engine(url), old.data_dir, embed, "2" * 64) == 3
        old.catch_up()
        assert not old.ready()
        with pytest.raises(ModelMismatch, match="1111111111111111"):
            old.search(np.zeros((1, 8), np.float32), 1)
        with pytest.raises(ModelMismatch):
            old.add("q", None, {}, crops[:1], np.zeros((1, 8), np.float32))
        same_as_new.catch_up()  # a replica whose weights match rebuilds from the new embeddings
        same_as_new.worker._rebuilder.join(30)
        ids = same_as_new.db_ids()
        vectors = np.stack([same_as_new.index.index.reconstruct(int(i)) for i in ids])
        np.testing.assert_allclose(vectors, embed([Image.open(old.data_dir / c[1]).convert("RGB") for c in crops]))
    finally:
        old.close()
        if same_as_new is not None:
            same_as_new.close()


def test_a_gallery_enrolled_under_format_1_mobilenet_weights_still_starts(settings: Settings, tmp_path: Path) -> None:
    """Format 1 wrote the strong recipe's last_stride 1 for a MobileNetV2 that computed stride 2. Read now as the
    stride 2 it computed, the file keeps the fingerprint the earlier release recorded for its gallery."""
    written = ModelConfig(backbone="mobilenet_v2", feat_dim=32, input_height=64, input_width=32, last_stride=1)
    path = as_format(save_weights(tmp_path / "old.safetensors", build_extractor(written).eval()), 1)
    model = load_weights(path)
    assert model.config.last_stride == 2
    recorded = extractor_fingerprint(written, model.extractor.state_dict())  # what the earlier release computed
    old = settings.model_copy(update={"weights": path})
    engine = make_engine(old.sqlalchemy_url)
    with TestClient(create_app(old)) as client:
        files = [("files", ("a.png", png_bytes(0), "image/png"))]
        assert client.post("/gallery", files=files, data={"identity": "p"}).status_code == 201
        assert client.get("/health").json()["fingerprint"] == recorded
    with engine.connect() as connection:
        assert connection.scalar(select(GalleryMeta.value).where(GalleryMeta.key == META_FINGERPRINT)) == recorded
    engine.dispose()
