"""Adapting a running gallery to its own cameras, as an operator does it, each step in its own process:
``reid-admin export-crops`` (the stored crops with cameras, no names), ``python -m training adapt`` on that
manifest, then ``reid-admin reembed`` under the adapted weights, after which the service starts and matches."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from models import load_weights

REPO = Path(__file__).resolve().parents[2]


def person_crop(person: int, camera: int, shot: int) -> bytes:
    """A person's crops look alike (their own coarse pattern), each camera with its own cast."""
    pattern = np.random.default_rng(person).integers(0, 256, size=(8, 4, 3)).astype(np.float32)
    noise = np.random.default_rng(1000 * person + 10 * camera + shot).normal(0, 12, (64, 32, 3))
    pixels = np.kron(pattern, np.ones((8, 8, 1))) + noise + 30 * camera
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def admin(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.admin", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_export_crops_then_adapt_then_reembed(settings: Settings, tmp_path: Path) -> None:
    people, shots = 10, 2
    with TestClient(create_app(settings)) as client:
        for person in range(people):
            for camera in range(2):
                files = [("files", (f"{s}.png", person_crop(person, camera, s), "image/png")) for s in range(shots)]
                data = {"identity": f"person {person}", "camera": f"gate-{camera}"}
                assert client.post("/gallery", files=files, data=data).status_code == 201
    env = {**os.environ, "REID_DATA_DIR": str(settings.data_dir), "REID_WEIGHTS": str(settings.weights),
           "REID_DEVICE": "cpu", "REID_BACKEND": "torch"}  # fmt: skip

    site = tmp_path / "site"
    done = admin(env, "export-crops", "--out", str(site))
    assert done.returncode == 0, done.stderr
    with (site / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == people * 2 * shots and set(rows[0]) == {"path", "camid", "camera", "track", "captured_at"}
    assert {(r["camid"], r["camera"]) for r in rows} == {("0", "gate-0"), ("1", "gate-1")}
    assert all((site / r["path"]).is_file() for r in rows)
    assert not any("person" in value for r in rows for value in r.values())  # no name leaves the gallery
    again = admin(env, "export-crops", "--out", str(site))  # a rerun: the same manifest, crops already there
    assert again.returncode == 0 and (site / "manifest.csv").read_text().count("\n") == len(rows) + 1

    run = tmp_path / "adapted"
    adapted = subprocess.run(
        [sys.executable, "-m", "training", "adapt", "--weights", str(settings.weights), "--site", str(site),
         "--out", str(run), "--rounds", "1", "--steps", "2", "--p", "4", "--k", "2", "--k1", "4", "--k2", "2",
         "--eps", "0.9", "--min-samples", "2", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert adapted.returncode == 0, adapted.stderr
    weights = run / "model.safetensors"
    provenance = load_weights(weights).provenance["adaptation"]
    assert provenance["site_crops"] == len(rows) and provenance["site_cameras"] == 2

    done = admin({**env, "REID_WEIGHTS": str(weights)}, "reembed")
    assert done.returncode == 0, done.stderr
    new_settings = settings.model_copy(update={"weights": weights})
    with TestClient(create_app(new_settings)) as client:
        files = {"file": ("q.png", person_crop(3, 0, 0), "image/png")}
        top = client.post("/query", files=files, data={"top_k": 1}).json()["results"][0]["matches"][0]
        assert top["identity"] == "person 3" and top["distance"] < 1e-3  # the enrolled crop itself


def test_export_crops_of_an_empty_gallery_says_so(settings: Settings, tmp_path: Path) -> None:
    with TestClient(create_app(settings)):
        pass
    env = {**os.environ, "REID_DATA_DIR": str(settings.data_dir), "REID_WEIGHTS": str(settings.weights)}
    done = admin(env, "export-crops", "--out", str(tmp_path / "site"))
    assert done.returncode == 1 and "the gallery holds no crops to export" in done.stderr
    assert "Traceback" not in done.stderr
