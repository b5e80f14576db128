"""Training settings: every number of the paper (sections 2.2, 3.2, 3.3) as a default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from models import ModelConfig

AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class TrainConfig:
    dataset: str = "market1501"  # market1501, dukemtmc, cuhk03, folder, synthetic
    root: str = "data"  # the data set's folder
    out: str = "runs/default"  # the run folder: config, checkpoints, log, plots, weights
    backbone: str = "resnet50"  # the paper's; resnet18 / mobilenet_v2 for small machines
    pretrained: str | None = None  # local ImageNet weights file for the trunk (or "download")
    input_height: int = 224  # section 3.2: 224x112 crops
    input_width: int = 112
    feat_dim: int = 512  # template size (section 2.1)
    last_stride: int = 2
    unet_base_width: int = 32  # U-Net widths 32..512
    unet_levels: int = 5
    mask_ratio: float = 0.3  # top 30% of the mask hidden
    epochs: tuple[int, int, int] = (50, 25, 100)  # stages 1, 2, 3 (section 3.3)
    stages: tuple[int, ...] = (1, 2, 3)  # which stages this invocation runs
    p: int = 20  # identities per batch
    k: int = 3  # images per identity (P x K = 60)
    lr: float = 2e-4  # Adam, extractor
    warmup_epochs: int = 0  # linear lr warm-up of the extractor (from lr/10) over stage 1's first epochs; 0 = none
    freeze_blocks: int = 0  # leading trunk blocks kept at their ImageNet weights and BN statistics; 0 = none
    mask_lr: float = 1e-3  # Adam defaults, mask generator
    margin: float = 0.3  # triplet margin
    soft_margin: bool = False  # softplus instead of the hinge
    lambda1: float = 0.90  # clean vs masked triplet weight
    lambda2: float = 0.95  # identity vs sparsity + contiguity weight
    eval_every: int = 5  # evaluate every N epochs (and at each stage's end); 0 = only at the end
    flip_eval: bool = False  # average the features of the image and its mirror at evaluation
    device: str = "auto"  # auto = cuda when present, else cpu
    amp: str = "none"  # none, bf16, fp16 (CUDA only)
    channels_last: bool = False
    workers: int = 4
    seed: int = 0
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.epochs = tuple(int(e) for e in self.epochs)
        self.stages = tuple(int(s) for s in self.stages)
        if len(self.epochs) != 3 or any(e < 0 for e in self.epochs):
            raise ValueError(f"epochs must be three non-negative numbers (stages 1, 2, 3), got {self.epochs}")
        if (
            not self.stages
            or any(s not in (1, 2, 3) for s in self.stages)
            or list(self.stages) != sorted(set(self.stages))
        ):
            raise ValueError(f"stages must be an increasing list drawn from 1, 2, 3, got {self.stages}")
        if self.warmup_epochs < 0 or self.freeze_blocks < 0:
            raise ValueError(
                f"warmup_epochs and freeze_blocks must be >= 0, got {self.warmup_epochs}, {self.freeze_blocks}"
            )
        if self.amp not in AMP_MODES:
            raise ValueError(f"unknown amp mode {self.amp!r}; choose {', '.join(AMP_MODES)}")
        if self.p < 2 or self.k < 2:
            raise ValueError(f"p and k must be at least 2 for the triplet loss, got p={self.p}, k={self.k}")
        for name in ("lambda1", "lambda2"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        self.model_config()  # validates backbone, sizes and widths

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            backbone=self.backbone,
            feat_dim=self.feat_dim,
            last_stride=self.last_stride,
            unet_base_width=self.unet_base_width,
            unet_levels=self.unet_levels,
            input_height=self.input_height,
            input_width=self.input_width,
            mask_ratio=self.mask_ratio,
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["epochs"], data["stages"] = list(self.epochs), list(self.stages)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
