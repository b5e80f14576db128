"""Section 3.2's pre-processing: resize to 234 x 117, random 224 x 112 crop, horizontal flip, ImageNet normalisation;
the strong recipe adds random erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020). Colour jitter,
off by default, is fast-reid's ``INPUT.CJ``: the field credits it with models that travel to other cameras.

Evaluation resizes straight to the input size (``build_eval_transform``, re-exported from ``models``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

from models import ModelConfig, build_eval_transform

logger = logging.getLogger(__name__)

# The paper resizes to 234 x 117 and crops 224 x 112: the resize is the input size scaled by 234 / 224.
PAPER_RESIZE_RATIO = 234 / 224


def train_resize(input_size: tuple[int, int]) -> tuple[int, int]:
    """(224, 112) -> (234, 117); other input sizes in the same ratio."""
    return (round(input_size[0] * PAPER_RESIZE_RATIO), round(input_size[1] * PAPER_RESIZE_RATIO))


# torchvision's (and the paper's) ranges of the erased rectangle: its share of the area and its aspect ratio.
ERASING_SCALE = (0.02, 0.33)
ERASING_RATIO = (0.3, 3.3)
# fast-reid's INPUT.CJ ranges (brightness, contrast, saturation, hue), applied to a crop with probability jitter_p.
COLOR_JITTER = {"brightness": 0.15, "contrast": 0.15, "saturation": 0.1, "hue": 0.1}


def build_train_transform(
    config: ModelConfig,
    resize: tuple[int, int] | None = None,
    flip_p: float = 0.5,
    erasing_p: float = 0.0,
    jitter_p: float = 0.0,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> (3, H, W) float tensor: resize, random crop to ``config.input_size``, flip, with
    probability ``jitter_p`` a colour jitter (``COLOR_JITTER``), normalise, and with probability ``erasing_p`` one
    random rectangle set to 0 (the mean pixel, after the normalisation)."""
    prepare, augment = split_train_transform(config, resize, flip_p, erasing_p, jitter_p)
    return v2.Compose([*prepare.transforms, *augment.transforms])


def split_train_transform(
    config: ModelConfig,
    resize: tuple[int, int] | None = None,
    flip_p: float = 0.5,
    erasing_p: float = 0.0,
    jitter_p: float = 0.0,
) -> tuple[v2.Compose, v2.Compose]:
    """``build_train_transform`` in two parts: the deterministic one (PIL image -> resized uint8 tensor), which a
    dataset may do once per image and keep, and the random one (crop, flip, jitter, normalise, erase), run every
    time."""
    resize = train_resize(config.input_size) if resize is None else tuple(resize)
    if resize[0] < config.input_height or resize[1] < config.input_width:
        raise ValueError(f"resize {resize} must be at least the input size {config.input_size} to crop from")
    if not 0.0 <= flip_p <= 1.0 or not 0.0 <= erasing_p <= 1.0 or not 0.0 <= jitter_p <= 1.0:
        raise ValueError(f"flip_p, erasing_p and jitter_p must be in [0, 1], got {flip_p}, {erasing_p}, {jitter_p}")
    jitter = [v2.RandomApply([v2.ColorJitter(**COLOR_JITTER)], p=jitter_p)] if jitter_p else []
    erasing = [v2.RandomErasing(p=erasing_p, scale=ERASING_SCALE, ratio=ERASING_RATIO, value=0)] if erasing_p else []
    prepare = v2.Compose([v2.ToImage(), v2.Resize(resize, antialias=True)])
    augment = v2.Compose(
        [
            v2.RandomCrop(config.input_size),
            v2.RandomHorizontalFlip(p=flip_p),
            *jitter,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(config.mean), std=list(config.std)),
            *erasing,
        ]
    )
    return prepare, augment


__all__ = [
    "COLOR_JITTER",
    "ERASING_RATIO",
    "ERASING_SCALE",
    "PAPER_RESIZE_RATIO",
    "build_eval_transform",
    "build_train_transform",
    "split_train_transform",
    "train_resize",
]
