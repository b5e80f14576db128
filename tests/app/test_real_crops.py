"""Real crops (Market-1501 samples, CUHK03 detected) on the real MobileNetV2 ImageNet trunk: the service's
rankings equal a brute force over the same network, and a held-out crop finds its own identity first."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from tests.conftest import MOBILENET_WEIGHTS, SHARED_DATA, require_shared

pytestmark = pytest.mark.shared


def _crops() -> tuple[list[tuple[str, str, Path]], list[tuple[str, Path]]]:
    """(gallery: identity, camera, path), (queries: identity, path)."""
    cuhk = require_shared(SHARED_DATA / "cuhk03-detected" / "val")
    market = require_shared(SHARED_DATA / "market1501-samples")
    gallery, queries = [], []
    for pid in range(8):
        for shot, camera in (("00", "a"), ("01", "a"), ("05", "b")):
            gallery.append((f"cuhk{pid}", camera, cuhk / f"{pid:04d}_{shot}.jpg"))
        queries.append((f"cuhk{pid}", cuhk / f"{pid:04d}_06.jpg"))
    by_pid: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(market.glob("*.jpg")):
        by_pid[path.name[:4]].append(path)
    distractors = [pid for pid, paths in by_pid.items() if len(paths) == 1][:12]
    for pid, paths in by_pid.items():
        if len(paths) == 1 and pid not in distractors:
            continue
        gallery.append((f"market{pid}", paths[0].name.split("_")[1][:2], paths[0]))
        if len(paths) > 1:
            queries.append((f"market{pid}", paths[1]))
    return gallery, queries


def test_real_crops_rank_like_brute_force(tmp_path, database_url: str | None) -> None:
    gallery, queries = _crops()
    pretrained = require_shared(MOBILENET_WEIGHTS)
    settings = Settings(
        data_dir=tmp_path, backbone="mobilenet_v2", pretrained=pretrained, device="cpu", database_url=database_url
    )
    with TestClient(create_app(settings)) as client:
        ids: list[int] = []
        for identity, camera, path in gallery:
            response = client.post(
                "/gallery",
                files={"files": (path.name, path.read_bytes(), "image/jpeg")},
                data={"identity": identity, "camera": camera},
            )
            assert response.status_code == 201, response.text
            ids.append(response.json()[0]["id"])
        embedder = client.app.state.reid.embedder
        templates = embedder.embed_sync([Image.open(p).convert("RGB") for _, _, p in gallery])
        labels = np.array([identity for identity, _, _ in gallery])
        found_first = 0
        for identity, path in queries:
            probe = embedder.embed_sync([Image.open(path).convert("RGB")])[0]
            brute = np.sqrt(((templates - probe) ** 2).sum(1))
            result = client.post(
                "/query", files={"file": (path.name, path.read_bytes(), "image/jpeg")}, data={"top_k": 5}
            ).json()["results"][0]
            order = np.argsort(brute, kind="stable")[:5]
            assert [m["id"] for m in result["matches"]] == [ids[i] for i in order]
            np.testing.assert_allclose([m["distance"] for m in result["matches"]], brute[order], rtol=1e-3, atol=1e-3)
            if labels[order[0]] == identity:  # ImageNet features rank this identity correctly
                assert result["identities"][0]["identity"] == identity
                found_first += 1
        # ImageNet features are no re-ID model, but most held-out crops still find their own person first.
        print(f"held-out crops whose own identity ranks first: {found_first} of {len(queries)}")
        assert found_first >= len(queries) // 2, f"{found_first} of {len(queries)}"
        entry = client.get(f"/gallery/{ids[0]}").json()
        width, height = Image.open(gallery[0][2]).size
        assert (entry["width"], entry["height"]) == (width, height)
        assert client.get("/health").json()["trained_weights"] is False


def test_real_crop_mask_png_at_crop_size(settings: Settings) -> None:
    path = require_shared(SHARED_DATA / "market1501-samples" / "0001_c1s1_001051_00.jpg")
    with TestClient(create_app(settings)) as client:
        entry = client.post(
            "/gallery", files={"files": (path.name, path.read_bytes(), "image/jpeg")}, data={"identity": "0001"}
        ).json()[0]
        png = client.get(f"/mask/{entry['id']}", params={"view": "overlay"}).content
        assert Image.open(io.BytesIO(png)).size == Image.open(path).size
