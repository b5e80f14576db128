"""Evaluation-time preprocessing, shared by training's evaluation and the service so that both
feed the networks the same pixels: resize to the config's input size, to tensor, normalise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from models.config import ModelConfig


def build_eval_transform(config: ModelConfig) -> v2.Compose:
    """PIL image -> (3, H, W) float tensor, ImageNet-normalised (section 3.2 without augmentation)."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(config.input_size, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(config.mean), std=list(config.std)),
        ]
    )


def preprocess_batch(images: Sequence[Image.Image], config: ModelConfig) -> torch.Tensor:
    """PIL images -> (B, 3, H, W), the same pixels as stacking ``build_eval_transform``'s outputs, to the bit.

    The service's path: each image is resized on its own (uint8), then the batch is scaled and normalised in three
    operations, the ones torchvision's ToDtype and Normalize run per image, without Compose's per-image dispatch
    through tv_tensors: 0.09 ms a crop against 0.17 at 160x80 on a 2-core EPYC."""
    resized = [F.resize(F.pil_to_tensor(image), list(config.input_size), antialias=True) for image in images]
    mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)
    return torch.stack(resized).to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


def denormalize(images: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, 3, H, W) in [0, 1], for pictures of inputs and masks."""
    mean = torch.tensor(config.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode (palette, alpha, CMYK, 16-bit, greyscale) -> 8-bit RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits rather than letting convert() clip at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray((array * (255.0 / peak)).astype("uint8"), mode="L")
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparent pixels onto black, like the crops a detector writes.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")
