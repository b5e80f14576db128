"""The networks a training run steps: the extractor with the ID loss's training-only classifier, the mask
generator, their optimisers, and each stage's train/eval modes and frozen parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models import FeatureExtractor, MaskGenerator
from training import distributed
from training.config import TrainConfig
from training.distributed import unwrap
from training.engine.precision import check_mixed_precision


class ReidTrainModel(nn.Module):
    """The extractor and the ID loss's classifier (a training-only layer: the served weights hold no classifier).

    ``forward(*views)`` gives, for each batch of images, (feature before the BNNeck, ID logits or None), so
    the extractor's losses come from one forward, the one DistributedDataParallel synchronises.
    """

    def __init__(
        self, extractor: FeatureExtractor, train_pids: Sequence[int] | None = None, clean_bn_stats: bool = True
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.clean_bn_stats = clean_bn_stats  # only the first view (the clean one) moves BN's running statistics
        pids = sorted(set(train_pids or ()))
        self.register_buffer("train_pids", torch.tensor(pids, dtype=torch.long))  # class c is pid train_pids[c]
        self.classifier: nn.Linear | None = None
        if pids:
            self.classifier = nn.Linear(extractor.feat_dim, len(pids), bias=False)
            nn.init.normal_(self.classifier.weight, std=0.001)  # Luo et al.'s and fast-reid's initialisation

    def labels(self, pids: torch.Tensor) -> torch.Tensor:
        """pids -> class indices in [0, num_classes)."""
        labels = torch.searchsorted(self.train_pids, pids)
        if (labels >= len(self.train_pids)).any() or (
            self.train_pids[labels.clamp_max(len(self.train_pids) - 1)] != pids
        ).any():
            raise ValueError("a batch holds a pid that is not among the training identities of the ID loss")
        return labels

    def forward(self, *views: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        out = []
        for i, images in enumerate(views):
            keep = i > 0 and self.clean_bn_stats
            with running_stats_kept(self.extractor) if keep else contextlib.nullcontext():
                feat, neck = self.extractor.forward_neck(images)
            out.append((feat, self.classifier(neck) if self.classifier is not None else None))
        return out


@contextlib.contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm inside normalises with the batch's statistics but leaves the running ones as they
    were (momentum 0: running = 1 * running + 0 * batch, exactly); the buffers are not touched from outside, which
    autograd would refuse before the backward pass."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum


@dataclass
class Networks:
    extractor: FeatureExtractor
    mask_generator: MaskGenerator
    opt_extractor: torch.optim.Optimizer  # the extractor's and the classifier's parameters
    opt_mask: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None = None
    world_size: int = 1
    model: nn.Module | None = None  # ReidTrainModel over ``extractor``, wrapped in DDP under torchrun
    mask_model: nn.Module | None = None  # ``mask_generator``, wrapped in DDP under torchrun

    @property
    def train_model(self) -> ReidTrainModel:
        return unwrap(self.model)


def build_networks(config: TrainConfig, device: torch.device, train_pids: Sequence[int] | None = None) -> Networks:
    """The networks and optimisers; ``train_pids`` (the training identities) are needed by the ID loss only.
    Under torchrun the BatchNorm layers become SyncBatchNorm and both networks are wrapped in DDP."""
    from models import build_extractor, build_mask_generator

    model_config = config.model_config()
    if config.id_loss_weight > 0 and not train_pids:
        raise ValueError("the ID loss (id_loss_weight > 0) needs the training identities (train_pids)")
    extractor = build_extractor(model_config, pretrained=config.pretrained).to(device)
    if config.freeze_blocks > len(extractor.trunk_blocks()):
        raise ValueError(
            f"freeze_blocks={config.freeze_blocks}, but a {model_config.backbone} trunk has "
            f"{len(extractor.trunk_blocks())} blocks"
        )
    model = ReidTrainModel(
        extractor, train_pids if config.id_loss_weight > 0 else None, config.hidden_bn_stats == "clean"
    ).to(device)
    mask_generator = build_mask_generator(model_config).to(device)
    if config.channels_last:
        extractor.to(memory_format=torch.channels_last)
        mask_generator.to(memory_format=torch.channels_last)
    check_mixed_precision({"extractor": extractor, "mask generator": mask_generator}, config, device)
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" and device.type == "cuda" else None
    world_size = distributed.world_size()
    nets = Networks(
        extractor,
        mask_generator,
        torch.optim.Adam(_extractor_param_groups(model, config), lr=config.lr),
        torch.optim.Adam(mask_generator.parameters(), lr=config.mask_lr),
        scaler,
        world_size,
        model,
        mask_generator,
    )
    if world_size > 1:
        distributed.convert_sync_batchnorm(model, device)
        distributed.convert_sync_batchnorm(mask_generator, device)
        # DDP records the parameters that need gradients when it is built: the extractor's are those of
        # stages 1 and 3 (frozen blocks and the BNNeck's shift left out), the mask generator's all of them.
        ids = [device.index] if device.type == "cuda" else None
        nets.mask_model = nn.parallel.DistributedDataParallel(mask_generator, device_ids=ids)
        set_stage_modes(1, nets, config.freeze_blocks)
        nets.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return nets


def _extractor_param_groups(model: ReidTrainModel, config: TrainConfig) -> list[dict[str, Any]]:
    """The extractor's Adam groups: its own parameters, then the ID classifier's (if any) at ``head_lr_factor``
    times the lr; each group's ``lr_scale`` is kept for the schedule."""
    head = list(model.classifier.parameters()) if model.classifier is not None else []
    body = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    groups = [{"params": body, "lr": config.lr, "lr_scale": 1.0}]
    if head:
        groups.append({"params": head, "lr": config.lr * config.head_lr_factor, "lr_scale": config.head_lr_factor})
    return groups


def set_stage_modes(stage: int, nets: Networks, freeze_blocks: int = 0) -> None:
    """Train/eval modes and requires_grad for a stage: in stage 2 the extractor is frozen in eval mode.
    The first ``freeze_blocks`` trunk blocks stay frozen, BN statistics included, in every stage, and so does
    the BNNeck's shift (it has none, as in Luo et al.)."""
    extractor = unwrap(nets.extractor)
    model = nets.train_model if nets.model is not None else extractor
    model.train(stage in (1, 3))
    nets.mask_generator.train(stage in (2, 3))
    for p in model.parameters():
        p.requires_grad_(stage in (1, 3))
    for p in nets.mask_generator.parameters():
        p.requires_grad_(stage in (2, 3))
    if extractor.neck is not None:
        extractor.neck.bias.requires_grad_(False)
    for block in extractor.trunk_blocks()[:freeze_blocks]:
        block.eval()
        for p in block.parameters():
            p.requires_grad_(False)
