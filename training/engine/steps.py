"""One optimisation step of each stage, and one epoch of them.

Stage 1 trains the extractor with the triplet loss (and, in the strong recipe, the ID loss on the BNNeck
feature, through a training-only classifier). Stage 2 trains the mask generator with L_mask,
the extractor frozen and in eval mode. Stage 3 trains both: L_extractor reaches only the extractor
and L_mask only the mask generator (``backward(inputs=...)`` keeps each loss to its own network).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from models import hide_top
from training import distributed
from training.config import TrainConfig
from training.data.base import Batch
from training.engine.networks import Networks, set_stage_modes
from training.engine.precision import autocast
from training.engine.schedule import lr_factor
from training.losses import extractor_loss, id_loss, mask_loss, triplet_loss


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message holds the loss dict."""


def _check_finite(losses: dict[str, torch.Tensor]) -> None:
    if not all(math.isfinite(v.item()) for v in losses.values()):
        raise NonFiniteLossError(f"loss is not finite, stopping training: { {k: v.item() for k, v in losses.items()} }")


def _backward(loss: torch.Tensor, params: list[nn.Parameter], nets: Networks) -> None:
    """Gradients of ``loss`` into ``params`` only (DDP averages them across ranks under torchrun)."""
    (nets.scaler.scale(loss) if nets.scaler else loss).backward(inputs=params)


def _step(opt: torch.optim.Optimizer, nets: Networks) -> None:
    if nets.scaler:
        nets.scaler.step(opt)
    else:
        opt.step()


def _id_loss(logits: torch.Tensor | None, pids: torch.Tensor, nets: Networks, config: TrainConfig) -> Any:
    """The ID loss of this rank's batch (DDP averages it over the ranks), or None when it is off."""
    if logits is None or config.id_loss_weight == 0:
        return None
    return id_loss(logits, nets.train_model.labels(pids), config.label_smoothing)


def training_step(
    stage: int, images: torch.Tensor, pids: torch.Tensor, nets: Networks, config: TrainConfig, device: torch.device
) -> dict[str, torch.Tensor]:
    """One optimisation step of ``stage`` on a P x K batch; returns the detached losses (averaged over ranks)."""
    ext, model, gen = nets.extractor, nets.model, nets.mask_model
    use_id = config.id_loss_weight > 0  # without it the classifier (if any) gets no gradient
    ext_params = [
        p
        for n, p in nets.train_model.named_parameters()
        if p.requires_grad and (use_id or not n.startswith("classifier."))
    ]
    gen_params = [p for p in nets.mask_generator.parameters() if p.requires_grad]
    nets.opt_extractor.zero_grad(set_to_none=True)
    nets.opt_mask.zero_grad(set_to_none=True)
    # The mask losses read the extractor outside DDP: they update only the mask generator.
    features = lambda x: ext.forward_neck(x)[0]  # noqa: E731
    with autocast(config.amp, device):
        if stage == 1:
            ((feat, logits),) = model(images)
            # Batch-hard mining over the global batch under torchrun, as one process would see it.
            triplet = triplet_loss(*distributed.gather_batch(feat, pids), config.margin, config.soft_margin)
            losses = {"loss_extractor": triplet, "loss_triplet": triplet}
            ident = _id_loss(logits, pids, nets, config)
            if ident is not None:
                losses.update(loss_extractor=triplet + config.id_loss_weight * ident, loss_id=ident)
        elif stage == 2:
            with torch.no_grad():
                clean = features(images)
            mask = gen(images)  # (B, 1, H, W)
            losses = mask_loss(clean, features(mask * images), mask, config.lambda2)
        else:
            mask = gen(images)
            hidden = hide_top(images, mask.detach(), config.model.mask_ratio)
            (clean, clean_logits), (masked, masked_logits) = model(images, hidden)
            all_clean, all_pids = distributed.gather_batch(clean, pids)
            all_masked, _ = distributed.gather_batch(masked, pids)
            losses = extractor_loss(
                all_clean,
                all_masked,
                all_pids,
                config.lambda1,
                config.margin,
                config.soft_margin,
                _id_loss(clean_logits, pids, nets, config),
                _id_loss(masked_logits, pids, nets, config),
                config.id_loss_weight,
            )
            # L_mask uses the extractor but must not update it, buffers included: the running statistics
            # are put back after the backward passes (autograd checks they are unchanged until then).
            bn_stats = {k: v.clone() for k, v in ext.named_buffers()}
            losses.update(mask_loss(clean.detach(), features(mask * images), mask, config.lambda2))
    _check_finite(losses)
    if stage in (1, 3):
        _backward(losses["loss_extractor"], ext_params, nets)
    if stage in (2, 3):
        _backward(losses["loss_mask"], gen_params, nets)
    if stage == 3:
        with torch.no_grad():
            for k, v in ext.named_buffers():
                v.copy_(bn_stats[k])
    if stage in (1, 3):
        _step(nets.opt_extractor, nets)
    if stage in (2, 3):
        _step(nets.opt_mask, nets)
    if nets.scaler:
        nets.scaler.update()
    return distributed.mean_over_ranks({k: v.detach() for k, v in losses.items()})


def train_one_epoch(
    stage: int,
    loader: Iterable[Batch],
    nets: Networks,
    config: TrainConfig,
    device: torch.device,
    progress: Callable[[Iterable], Iterable] | None = None,
    epoch: int = 0,
) -> dict[str, float]:
    """One epoch of ``stage`` (``epoch`` counts this stage's epochs done before it, for the lr schedule);
    returns the mean of each loss over the batches."""
    set_stage_modes(stage, nets, config.freeze_blocks)
    steps = len(loader) if hasattr(loader, "__len__") else 1
    sums: dict[str, float] = {}
    count = 0
    for images, pids, _camids, _index in progress(loader) if progress else loader:
        for group in nets.opt_extractor.param_groups:
            group["lr"] = config.lr * group.get("lr_scale", 1.0) * lr_factor(config, stage, epoch, count, steps)
        images, pids = images.to(device, non_blocking=True), pids.to(device, non_blocking=True)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        losses = training_step(stage, images, pids, nets, config, device)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        count += 1
    return {k: v / max(count, 1) for k, v in sums.items()}
