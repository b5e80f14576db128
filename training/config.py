"""Training settings: every number of the paper (sections 2.2, 3.2, 3.3) as a default, and the field's strong
recipe as a named set of overrides.

``TrainConfig`` nests the ``ModelConfig`` that travels with the weights, so each setting has one home; the
CLI's flags are derived from both dataclasses (``training.cli``), each field's ``help`` in its metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from models import ModelConfig

AMP_MODES = ("none", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine", "step")
HIDDEN_BN_STATS = ("clean", "both")


def _opt(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with its CLI help (and optional ``choices``) in the metadata."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class TrainConfig:
    dataset: str = _opt(
        "market1501",
        "data set layout under --root",
        choices=("market1501", "dukemtmc", "cuhk03", "folder", "synthetic"),
    )
    root: str = _opt("data", "folder holding the data set")
    out: str = _opt("runs/default", "run folder: config, checkpoints, log, plots, weights")
    recipe: str = _opt(
        "paper", "named defaults: paper (the paper's numbers) or strong (the field's BoT)", choices=("paper", "strong")
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrained: str | None = _opt(None, "local ImageNet weights file for the trunk (or 'download')")
    epochs: tuple[int, int, int] = _opt((50, 25, 100), "epochs of stages 1,2,3 (section 3.3)")
    stages: tuple[int, ...] = _opt((1, 2, 3), "stages this invocation runs, e.g. 1,2,3 or 2")
    epoch_batches: int = _opt(
        0, "cap an epoch at N P x K batches (global), a random share of the identities each epoch; 0 = all (paper)"
    )
    p: int = _opt(20, "identities per batch")
    k: int = _opt(3, "images per identity (P x K = 60)")
    lr: float = _opt(2e-4, "Adam lr of the extractor (and the ID loss's classifier)")
    head_lr_factor: float = _opt(
        1.0, "the ID loss classifier's lr as a multiple of --lr (fast-reid's HEADS_LR_FACTOR; Luo et al.: 1)"
    )
    warmup_epochs: int = _opt(0, "linear lr warm-up of the extractor from lr/10 over its first N epochs; 0 = none")
    lr_schedule: str = _opt(
        "constant", "extractor lr after the warm-up: constant (paper), cosine or step", choices=LR_SCHEDULES
    )
    lr_steps: tuple[int, ...] = _opt((40, 70), "step schedule: the extractor epochs where the lr is divided by 10")
    freeze_blocks: int = _opt(0, "leading trunk blocks kept at their ImageNet weights and BN statistics; 0 = none")
    mask_lr: float = _opt(1e-3, "Adam lr of the mask generator")
    margin: float = _opt(0.3, "triplet margin")
    soft_margin: bool = _opt(False, "softplus instead of the triplet hinge")
    id_loss_weight: float = _opt(0.0, "weight of the ID loss (cross-entropy on the BNNeck feature); 0 = off")
    label_smoothing: float = _opt(0.0, "label smoothing of the ID loss (the field's 0.1)")
    random_erasing: float = _opt(0.0, "probability of random erasing a training crop (the field's 0.5)")
    color_jitter: float = _opt(
        0.0, "probability of a colour jitter of a training crop (fast-reid's INPUT.CJ ranges; its PROB 0.5); 0 = off"
    )
    # The paper does not say which views feed BatchNorm's running statistics. The served forward sees clean crops
    # only, so by default only the clean view updates them (the hidden view is still normalised with its own
    # batch statistics in training), as AdvProp keeps perturbed views out of the clean BN (Xie et al., 2020).
    hidden_bn_stats: str = _opt(
        "clean",
        "stage 3: BatchNorm running statistics from the clean view only (clean) or from both views (both)",
        choices=HIDDEN_BN_STATS,
    )
    lambda1: float = _opt(0.90, "weight of the clean triplet loss in stage 3")
    lambda2: float = _opt(0.95, "weight of the identity loss of the mask generator")
    eval_every: int = _opt(5, "evaluate every N epochs (and at each stage's end); 0 = only at the end")
    rerank: bool = _opt(False, "k-reciprocal re-ranking (Zhong et al., 2017) at evaluation")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N (auto = cuda when present)")
    amp: str = _opt("none", "mixed precision: bf16 (CUDA or CPU) or fp16 (CUDA)", choices=AMP_MODES)
    channels_last: bool = _opt(False, "channels_last memory format")
    workers: int = _opt(4, "data loader processes")
    cache_images: bool = _opt(
        False, "keep each training image decoded and resized in memory (3 x its resized H x W bytes, per worker)"
    )
    seed: int = _opt(0, "random seed")
    dataset_kwargs: dict[str, Any] = field(default_factory=dict, metadata={"help": "reader options (query_camid)"})

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):  # from JSON
            self.model = ModelConfig.from_dict(self.model)
        self.epochs = tuple(int(e) for e in self.epochs)
        self.stages = tuple(int(s) for s in self.stages)
        self.lr_steps = tuple(int(s) for s in self.lr_steps)
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose {', '.join(RECIPES)}")
        if len(self.epochs) != 3 or any(e < 0 for e in self.epochs):
            raise ValueError(f"epochs must be three non-negative numbers (stages 1, 2, 3), got {self.epochs}")
        if (
            not self.stages
            or any(s not in (1, 2, 3) for s in self.stages)
            or list(self.stages) != sorted(set(self.stages))
        ):
            raise ValueError(f"stages must be an increasing list drawn from 1, 2, 3, got {self.stages}")
        if self.warmup_epochs < 0 or self.freeze_blocks < 0 or self.epoch_batches < 0:
            raise ValueError(
                "warmup_epochs, freeze_blocks and epoch_batches must be >= 0, got "
                f"{self.warmup_epochs}, {self.freeze_blocks}, {self.epoch_batches}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose {', '.join(LR_SCHEDULES)}")
        if self.hidden_bn_stats not in HIDDEN_BN_STATS:
            raise ValueError(f"unknown hidden_bn_stats {self.hidden_bn_stats!r}; choose {', '.join(HIDDEN_BN_STATS)}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"unknown amp mode {self.amp!r}; choose {', '.join(AMP_MODES)}")
        if self.p < 2 or self.k < 2:
            raise ValueError(f"p and k must be at least 2 for the triplet loss, got p={self.p}, k={self.k}")
        for name in ("lambda1", "lambda2", "random_erasing", "color_jitter"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lr <= 0 or self.head_lr_factor <= 0:
            raise ValueError(f"lr and head_lr_factor must be > 0, got {self.lr}, {self.head_lr_factor}")
        if not 0.0 <= self.label_smoothing < 1.0 or self.id_loss_weight < 0:
            raise ValueError(
                f"label_smoothing must be in [0, 1) and id_loss_weight >= 0, got {self.label_smoothing}, "
                f"{self.id_loss_weight}"
            )

    def model_config(self) -> ModelConfig:
        return self.model

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["epochs"], data["stages"], data["lr_steps"] = list(self.epochs), list(self.stages), list(self.lr_steps)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
        flat = {k: data[k] for k in data if k in model_keys and k not in known}
        if "flip_eval" in data:  # before the served template held it, flip averaging was an evaluation option
            flat["flip_average"] = bool(data["flip_eval"])
        if flat:  # a config.json from before the nesting kept the model's settings at the top level
            data = {k: v for k, v in data.items() if k not in flat and k != "flip_eval"}
            data["model"] = {**flat, **dict(data.get("model") or {})}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known settings are {sorted(known)}")
        return cls(**data)


# The field's strong baseline: Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person
# Re-identification" (CVPR-W 2019), fast-reid's BoT. Warm-up and decay are over the extractor's epochs
# (stage 1, then stage 3 when the masks are trained too).
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {"model": {}, "train": {}},
    "strong": {
        # Served after the BNNeck, raw: Luo et al. normalise it, but on the real CUHK03 crops the raw template had the
        # better rank-1 and TMR at FMR 1e-2 in 3 of 3 seeds (docs/TRAINING.md, "The served template, and why").
        "model": {"bnneck": True, "neck_feat": "after", "normalize": False, "last_stride": 1, "flip_average": True},
        "train": {
            "id_loss_weight": 1.0,
            "label_smoothing": 0.1,
            "random_erasing": 0.5,
            "warmup_epochs": 2,
            "lr_schedule": "cosine",
            "lr": 3.5e-4,
        },
    },
}


def recipe_config(recipe: str = "paper", model: dict[str, Any] | None = None, **train: Any) -> TrainConfig:
    """A TrainConfig from a named recipe; ``model`` and ``train`` override the recipe's settings one by one."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose {', '.join(RECIPES)}")
    preset = RECIPES[recipe]
    return TrainConfig(
        recipe=recipe, model=ModelConfig(**{**preset["model"], **(model or {})}), **{**preset["train"], **train}
    )
