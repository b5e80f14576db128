"""The architecture settings that travel with the weights (timm's "pretrained_cfg" idea).

Every default is the paper's (Capozzi et al., "Optimizing Person Re-Identification using
Generated Attention Masks", section 2.1 and 3.2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

BACKBONES = ("resnet50", "resnet18", "mobilenet_v2")
NECK_FEATS = ("before", "after")


def _opt(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with its help (and optional ``choices``) in the metadata: training's CLI flags are
    derived from it."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = _opt("resnet50", "extractor trunk: the paper's resnet50; resnet18, mobilenet_v2", choices=BACKBONES)
    feat_dim: int = _opt(512, "template size: 1x1 conv -> feat_dim + BN + ReLU on the pooled trunk output")
    last_stride: int = _opt(
        2, "stride of the trunk's last downsampling: 2 (torchvision, paper) or 1 (the field's trick: a 2x larger map)"
    )
    unet_base_width: int = _opt(32, "U-Net level widths are base * 2**level: 32..512 in the paper")
    unet_levels: int = _opt(5, "U-Net resolution levels; input sides must be divisible by 2**(levels-1)")
    input_height: int = _opt(224, "network input height (paper: 224)")
    input_width: int = _opt(112, "network input width (paper: 112)")
    mean: tuple[float, float, float] = _opt(IMAGENET_MEAN, "normalisation mean (ImageNet's)")
    std: tuple[float, float, float] = _opt(IMAGENET_STD, "normalisation std (ImageNet's)")
    mask_ratio: float = _opt(0.3, "share of pixels hidden where the generated mask is highest")
    # The served template. The defaults are the paper's: the head's ReLU output as it is.
    bnneck: bool = _opt(False, "BatchNorm1d after the head (Luo et al.'s BNNeck); the ID loss reads its output")
    neck_feat: str = _opt("before", "serve the feature before or after the BNNeck", choices=NECK_FEATS)
    normalize: bool = _opt(False, "L2-normalise the served template (Euclidean distances then rank as cosine)")
    flip_average: bool = _opt(False, "serve the mean of the image's and its mirror's features (2x inference)")
    # Not the paper's: the field's layer for models that travel between sites (models.ibn).
    ibn: bool = _opt(False, "IBN-a: instance-normalise half of each block's first norm, in all stages but the last")

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
        if self.neck_feat not in NECK_FEATS:
            raise ValueError(f"unknown neck_feat {self.neck_feat!r}; choose {', '.join(NECK_FEATS)}")
        if self.neck_feat == "after" and not self.bnneck:
            raise ValueError("neck_feat='after' serves the BNNeck's output, so it needs bnneck=True")
        # JSON gives lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the images the networks are fed."""
        return (self.input_height, self.input_width)

    def to_dict(self) -> dict[str, Any]:
        """Every setting, except the served-feature ones added after format version 1 while they are at their
        (the paper's) defaults: the config of weights written before them, and so their fingerprint, stay the
        same; ``from_dict`` fills them in."""
        data = dataclasses.asdict(self)
        for name, default in _LATER_DEFAULTS.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model settings {unknown}; known settings are {sorted(known)}")
        return cls(**data)


def as_written(config: ModelConfig, format_version: int) -> ModelConfig:
    """The config of a file written in an older format, as its networks computed then: before format 2 a MobileNetV2
    trunk kept its last stride 2 whatever ``last_stride`` said (the strong recipe wrote 1)."""
    if format_version < 2 and config.backbone == "mobilenet_v2" and config.last_stride == 1:
        return dataclasses.replace(config, last_stride=2)
    return config


_LATER_DEFAULTS = {"bnneck": False, "neck_feat": "before", "normalize": False, "flip_average": False, "ibn": False}
