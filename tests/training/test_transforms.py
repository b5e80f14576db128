"""Section 3.2's training transform: 234 x 117 resize, 224 x 112 crop, flip p = 0.5, ImageNet normalisation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from models import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from training.transforms import build_eval_transform, build_train_transform, train_resize


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_paper_sizes() -> None:
    assert train_resize((224, 112)) == (234, 117)
    out = build_train_transform(ModelConfig())(_image(300, 140))
    assert out.shape == (3, 224, 112) and out.dtype == torch.float32
    assert build_eval_transform(ModelConfig())(_image(300, 140)).shape == (3, 224, 112)


def test_crop_is_a_window_of_the_resized_image_normalised_with_imagenet_statistics() -> None:
    config = ModelConfig(backbone="resnet18", input_height=64, input_width=32)
    image = _image(68, 36)  # already the resize size: the crop is a plain window of the pixels
    out = build_train_transform(config, resize=(68, 36), flip_p=0.0)(image)
    assert out.shape == (3, 64, 32)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    normalised = (pixels - mean) / std
    windows = [normalised[:, y : y + 64, x : x + 32] for y in range(5) for x in range(5)]
    assert min((out - w).abs().max().item() for w in windows) < 1e-5


def test_flip_happens_about_half_the_time() -> None:
    config = ModelConfig(backbone="resnet18", input_height=64, input_width=32)
    image = _image(64, 32, seed=1)  # resize == input size: no crop freedom, so only the flip changes the output
    plain = build_train_transform(config, resize=(64, 32), flip_p=0.0)(image)
    flipped = plain.flip(-1)
    transform = build_train_transform(config, resize=(64, 32))
    torch.manual_seed(0)
    n, flips = 400, 0
    for _ in range(n):
        out = transform(image)
        if torch.allclose(out, flipped):
            flips += 1
        else:
            assert torch.allclose(out, plain)
    assert abs(flips / n - 0.5) < 0.1  # 5 standard deviations of a fair coin over 400 draws
    assert all(torch.allclose(build_train_transform(config, (64, 32), flip_p=1.0)(image), flipped) for _ in range(5))


def test_bad_arguments_are_errors() -> None:
    config = ModelConfig()
    with pytest.raises(ValueError, match=re.escape("resize (200, 100) must be at least the input size (224, 112)")):
        build_train_transform(config, resize=(200, 100))
    with pytest.raises(ValueError, match=re.escape("flip_p, erasing_p and jitter_p must be in [0, 1], got 1.5, 0.0")):
        build_train_transform(config, flip_p=1.5)
    with pytest.raises(ValueError, match=re.escape("got 0.5, -0.1, 0.0")):
        build_train_transform(config, erasing_p=-0.1)
    with pytest.raises(ValueError, match=re.escape("got 0.5, 0.0, 2.0")):
        build_train_transform(config, jitter_p=2.0)


def test_colour_jitter_changes_colours_within_bounds_and_nothing_when_off() -> None:
    config = ModelConfig(backbone="resnet18", input_height=64, input_width=32)
    image = _image(64, 32, seed=3)
    plain = build_train_transform(config, resize=(64, 32), flip_p=0.0)(image)
    jitter = build_train_transform(config, resize=(64, 32), flip_p=0.0, jitter_p=1.0)
    std = torch.tensor(config.std).view(3, 1, 1)
    torch.manual_seed(0)
    for _ in range(20):
        out = jitter(image)
        assert out.shape == plain.shape and not torch.equal(out, plain)
        # Brightness alone scales each pixel by at most 1 +- 0.15; with contrast, saturation and hue the change
        # stays a small fraction of the 0..1 pixel range (the difference times std undoes the normalisation).
        assert ((out - plain) * std).abs().mean() < 0.15
    never = build_train_transform(config, resize=(64, 32), flip_p=0.0, jitter_p=0.0)
    assert torch.equal(never(image), plain)


def test_random_erasing_blanks_one_rectangle_within_its_area_and_aspect_bounds() -> None:
    from training.transforms import ERASING_RATIO, ERASING_SCALE

    config = ModelConfig(backbone="resnet18", input_height=64, input_width=32)
    image = _image(64, 32, seed=2)
    plain = build_train_transform(config, resize=(64, 32), flip_p=0.0)(image)
    erasing = build_train_transform(config, resize=(64, 32), flip_p=0.0, erasing_p=1.0)
    torch.manual_seed(0)
    for _ in range(50):
        out = erasing(image)
        erased = (out != plain).any(0)  # (H, W): the pixels that changed
        assert erased.any() and (out[:, erased] == 0).all()  # set to 0: the mean pixel after normalisation
        rows, cols = erased.any(1).nonzero().flatten(), erased.any(0).nonzero().flatten()
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert erased[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # one solid rectangle inside the crop
        # torchvision rounds the side lengths, so the area and the aspect ratio are within a pixel of the bounds
        area = h * w / (64 * 32)
        assert ERASING_SCALE[0] * 0.8 <= area <= ERASING_SCALE[1] * 1.2, (h, w)
        assert ERASING_RATIO[0] * 0.7 <= h / w <= ERASING_RATIO[1] * 1.4, (h, w)
    never = build_train_transform(config, resize=(64, 32), flip_p=0.0, erasing_p=0.0)
    assert torch.equal(never(image), plain)
