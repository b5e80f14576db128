"""End to end through HTTP with the lifespan running: enroll, query, mask, delete, restart; SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from tests.app.conftest import png_bytes


def _enroll(client: TestClient, identity: str, seeds: list[int], camera: str | None = None) -> list[dict]:
    files = [("files", (f"{identity}_{s}.png", png_bytes(s), "image/png")) for s in seeds]
    data = {"identity": identity, "metadata": json.dumps({"seeds": seeds})}
    if camera:
        data["camera"] = camera
    response = client.post("/gallery", files=files, data=data)
    assert response.status_code == 201, response.text
    return response.json()


def _embed(client: TestClient, seeds: list[int]) -> np.ndarray:
    files = [("files", (f"{s}.png", png_bytes(s), "image/png")) for s in seeds]
    response = client.post("/embed", files=files)
    assert response.status_code == 200, response.text
    return np.array([r["embedding"] for r in response.json()["results"]], dtype=np.float32)


def _query(client: TestClient, seed: int, **form: object) -> dict:
    response = client.post("/query", files=[("file", ("q.png", png_bytes(seed), "image/png"))], data=form)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def test_enroll_query_mask_delete_restart(settings: Settings, database_url: str | None) -> None:
    settings = settings.model_copy(update={"database_url": database_url})
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").status_code == 200
        health = client.get("/health").json()
        assert health["trained_weights"] is True and health["mask_generator"] is True and health["feat_dim"] == 64
        entries = _enroll(client, "alice", [1, 2, 3], camera="c1") + _enroll(client, "bob", [4, 5], camera="c2")
        assert [e["identity"] for e in entries] == ["alice"] * 3 + ["bob"] * 2
        assert entries[0]["metadata"] == {"seeds": [1, 2, 3]} and entries[0]["width"] == 32
        ids = [e["id"] for e in entries]

        # Ranking against a NumPy brute force over the same templates, distances Euclidean (not squared).
        gallery = _embed(client, [1, 2, 3, 4, 5])
        probe = _embed(client, [3])[0]
        expected = np.sqrt(((gallery - probe) ** 2).sum(1))
        result = _query(client, 3, top_k=5)
        assert [m["id"] for m in result["matches"]] == [ids[i] for i in np.argsort(expected)]
        np.testing.assert_allclose([m["distance"] for m in result["matches"]], np.sort(expected), rtol=1e-4, atol=1e-3)
        assert result["matches"][0]["id"] == ids[2] and result["matches"][0]["distance"] < 1e-2
        assert all(abs(m["similarity"] - 1 / (1 + m["distance"])) < 1e-6 for m in result["matches"])
        assert result["identities"][0]["identity"] == "alice" and result["identities"][0]["hits"] == 3

        # Camera filter: excluding c1 leaves only bob's entries; top_k still filled where possible.
        filtered = _query(client, 3, top_k=2, camera="c1")
        assert {m["camera"] for m in filtered["matches"]} == {"c2"} and len(filtered["matches"]) == 2
        only = _query(client, 3, top_k=5, camera="c2", exclude_camera=False)
        assert len(only["matches"]) == 2

        # Threshold: identities beyond it are marked as no match, and the answer says which threshold.
        cut = float(np.sort(expected)[0]) + 1e-3
        thresholded = _query(client, 3, top_k=5, threshold=cut)
        assert thresholded["threshold"] == cut
        assert [i["match"] for i in thresholded["identities"]] == [True, False]

        # Masks: PNG at the crop's size, in every view; base64 mask on query.
        for view in ("mask", "overlay", "hidden"):
            response = client.get(f"/mask/{ids[0]}", params={"view": view})
            assert response.status_code == 200 and response.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(response.content)).size == (32, 64)
        hidden = np.asarray(Image.open(io.BytesIO(client.get(f"/mask/{ids[0]}?view=hidden").content)))
        assert abs((hidden.sum(-1) == 0).mean() - 0.3) < 0.05
        upload = client.post("/mask", files={"file": ("x.png", png_bytes(9, (40, 80)), "image/png")})
        assert Image.open(io.BytesIO(upload.content)).size == (40, 80)
        with_mask = _query(client, 4, include_mask="true")
        assert Image.open(io.BytesIO(base64.b64decode(with_mask["mask_png_base64"]))).size == (32, 64)

        # Several query files at once, answered in order.
        many = client.post(
            "/query", files=[("file", (f"{s}.png", png_bytes(s), "image/png")) for s in (4, 1)], data={"top_k": 1}
        ).json()["results"]
        assert [r["matches"][0]["id"] for r in many] == [ids[3], ids[0]]

        # Listing and identities.
        assert client.get("/gallery", params={"identity": "bob"}).json()["total"] == 2
        assert client.get(f"/gallery/{ids[1]}").json()["identity"] == "alice"
        assert client.get("/identities").json() == [
            {"identity": "alice", "entries": 3, "thumbnail": ids[0]},
            {"identity": "bob", "entries": 2, "thumbnail": ids[3]},
        ]

        # Delete then query: gone from both the database and the index.
        assert client.delete(f"/gallery/{ids[2]}").json() == {"deleted": 1}
        assert client.get(f"/gallery/{ids[2]}").status_code == 404
        after = _query(client, 3, top_k=5)
        assert ids[2] not in [m["id"] for m in after["matches"]] and len(after["matches"]) == 4
        assert client.delete("/identities/bob").json() == {"deleted": 2}
        before_restart = _query(client, 3, top_k=5)
        assert {m["identity"] for m in before_restart["matches"]} == {"alice"}
        metrics = client.get("/metrics").text
        assert "reid_gallery_size 2.0" in metrics and "reid_requests_total" in metrics

    # Restart on the same data folder and database: the same answers, the index file reused.
    with TestClient(create_app(settings)) as client:
        assert client.get("/ready").status_code == 200
        assert _query(client, 3, top_k=5) == before_restart
        assert client.get("/health").json()["gallery_size"] == 2


def test_no_weights_still_serves_and_says_so(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, backbone="resnet18", device="cpu")
    with TestClient(create_app(settings)) as client:
        health = client.get("/health").json()
        assert health["trained_weights"] is False and "meaningless" in health["warning"]
        assert health["feat_dim"] == 512 and health["backbone"] == "resnet18"
        response = client.get("/mask/1")
        assert response.status_code == 404  # unknown id first
        _enroll(client, "x", [1])
        response = client.get("/mask/1")
        assert response.status_code == 409 and response.json()["code"] == "no_mask_generator"
        assert response.headers["content-type"] == "application/problem+json"
