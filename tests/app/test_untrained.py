"""Without REID_WEIGHTS the service serves the same untrained network at every start: built once, kept in the
data folder, so that a gallery enrolled under it opens again after a restart (SIGKILL included). Another
backbone or ImageNet trunk gets weights of its own, said in the log."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.embedder import Embedder
from app.untrained import ensure_untrained_weights, untrained_weights_path
from models import WeightsError, build_extractor, extractor_fingerprint, load_weights, save_weights
from models.config import ModelConfig
from tests.app.conftest import png_bytes
from tests.app.server import Server
from tests.conftest import MOBILENET_WEIGHTS, require_shared

BACKBONE = "mobilenet_v2"  # the smallest trunk, so that a real process starts quickly


def test_untrained_entries_survive_sigkill_and_queries_find_them(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    server = Server(data_dir, None, tmp_path / "server.log", REID_BACKBONE=BACKBONE, REID_BACKEND="torch")
    try:
        server.start()
        first = httpx.get(f"{server.url}/health", timeout=30).json()
        assert first["trained_weights"] is False and "meaningless" in first["warning"]
        assert first["weights"] == str(data_dir / f"untrained-{BACKBONE}.safetensors")
        acked: dict[int, int] = {}  # entry id -> image seed
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for seed in range(6):
                files = {"files": (f"{seed}.png", png_bytes(seed), "image/png")}
                response = client.post("/gallery", files=files, data={"identity": f"p{seed}"})
                assert response.status_code == 201, response.text
                acked[response.json()[0]["id"]] = seed

        server.kill()
        server.start()  # without the kept weights, the gallery would refuse to open here (ModelMismatch)

        again = httpx.get(f"{server.url}/health", timeout=30).json()
        assert again["fingerprint"] == first["fingerprint"] and again["trained_weights"] is False
        with httpx.Client(base_url=server.url, timeout=60) as client:
            listed = client.get("/gallery", params={"limit": 100}).json()
            assert {e["id"]: e["identity"] for e in listed["items"]} == {i: f"p{s}" for i, s in acked.items()}
            for entry_id, seed in acked.items():
                files = {"file": ("q.png", png_bytes(seed), "image/png")}
                response = client.post("/query", files=files, data={"top_k": len(acked)})
                assert response.status_code == 200, response.text
                matches = response.json()["results"][0]["matches"]
                assert matches[0]["id"] == entry_id and matches[0]["distance"] < 1e-3, matches[:2]
                assert len(matches) == len(acked)
    finally:
        server.stop()


def test_the_same_settings_serve_the_file_written_at_the_first_start(tmp_path: Path) -> None:
    path = ensure_untrained_weights(tmp_path, BACKBONE, None)
    assert path == tmp_path / f"untrained-{BACKBONE}.safetensors"
    written = path.stat()
    assert ensure_untrained_weights(tmp_path, BACKBONE, None) == path
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns), "rewritten"
    model = load_weights(path)
    assert model.mask_generator is None and model.provenance["trained"] is False
    assert model.provenance["source"] == "random initial weights"
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "a temporary file was left behind"


def test_another_backbone_or_trunk_gets_its_own_weights_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.untrained")
    random_trunk = ensure_untrained_weights(tmp_path, BACKBONE, None)
    fingerprint = load_weights(random_trunk).fingerprint
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    other = ensure_untrained_weights(tmp_path, "resnet18", None)
    assert other == tmp_path / "untrained-resnet18.safetensors" and load_weights(other).config.backbone == "resnet18"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "REID_BACKBONE=resnet18" in warning and random_trunk.name in warning and "reid-admin reembed" in warning

    imagenet = ensure_untrained_weights(tmp_path, BACKBONE, require_shared(MOBILENET_WEIGHTS))
    assert imagenet.name.startswith(f"untrained-{BACKBONE}-imagenet-") and imagenet != random_trunk
    assert load_weights(imagenet).provenance["source"] == f"ImageNet trunk from {MOBILENET_WEIGHTS}"
    assert untrained_weights_path(tmp_path, BACKBONE, MOBILENET_WEIGHTS) == imagenet  # named by the file's content

    # Back to the first settings: the first weights again, as the gallery enrolled under them needs.
    assert ensure_untrained_weights(tmp_path, BACKBONE, None) == random_trunk
    assert load_weights(random_trunk).fingerprint == fingerprint


def test_a_missing_imagenet_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"REID_PRETRAINED=\S*/nowhere\.pth does not exist"):
        ensure_untrained_weights(tmp_path, BACKBONE, tmp_path / "nowhere.pth")


def test_when_two_processes_race_both_serve_the_first_file_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = untrained_weights_path(tmp_path, BACKBONE, None)
    theirs = build_extractor(ModelConfig(backbone=BACKBONE)).eval()

    def build_while_another_process_writes(config: ModelConfig, pretrained: Path | None):
        save_weights(path, theirs, None, {"source": "the other process"})  # it finished first
        return build_extractor(config, pretrained)

    monkeypatch.setattr("app.untrained.build_extractor", build_while_another_process_writes)
    assert ensure_untrained_weights(tmp_path, BACKBONE, None) == path
    model = load_weights(path)
    assert model.provenance["source"] == "the other process"
    assert model.fingerprint == extractor_fingerprint(theirs.config, theirs.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_damaged_untrained_file_is_named_with_the_way_out(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, backbone=BACKBONE, device="cpu", backend="torch")
    untrained_weights_path(tmp_path, BACKBONE, None).write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError, match=rf"untrained-{BACKBONE}\.safetensors is corrupt.*delete it to build new"):
        Embedder.from_settings(settings)
