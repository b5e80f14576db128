"""The mask as pictures: the mask itself (grey), a heat map over the crop, and the crop with the mask's top
``mask_ratio`` of pixels hidden, by exactly the rule training hid them with (``models.masking.keep_map``)."""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import torch
from PIL import Image

from models import keep_map

View = Literal["mask", "overlay", "hidden"]
VIEWS: tuple[View, ...] = ("mask", "overlay", "hidden")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def heat(mask: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8, a blue-to-red "jet"-like colour map."""
    r = np.clip(1.5 - np.abs(4 * mask - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * mask - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * mask - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def hidden_pixels(mask: np.ndarray, ratio: float) -> np.ndarray:
    """(H, W) bool, True on the ``round(ratio * H * W)`` pixels training would hide: ``models.masking``'s exact
    top-k, ties broken by position (a quantile cutoff would hide every pixel tied at the cutoff)."""
    keep = keep_map(torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None], ratio)
    return keep[0, 0].numpy() == 0


def render_mask(image: Image.Image, mask: np.ndarray, view: View, ratio: float) -> bytes:
    """A PNG at the image's size. ``mask``: (H, W) in [0, 1] at that size."""
    if view == "mask":
        return png((mask * 255).round().astype(np.uint8))
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if view == "overlay":
        return png((0.5 * rgb + 0.5 * heat(mask)).astype(np.uint8))
    if view == "hidden":
        hidden = rgb.copy()
        hidden[hidden_pixels(mask, ratio)] = 0
        return png(hidden.astype(np.uint8))
    raise ValueError(f"unknown view {view!r}; choose {', '.join(VIEWS)}")
