"""The service's batched preprocessing feeds the networks the very pixels training's evaluation does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models import ModelConfig, build_eval_transform, preprocess_batch
from tests.conftest import SHARED_DATA, require_shared


def crops() -> list[Image.Image]:
    """Real crops of three data sets (JPEG and PNG, several sizes), and odd shapes: a sliver, a square, noise."""
    folders = [SHARED_DATA / "cuhk03-detected" / "val", SHARED_DATA / "cuhk01-site" / "images"]
    files = [p for folder in folders for p in sorted(require_shared(folder).iterdir())[:12]]
    images = [Image.open(p).convert("RGB") for p in files]
    rng = np.random.default_rng(0)
    images.append(Image.new("RGB", (7, 300), (10, 200, 30)))
    images.append(Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)))
    return images


@pytest.mark.parametrize("size", [(160, 80), (256, 128)])
def test_batched_preprocessing_equals_the_eval_transform_to_the_bit(size: tuple[int, int]) -> None:
    config = ModelConfig(input_height=size[0], input_width=size[1])
    images = crops()
    transform = build_eval_transform(config)
    expected = torch.stack([transform(image) for image in images])
    got = preprocess_batch(images, config)
    assert got.shape == (len(images), 3, *size)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
