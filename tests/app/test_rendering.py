"""The mask pictures: the "hidden" view hides exactly round(mask_ratio x H x W) pixels, the ones training's
``models.masking.keep_map`` hides, ties included; over HTTP too."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from app.rendering import hidden_pixels, render_mask
from models import keep_map
from tests.app.conftest import png_bytes


@pytest.mark.parametrize("size", [(64, 32), (37, 19), (1, 1), (3, 5)])
@pytest.mark.parametrize("kind", ["random", "constant", "two_levels"])
def test_hidden_view_hides_exactly_the_training_top_k(size: tuple[int, int], kind: str) -> None:
    h, w = size
    rng = np.random.default_rng(h * w)
    mask = {
        "random": rng.random((h, w)),
        "constant": np.full((h, w), 0.5),  # every pixel tied: a quantile cutoff would hide them all
        "two_levels": (rng.random((h, w)) > 0.5).astype(np.float64),  # ties at the cutoff
    }[kind].astype(np.float32)
    hidden = hidden_pixels(mask, 0.3)
    assert hidden.sum() == round(0.3 * h * w)
    expected = keep_map(torch.from_numpy(mask)[None, None], 0.3)[0, 0].numpy() == 0
    np.testing.assert_array_equal(hidden, expected)
    if kind == "random":  # the hidden ones are the highest
        assert hidden.sum() == 0 or mask[hidden].min() >= mask[~hidden].max()

    image = Image.fromarray(rng.integers(1, 256, (h, w, 3), dtype=np.uint8))  # no pixel black to begin with
    picture = np.asarray(Image.open(io.BytesIO(render_mask(image, mask, "hidden", 0.3))))
    np.testing.assert_array_equal(picture.sum(-1) == 0, expected)


def test_unknown_view_is_named() -> None:
    with pytest.raises(ValueError, match="unknown view 'x'; choose mask, overlay, hidden"):
        render_mask(Image.new("RGB", (2, 2)), np.zeros((2, 2), np.float32), "x", 0.3)  # type: ignore[arg-type]


def test_hidden_view_over_http(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        crop = png_bytes(5, (30, 70))  # random pixels: none black
        [entry] = client.post("/gallery", files={"files": ("a.png", crop, "image/png")}, data={"identity": "a"}).json()
        for response in (
            client.get(f"/mask/{entry['id']}", params={"view": "hidden"}),
            client.post("/mask", params={"view": "hidden"}, files={"file": ("a.png", crop, "image/png")}),
        ):
            assert response.status_code == 200
            picture = np.asarray(Image.open(io.BytesIO(response.content)))
            assert picture.shape == (70, 30, 3) and (picture.sum(-1) == 0).sum() == round(0.3 * 70 * 30)
