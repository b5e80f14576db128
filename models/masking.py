"""Hiding the most important pixels (section 2): per image, the ``ratio`` share of pixels where
the generated mask is highest is set to zero, forcing the extractor to look elsewhere.

Images are ImageNet-normalised, so a zeroed pixel becomes the ImageNet mean colour: the usual
reading of "erasing" in the field (random erasing and batch feature erasing do the same).
"""

from __future__ import annotations

import torch


def keep_map(mask: torch.Tensor, ratio: float = 0.3) -> torch.Tensor:
    """(B, 1, H, W) mask -> (B, 1, H, W) float map, 0 on the top ``round(ratio*H*W)`` pixels of
    each image and 1 elsewhere. Ties (a constant mask, say) are broken by position, so exactly
    that many pixels are hidden whatever the values."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must have shape (B, 1, H, W), got {tuple(mask.shape)}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    b, _, h, w = mask.shape
    k = round(ratio * h * w)
    flat = mask.detach().reshape(b, h * w)
    keep = torch.ones_like(flat, dtype=torch.float32)
    if k:
        top = torch.argsort(flat.float(), dim=1, descending=True, stable=True)[:, :k]
        keep.scatter_(1, top, 0.0)
    return keep.reshape(b, 1, h, w).to(mask.dtype)


def hide_top(images: torch.Tensor, mask: torch.Tensor, ratio: float = 0.3) -> torch.Tensor:
    """(B, C, H, W) images with the top ``ratio`` of each image's mask hidden. No gradient flows
    to the mask: in stage 3 the masked images train the extractor only."""
    return images * keep_map(mask, ratio)
