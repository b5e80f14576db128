"""The architecture settings that travel with the weights (timm's "pretrained_cfg" idea).

Every default is the paper's (Capozzi et al., "Optimizing Person Re-Identification using
Generated Attention Masks", section 2.1 and 3.2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

BACKBONES = ("resnet50", "resnet18", "mobilenet_v2")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet50"  # the paper's; resnet18 and mobilenet_v2 for small machines
    feat_dim: int = 512  # 1x1 conv -> feat_dim + BN + ReLU on the pooled trunk output
    last_stride: int = 2  # torchvision's (and the paper's); 1 is the field's re-ID trick for ResNets
    unet_base_width: int = 32  # U-Net level widths are base * 2**level: 32..512 in the paper
    unet_levels: int = 5  # resolution levels; inputs must have sides divisible by 2**(levels-1)
    input_height: int = 224
    input_width: int = 112
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mask_ratio: float = 0.3  # share of pixels hidden where the generated mask is highest

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose {', '.join(BACKBONES)}")
        if self.feat_dim < 1:
            raise ValueError(f"feat_dim must be positive, got {self.feat_dim}")
        if self.last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {self.last_stride}")
        if self.unet_base_width < 1 or self.unet_levels < 2:
            raise ValueError("unet_base_width must be >= 1 and unet_levels >= 2")
        multiple = 2 ** (self.unet_levels - 1)
        if self.input_height % multiple or self.input_width % multiple:
            raise ValueError(
                f"input size {self.input_height}x{self.input_width} must have sides divisible by "
                f"{multiple} for a {self.unet_levels}-level U-Net"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        # JSON gives lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the images the networks are fed."""
        return (self.input_height, self.input_width)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model settings {unknown}; known settings are {sorted(known)}")
        return cls(**data)
