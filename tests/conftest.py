"""Fixtures shared by every test package: seeded CPU torch, paths to the real data in ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
SHARED_DATA = SHARED / "data"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.safetensors"


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def require_shared(path: Path) -> Path:
    """Skip, with the reason, where the real data beside the checkout is absent (CI has it)."""
    if not path.exists():
        pytest.skip(f"{path} is absent: the real data in ../shared is not beside this checkout")
    return path
