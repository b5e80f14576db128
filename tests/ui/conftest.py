"""Fixtures for the browser tests: Debian's chromium driven by Playwright, weights that rank real crops, and a
real uvicorn process per module."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from models import ModelConfig, build_extractor, build_mask_generator, save_weights
from tests.conftest import MOBILENET_WEIGHTS, REPO_ROOT, require_shared

CHROMIUM = Path("/usr/bin/chromium")
# Quiet, offline, headless: no component updates, sync or background fetches that would leave the origin.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Where the search-view screenshot goes (a CI artefact, ignored by git).
ARTIFACTS = Path(os.environ.get("REID_TEST_ARTIFACTS", REPO_ROOT / "artifacts"))
# Set by .ci/run after it installs chromium: there, a missing browser is a failure, not a skip.
REQUIRE_BROWSER = os.environ.get("REID_REQUIRE_BROWSER") == "1"
# Small, so that the page's images are the crops' own few pixels and the networks run in milliseconds.
UI_CONFIG = ModelConfig(backbone="mobilenet_v2", feat_dim=1280, unet_base_width=4, input_height=128, input_width=64)


def _missing(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"{reason}, but REID_REQUIRE_BROWSER=1 (CI installs it in .ci/run)")
    pytest.skip(f"{reason}: install it with `apt-get install chromium` (Debian) to run the browser tests")


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python is not installed (the dev extra has it)")
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        _missing(f"{CHROMIUM} is absent")
    executable = CHROMIUM if CHROMIUM.exists() else Path(shutil.which("chromium") or CHROMIUM)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def build_ui_weights(path: Path, pretrained: Path) -> Path:
    """ImageNet MobileNetV2 features with an identity head, and a small U-Net mask generator.

    Why these rank real crops: the template is exactly the trunk's pooled ImageNet features (the 1x1 head is
    the identity, its BatchNorm the identity in eval, and ReLU leaves the non-negative pooled features as they
    are). Such features find another shot of the same person from the same camera, a near-duplicate, nearest
    among a few people; the tests check that with a brute force before they rely on it. The U-Net is seeded,
    not trained: its masks vary over the crop, which is what the page must show faithfully."""
    torch.manual_seed(0)
    extractor = build_extractor(UI_CONFIG, pretrained)
    with torch.no_grad():
        conv = extractor.head[0]
        conv.weight.copy_(torch.eye(UI_CONFIG.feat_dim)[:, :, None, None])
        conv.bias.zero_()
    mask = build_mask_generator(UI_CONFIG)
    provenance = {"note": "test weights: ImageNet MobileNetV2 features, identity head, seeded U-Net"}
    return save_weights(path, extractor.eval(), mask.eval(), provenance)


@pytest.fixture(scope="session")
def ui_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pretrained = require_shared(MOBILENET_WEIGHTS)
    return build_ui_weights(tmp_path_factory.mktemp("ui-weights") / "ui.safetensors", pretrained)
