"""Weights files cross a trust boundary: a pickle that runs code when unpickled is refused at start-up,
as REID_WEIGHTS or as REID_PRETRAINED, and its code never runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app


class Payload:
    """Unpickling this opens (so creates) ``marker``: the stand-in for any code an attacker wants run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _hostile(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "hook": Payload(marker)}, path)
    return path


def test_the_payload_is_live(tmp_path: Path) -> None:
    """The check below means something: a plain unpickling of the same file does run the code."""
    marker = tmp_path / "ran"
    with open(_hostile(tmp_path / "evil.pt", marker), "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["evil.safetensors", "evil.pt"])
def test_hostile_weights_file_is_refused_without_running_it(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "ran"
    settings = Settings(data_dir=tmp_path / "data", weights=_hostile(tmp_path / name, marker), device="cpu")
    with pytest.raises(ValueError, match=name.replace(".", r"\.")), TestClient(create_app(settings)):
        pass
    assert not marker.exists()


@pytest.mark.parametrize("name", ["evil.pth", "evil.safetensors"])
def test_hostile_pretrained_trunk_is_refused_without_running_it(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "ran"
    pretrained = _hostile(tmp_path / name, marker)
    settings = Settings(data_dir=tmp_path / "data", backbone="resnet18", pretrained=pretrained, device="cpu")
    with pytest.raises(ValueError, match=name.replace(".", r"\.")), TestClient(create_app(settings)):
        pass
    assert not marker.exists()
