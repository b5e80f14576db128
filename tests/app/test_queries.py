"""The queries camera networks ask for, through HTTP: camera lists, time windows on ``captured_at``, track
queries (mean template or each entry's best distance), and the default threshold the weights carry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from models import load_weights, save_weights
from tests.app.conftest import png_bytes

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
# (identity, camera, hours after T0, image seed)
ENROLMENTS = [("a", "c1", 0, 1), ("a", "c2", 1, 2), ("b", "c2", 2, 3), ("b", "c3", 3, 4), ("c", "c1", 4, 5)]


def _files(field: str, seeds: list[int]) -> list:
    return [(field, (f"{s}.png", png_bytes(s), "image/png")) for s in seeds]


def _query(client: TestClient, seeds: list[int], data: dict | list) -> list[dict]:
    if isinstance(data, list):  # (field, value) pairs, a field repeated for a list
        form: dict[str, list[str]] = {}
        for field, value in data:
            form.setdefault(field, []).append(value)
        data = form
    response = client.post("/query", files=_files("file", seeds), data=data)
    assert response.status_code == 200, response.text
    return response.json()["results"]


@pytest.fixture
def enrolled(settings: Settings):
    with TestClient(create_app(settings)) as client:
        entries = {}
        for identity, camera, hours, seed in ENROLMENTS:
            at = (T0 + timedelta(hours=hours)).isoformat()
            response = client.post(
                "/gallery",
                files=_files("files", [seed]),
                data={"identity": identity, "camera": camera, "captured_at": at},
            )
            assert response.status_code == 201, response.text
            [entry] = response.json()
            assert datetime.fromisoformat(entry["captured_at"]) == T0 + timedelta(hours=hours)
            entries[seed] = entry
        templates = client.post("/embed", files=_files("files", [s for *_, s in ENROLMENTS])).json()["results"]
        vectors = {s: np.array(t["embedding"]) for (*_, s), t in zip(ENROLMENTS, templates, strict=True)}
        yield client, entries, vectors


def _ranked(vectors: dict[int, np.ndarray], entries: dict, probe: np.ndarray, seeds: list[int]) -> list[int]:
    distances = {s: float(np.linalg.norm(vectors[s] - probe)) for s in seeds}
    return [entries[s]["id"] for s in sorted(seeds, key=distances.__getitem__)]


def test_enrolment_without_captured_at_takes_the_upload_time(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        before = datetime.now(UTC)
        [entry] = client.post("/gallery", files=_files("files", [1]), data={"identity": "x"}).json()
        assert before - timedelta(seconds=1) <= datetime.fromisoformat(entry["captured_at"]) <= datetime.now(UTC)
        naive = client.post(
            "/gallery", files=_files("files", [2]), data={"identity": "x", "captured_at": "2026-03-01T08:00:00"}
        ).json()[0]
        assert datetime.fromisoformat(naive["captured_at"]) == T0  # no offset: UTC
        bad = client.post("/gallery", files=_files("files", [3]), data={"identity": "x", "captured_at": "yesterday"})
        assert bad.status_code == 422 and bad.json()["code"] == "validation_error"


def test_camera_lists_and_time_windows(enrolled) -> None:
    client, entries, vectors = enrolled
    probe_seed = 9
    probe = np.array(client.post("/embed", files=_files("files", [probe_seed])).json()["results"][0]["embedding"])
    cases = [
        ([("cameras", "c1"), ("cameras", "c3")], [1, 4, 5]),
        ([("exclude_cameras", "c1"), ("exclude_cameras", "c2")], [4]),
        ([("cameras", "c2"), ("exclude_cameras", "c2")], []),
        ([("camera", "c2"), ("exclude_camera", "false"), ("cameras", "c3")], [2, 3, 4]),  # the older single field
        ([("camera", "c2")], [1, 4, 5]),
        ([("after", (T0 + timedelta(hours=2)).isoformat())], [3, 4, 5]),
        ([("before", (T0 + timedelta(hours=2)).isoformat())], [1, 2]),
        ([("after", "2026-03-01T09:00:00Z"), ("before", "2026-03-01T11:30:00+00:00"), ("cameras", "c2")], [2, 3]),
        ([("after", "2026-03-01T10:00:00+02:00")], [1, 2, 3, 4, 5]),  # 08:00 UTC
    ]
    for form, seeds in cases:
        [result] = _query(client, [probe_seed], [("top_k", "10"), *form])
        assert [m["id"] for m in result["matches"]] == _ranked(vectors, entries, probe, seeds), form
    wrong = client.post("/query", files=_files("file", [1]), data={"after": T0.isoformat(), "before": T0.isoformat()})
    assert wrong.status_code == 422 and wrong.json()["code"] == "invalid_time_window"


def test_track_queries_give_one_ranking(enrolled) -> None:
    client, entries, vectors = enrolled
    track = [11, 12, 13]
    probes = np.array([r["embedding"] for r in client.post("/embed", files=_files("files", track)).json()["results"]])
    seeds = [s for *_, s in ENROLMENTS]

    [mean] = _query(client, track, {"track": "mean", "top_k": "10"})
    assert mean["files"] == 3 and mean["filename"] is None
    assert [m["id"] for m in mean["matches"]] == _ranked(vectors, entries, probes.mean(0), seeds)
    expected = {entries[s]["id"]: float(np.linalg.norm(vectors[s] - probes.mean(0))) for s in seeds}
    np.testing.assert_allclose([m["distance"] for m in mean["matches"]], sorted(expected.values()), rtol=1e-4)

    [best] = _query(client, track, {"track": "min", "top_k": "3"})
    distances = {entries[s]["id"]: float(np.linalg.norm(probes - vectors[s], axis=1).min()) for s in seeds}
    assert [m["id"] for m in best["matches"]] == sorted(distances, key=distances.__getitem__)[:3]
    np.testing.assert_allclose([m["distance"] for m in best["matches"]], sorted(distances.values())[:3], rtol=1e-4)

    # A track query with filters: one ranking among the entries kept.
    [kept] = _query(client, track, [("track", "min"), ("cameras", "c2")])
    assert {m["camera"] for m in kept["matches"]} == {"c2"} and len(kept["matches"]) == 2

    per_file = _query(client, track, {"top_k": "2"})
    assert [r["filename"] for r in per_file] == ["11.png", "12.png", "13.png"] and all(
        r["files"] == 1 for r in per_file
    )
    refused = client.post("/query", files=_files("file", track), data={"track": "mean", "include_mask": "true"})
    assert refused.status_code == 422 and refused.json()["code"] == "invalid_combination"
    unknown = client.post("/query", files=_files("file", track), data={"track": "median"})
    assert unknown.status_code == 422 and unknown.json()["code"] == "validation_error"


def test_query_masks_come_from_one_batched_pass(enrolled) -> None:
    client, _, _ = enrolled
    masks = client.app.state.reid.embedder.masks
    before = masks.passes
    results = _query(client, [1, 2, 3], {"include_mask": "true"})
    assert all(r["mask_png_base64"] for r in results)
    assert masks.passes - before == 1


@pytest.fixture
def calibrated_weights(small_weights: Path, tmp_path: Path) -> Path:
    model = load_weights(small_weights)
    provenance = {
        **model.provenance,
        "thresholds": [{"fmr": 0.01, "distance": 1e-3, "tmr": 0.9}, {"fmr": 0.001, "distance": 1e6, "tmr": 0.5}],
        "threshold_split": "val",
    }
    return save_weights(tmp_path / "calibrated.safetensors", model.extractor, model.mask_generator, provenance)


def test_default_threshold_comes_from_the_weights(settings: Settings, calibrated_weights: Path) -> None:
    settings = settings.model_copy(update={"weights": calibrated_weights})
    with TestClient(create_app(settings)) as client:
        client.post("/gallery", files=_files("files", [1, 2]), data={"identity": "a"})
        [same] = _query(client, [1], {})
        assert same["threshold"] == 1e-3 and same["threshold_source"] == "weights (FMR 0.01, val)"
        assert [i["match"] for i in same["identities"]] == [True]  # the same crop: distance ~0
        [other] = _query(client, [7], {})
        assert [i["match"] for i in other["identities"]] == [False]  # a random crop: far over 1e-3
        [given] = _query(client, [7], {"threshold": "1e9"})
        assert given["threshold"] == 1e9 and given["threshold_source"] == "request"
        assert [i["match"] for i in given["identities"]] == [True]
    with TestClient(create_app(settings.model_copy(update={"threshold_fmr": 0.001}))) as client:
        [loose] = _query(client, [7], {})
        assert loose["threshold"] == 1e6 and loose["threshold_source"] == "weights (FMR 0.001, val)"
    with TestClient(create_app(settings.model_copy(update={"threshold_fmr": 0.05}))) as client:
        [none] = _query(client, [7], {})  # no calibration at that rate: no default
        assert none["threshold"] is None and none["threshold_source"] is None


def test_weights_without_thresholds_have_no_default(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        client.post("/gallery", files=_files("files", [1]), data={"identity": "a"})
        [result] = _query(client, [7], {})
        assert result["threshold"] is None and result["threshold_source"] is None
        assert client.get("/health").json()["backend"] == "onnxruntime CPUExecutionProvider"
