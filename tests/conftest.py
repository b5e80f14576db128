"""Fixtures shared by every test package: seeded CPU torch, services without an API key, paths to the real data in
../shared."""

from __future__ import annotations

from collections.abc import Iterator
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


@pytest.fixture(scope="session", autouse=True)
def _no_api_key() -> Iterator[None]:
    """The tests' services run on loopback without a key, which the service refuses unless told: told here, once,
    for every ``Settings`` built in this process (a test of the refusal removes it; ``tests.app.server.Server``
    tells its own processes). Session-scoped so that module fixtures building an app see it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("REID_API_KEY", raising=False)
        patch.setenv("REID_ALLOW_UNAUTHENTICATED", "true")
        yield


def require_shared(path: Path) -> Path:
    """Skip, with the reason, where the real data beside the checkout is absent (CI has it)."""
    if not path.exists():
        pytest.skip(f"{path} is absent: the real data in ../shared is not beside this checkout")
    return path
