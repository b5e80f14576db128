"""Unnamed sightings (POST /sightings) grouped into people online, and the review of people (/people).

The small test weights are random, so appearance is made unambiguous: the join threshold is tiny, and the "same
person" is the same picture (distance 0) while different pictures are different people."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.ingest import Options, ingest
from app.main import create_app
from app.sightings import provisional_threshold
from models import load_weights, save_weights
from tests.app.conftest import png_bytes
from tests.conftest import SHARED_DATA, require_shared
from training.export import fmr_curve

T0 = "2026-03-01T10:00:00Z"


@pytest.fixture
def client(settings: Settings, database_url: str | None) -> Iterator[TestClient]:
    update = {"join_threshold": 1e-3, "backend": "torch", "database_url": database_url}
    with TestClient(create_app(settings.model_copy(update=update))) as client:
        yield client


def send(client: TestClient, crops: list[tuple[int, dict]], key: str | None = None):
    """POST /sightings of crops given as (picture seed, sighting)."""
    files = [("files", (f"{i}.png", png_bytes(seed), "image/png")) for i, (seed, _) in enumerate(crops)]
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(
        "/sightings", files=files, data={"sightings": json.dumps([s for _, s in crops])}, headers=headers
    )


def sighting(camera: str, track: str | None, at: str = T0, **extra) -> dict:
    return {"camera": camera, "track": track, "captured_at": at, **extra}


def test_tracklets_start_continue_and_join_people(client: TestClient) -> None:
    first = send(client, [(1, sighting("c1", "1")), (1, sighting("c1", "1")), (2, sighting("c1", "2"))])
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["threshold"] == pytest.approx(1e-3) and body["threshold_source"] == "REID_JOIN_THRESHOLD"
    one, two = body["tracklets"]
    assert (one["camera"], one["track"], one["joined"], len(one["entries"])) == ("c1", "1", "new", 2)
    assert two["joined"] == "new" and two["person"] != one["person"]
    assert one["identity"] == f"unknown-{one['person']}"

    # Another camera, later: the same picture is the same person; a new picture is someone new.
    later = send(client, [(1, sighting("c2", "9", "2026-03-01T10:05:00Z")), (3, sighting("c2", "10"))]).json()
    seen, stranger = later["tracklets"]
    assert seen["joined"] == "match" and seen["person"] == one["person"] and seen["distance"] < 1e-3
    assert stranger["joined"] == "new"

    # Track 1 of c1 goes on in a later request with a picture unlike the others: still the same person.
    going_on = send(client, [(4, sighting("c1", "1", "2026-03-01T10:00:30Z"))]).json()["tracklets"][0]
    assert going_on["joined"] == "track" and going_on["person"] == one["person"]

    # A track overlapping track 1 on camera c1 is somebody else, however alike.
    twin = send(client, [(1, sighting("c1", "77", "2026-03-01T10:00:10Z"))]).json()["tracklets"][0]
    assert twin["joined"] == "new" and twin["person"] != one["person"]

    person = client.get(f"/people/{one['person']}").json()
    assert person["person"]["sightings"] == 4 and person["person"]["tracks"] == 2
    assert [(v["camera"], v["sightings"]) for v in person["visits"]] == [("c1", 3), ("c2", 1)]
    listed = client.get("/people", params={"order": "size"})
    assert listed.headers["X-Total-Count"] == "4"
    assert listed.json()[0]["id"] == one["person"]  # the largest first
    assert {c["camera"] for c in listed.json()[0]["cameras"]} == {"c1", "c2"}


def test_a_named_person_is_found_by_query_and_joined_by_name(client: TestClient) -> None:
    person = send(client, [(5, sighting("c1", "1"))]).json()["tracklets"][0]["person"]
    named = client.post(f"/people/{person}/name", json={"name": "Ann"})
    assert named.status_code == 200 and named.json()["identity"] == "Ann" and named.json()["status"] == "named"
    query = client.post("/query", files=[("file", ("q.png", png_bytes(5), "image/png"))]).json()
    assert query["results"][0]["identities"][0]["identity"] == "Ann"
    again = send(client, [(5, sighting("c3", "4", "2026-03-01T11:00:00Z"))]).json()["tracklets"][0]
    assert (again["joined"], again["identity"], again["person"]) == ("match", "Ann", person)
    listing = client.get("/gallery", params={"identity": "Ann"}).json()
    assert listing["total"] == 2


def test_enrolled_identities_are_joined_and_reserved_labels_refused(client: TestClient) -> None:
    files = {"files": ("a.png", png_bytes(6), "image/png")}
    assert client.post("/gallery", files=files, data={"identity": "Bob"}).status_code == 201
    joined = send(client, [(6, sighting("c1", "1"))]).json()["tracklets"][0]
    assert (joined["joined"], joined["identity"], joined["person"]) == ("match", "Bob", None)
    refused = client.post("/gallery", files=files, data={"identity": "unknown-12"})
    assert refused.status_code == 422 and refused.json()["code"] == "reserved_identity"


def test_provisional_people_are_joined_under_the_stricter_threshold_identities_under_the_join_one(
    settings: Settings, small_weights: Path, tmp_path: Path
) -> None:
    """Weights calibrated at FMR 1e-2 (a distance every picture is under) and 1e-3 (one only the same picture is
    under): a new picture joins the named identity, never a provisional person."""
    model = load_weights(small_weights)
    thresholds = [{"fmr": 0.01, "distance": 1e6, "tmr": 1.0}, {"fmr": 0.001, "distance": 1e-3, "tmr": 0.5}]
    weights = save_weights(
        tmp_path / "calibrated.safetensors", model.extractor, None, {"thresholds": thresholds, "threshold_split": "val"}
    )
    update = {"weights": weights, "backend": "torch", "join_threshold": None}
    with TestClient(create_app(settings.model_copy(update=update))) as client:
        first = send(client, [(1, sighting("c1", "1"))]).json()
        assert first["threshold"] == 1e6 and first["threshold_source"] == "weights (FMR 0.01, val)"
        assert first["provisional_threshold"] == pytest.approx(1e-3)
        person = first["tracklets"][0]["person"]
        again = send(client, [(1, sighting("c2", "5"))]).json()["tracklets"][0]
        assert (again["joined"], again["person"]) == ("match", person)  # the same picture: under both
        other = send(client, [(2, sighting("c2", "6"))]).json()["tracklets"][0]
        assert other["joined"] == "new" and other["person"] != person  # under 1e6, not under 1e-3
        files = {"files": ("bob.png", png_bytes(3), "image/png")}
        assert client.post("/gallery", files=files, data={"identity": "Bob"}).status_code == 201
        for picture in range(4, 40):  # one whose nearest entry is a provisional person's, not Bob's
            query = client.post("/query", files={"file": ("q.png", png_bytes(picture), "image/png")})
            if query.json()["results"][0]["matches"][0]["identity"].startswith("unknown-"):
                break
        else:
            pytest.fail("no picture lies nearer a provisional person than Bob")
        named = send(client, [(picture, sighting("c3", "7"))]).json()["tracklets"][0]
        assert (named["joined"], named["identity"]) == ("match", "Bob")  # past the nearer provisional person
    with TestClient(create_app(settings.model_copy(update={**update, "provisional_join_fmr": 0.01}))) as client:
        joined = send(client, [(2, sighting("c4", "8"))]).json()["tracklets"][0]
        assert joined["joined"] == "match"  # at the join threshold's own rate, as before


def test_the_provisional_threshold_comes_off_the_curve_else_the_strictest_calibrated_one(settings: Settings) -> None:
    # The default rate, 1e-4, is under the thresholds training calibrates (1e-2, 1e-3) but on its curve.
    impostor = np.random.default_rng(0).uniform(25.0, 35.0, 100_000)
    thresholds = [{"fmr": 0.01, "distance": 34.0}, {"fmr": 0.001, "distance": 26.0}]
    provenance = {"thresholds": thresholds, "fmr_curve": fmr_curve(impostor), "threshold_split": "val"}
    assert settings.provisional_join_fmr == 1e-4
    assert provisional_threshold(settings, provenance, True, 34.0) == pytest.approx(
        np.quantile(impostor, 1e-4), abs=0.01
    )
    assert provisional_threshold(settings, {"thresholds": thresholds}, True, 34.0) == 26.0  # no curve: its 1e-3 one
    assert provisional_threshold(settings, {"thresholds": thresholds}, True, 20.0) == 20.0  # never above the join one
    assert provisional_threshold(settings, {}, True, 34.0) == 34.0  # no calibration: the join threshold
    assert provisional_threshold(settings, provenance, True, None) is None


def test_merge_split_ignore_and_count(client: TestClient) -> None:
    a, b = (
        t["person"]
        for t in send(client, [(7, sighting("c1", "1")), (8, sighting("c2", "2", "2026-03-01T10:10:00Z"))]).json()[
            "tracklets"
        ]
    )
    merged = client.post(f"/people/{a}/merge", json={"into": b})
    assert merged.status_code == 200 and merged.json()["id"] == b and merged.json()["sightings"] == 2
    assert client.get(f"/people/{a}").json()["person"]["status"] == "merged"
    assert client.post(f"/people/{a}/merge", json={"into": b}).status_code == 409
    # A sighting of a's picture now joins b.
    assert send(client, [(7, sighting("c3", "3", "2026-03-01T12:00:00Z"))]).json()["tracklets"][0]["person"] == b

    visits = client.get(f"/people/{b}").json()["visits"]
    c1_entries = next(v["entries"] for v in visits if v["camera"] == "c1")
    split = client.post(f"/people/{b}/split", json={"entries": c1_entries})
    assert split.status_code == 200 and split.json()["id"] not in (a, b) and split.json()["sightings"] == 1
    assert client.post(f"/people/{b}/split", json={"entries": [10**9]}).status_code == 409

    count = client.get("/people/count").json()["people"]
    assert count == 2
    assert client.post(f"/people/{split.json()['id']}/ignore").json()["status"] == "ignored"
    assert client.get("/people/count").json()["people"] == 1
    assert client.get("/people/count", params={"cameras": ["c2"]}).json()["people"] == 1
    assert client.get("/people/count", params={"after": "2026-03-01T11:00:00Z"}).json()["people"] == 1
    assert client.get("/people/424242").status_code == 404


def test_a_retried_request_is_not_enrolled_twice(client: TestClient) -> None:
    first = send(client, [(9, sighting("c1", "1"))], key="tracker-batch-1")
    again = send(client, [(9, sighting("c1", "1"))], key="tracker-batch-1")
    assert first.status_code == again.status_code == 201
    assert again.headers.get("Idempotent-Replayed") == "true" and again.json() == first.json()
    assert client.get("/people").headers["X-Total-Count"] == "1"


@pytest.mark.parametrize(
    ("sightings", "message"),
    [
        ("not json", "sightings"),
        ('[{"camera": "c1"}, {"camera": "c1"}]', "2 sightings for 1 files"),
        ('[{"track": "1"}]', "camera"),
        ('[{"camera": "c1", "box": [0, 0, 0, 10]}]', "width and height"),
        ('[{"camera": "c1", "colour": "red"}]', "colour"),
        ('[{"camera": "c\\u0000"}]', "control character"),
    ],
)
def test_bad_sightings_are_refused_with_a_sentence(client: TestClient, sightings: str, message: str) -> None:
    files = [("files", ("a.png", png_bytes(1), "image/png"))]
    answer = client.post("/sightings", files=files, data={"sightings": sightings})
    assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
    assert client.get("/gallery").json()["total"] == 0


def test_without_a_threshold_tracklets_only_continue_tracks(settings: Settings, tmp_path: Path) -> None:
    """Random weights carry no calibration: nothing is matched by appearance, tracks still continue."""
    with TestClient(create_app(settings.model_copy(update={"backend": "torch"}))) as client:
        first = send(client, [(1, sighting("c1", "1"))]).json()
        assert first["threshold"] is None and first["tracklets"][0]["joined"] == "new"
        same_picture = send(client, [(1, sighting("c2", "1"))]).json()["tracklets"][0]
        assert same_picture["joined"] == "new"
        going_on = send(client, [(2, sighting("c1", "1", "2026-03-01T10:01:00Z"))]).json()["tracklets"][0]
        assert going_on["joined"] == "track"


def write_camera(folder: Path, people: dict[int, tuple[Image.Image, tuple[int, int]]], frames: int) -> Path:
    """An image-sequence folder (MOT's img1/ layout) with these people pasted at fixed places, and its MOT file."""
    (folder / "img1").mkdir(parents=True)
    lines = []
    for frame in range(1, frames + 1):
        canvas = Image.new("RGB", (320, 256), (90, 110, 90))
        for track, (crop, (x, y)) in people.items():
            canvas.paste(crop, (x, y))
            lines.append(f"{frame},{track},{x},{y},{crop.width},{crop.height},0.9,-1,-1,-1")
        canvas.save(folder / "img1" / f"{frame:06d}.png")
    (folder / "gt.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_a_trackers_two_cameras_come_out_as_people(client: TestClient, tmp_path: Path) -> None:
    """Real CUHK03 crops pasted into frames of two cameras with their MOT files, sent by ``reid-admin ingest``'s
    code through the service: the person seen on both cameras is one person, the other is another."""
    val = require_shared(SHARED_DATA / "cuhk03-detected" / "val")
    walker, other = (Image.open(val / name).convert("RGB").resize((48, 112)) for name in ("0000_00.jpg", "0001_00.jpg"))
    door = write_camera(tmp_path / "door", {1: (walker, (40, 60)), 2: (other, (200, 60))}, frames=6)
    hall = write_camera(tmp_path / "hall", {7: (walker, (40, 60))}, frames=6)
    start = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    for folder, camera, at in ((door, "door", start), (hall, "hall", start + timedelta(minutes=5))):
        options = Options(camera=camera, fps=5.0, start_time=at, best_k=3, min_box=32)
        summary = ingest(folder / "gt.txt", folder / "img1", options, client)
        assert (summary.tracks, summary.crops) == ((2, 6) if camera == "door" else (1, 3))
        again = ingest(folder / "gt.txt", folder / "img1", options, client)  # resumed: nothing left to send
        assert (again.tracks, again.already_sent) == (0, summary.tracks)

    people = client.get("/people").json()
    assert len(people) == 2
    cameras = sorted(sorted(c["camera"] for c in p["cameras"]) for p in people)
    assert cameras == [["door"], ["door", "hall"]]
    both = next(p for p in people if len(p["cameras"]) == 2)
    assert both["sightings"] == 6 and both["tracks"] == 2
    visits = client.get(f"/people/{both['id']}").json()["visits"]
    assert [(v["camera"], v["first_seen"]) for v in visits] == [
        ("door", "2026-03-01T10:00:00Z"),
        ("hall", "2026-03-01T10:05:00Z"),
    ]


def test_a_tracklets_distances_get_back_what_averaging_took_out() -> None:
    """Thresholds are calibrated on pairs of single crops; a mean of two crops lies nearer to a stranger than either
    crop does. With the correction the mean's distance is the crops' own again (here exactly: the stranger stands
    square to the two crops' difference)."""
    import numpy as np

    from app.sightings import Sighting, averaged_out

    crops = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    stranger = np.array([0.0, 2.0, 0.0])
    seen = [Sighting("c1", datetime(2026, 3, 1, tzinfo=UTC), box=(0, 0, 10, 20)) for _ in range(2)]
    mean_distance2 = float(((crops.mean(0) - stranger) ** 2).sum())  # 4: nearer than each crop's 5
    for aggregation in ("mean", "quality"):  # equal boxes: the same weights
        lost = averaged_out(crops, seen, aggregation)
        assert lost == pytest.approx(1.0)
        assert np.sqrt(mean_distance2 + lost) == pytest.approx(np.linalg.norm(crops[0] - stranger))
    assert averaged_out(crops[:1], seen[:1], "mean") == 0.0  # a crop alone lost nothing
