"""The training loops of section 3.3: ``train_one_epoch`` for each stage, ``evaluate``, ``run_stage``
and ``fit`` (all stages, checkpoints, CSV log, plots).

Stage 1 trains the extractor with the triplet loss. Stage 2 trains the mask generator with L_mask,
the extractor frozen and in eval mode. Stage 3 trains both: L_extractor reaches only the extractor
and L_mask only the mask generator (``backward(inputs=...)`` keeps each loss to its own network).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import FeatureExtractor, MaskGenerator, hide_top
from training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from training.config import TrainConfig
from training.evaluation import evaluate_features
from training.losses import extractor_loss, mask_loss, triplet_loss

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # image, pid, camid, index


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message holds the loss dict."""


@dataclass
class Networks:
    extractor: FeatureExtractor
    mask_generator: MaskGenerator
    opt_extractor: torch.optim.Optimizer
    opt_mask: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None = None
    world_size: int = 1


@dataclass
class RunState:
    stage: int = 1
    epoch: int = 0  # epochs of ``stage`` completed
    best_map: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_networks(config: TrainConfig, device: torch.device) -> Networks:
    from models import build_extractor, build_mask_generator

    model_config = config.model_config()
    extractor = build_extractor(model_config, pretrained=config.pretrained).to(device)
    if config.freeze_blocks > len(extractor.trunk_blocks()):
        raise ValueError(
            f"freeze_blocks={config.freeze_blocks}, but a {config.backbone} trunk has "
            f"{len(extractor.trunk_blocks())} blocks"
        )
    mask_generator = build_mask_generator(model_config).to(device)
    if config.channels_last:
        extractor.to(memory_format=torch.channels_last)
        mask_generator.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" and device.type == "cuda" else None
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return Networks(
        extractor,
        mask_generator,
        torch.optim.Adam(extractor.parameters(), lr=config.lr),
        torch.optim.Adam(mask_generator.parameters(), lr=config.mask_lr),
        scaler,
        world_size,
    )


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if config.amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if config.amp == "bf16" else torch.float16)


def _check_finite(losses: dict[str, torch.Tensor]) -> None:
    if not all(math.isfinite(v.item()) for v in losses.values()):
        raise NonFiniteLossError(f"loss is not finite, stopping training: { {k: v.item() for k, v in losses.items()} }")


def _backward(loss: torch.Tensor, params: list[nn.Parameter], nets: Networks) -> None:
    """Gradients of ``loss`` into ``params`` only, averaged across ranks under torchrun."""
    (nets.scaler.scale(loss) if nets.scaler else loss).backward(inputs=params)
    if nets.world_size > 1:
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= nets.world_size


def _step(opt: torch.optim.Optimizer, nets: Networks) -> None:
    if nets.scaler:
        nets.scaler.step(opt)
    else:
        opt.step()


def set_stage_modes(stage: int, nets: Networks, freeze_blocks: int = 0) -> None:
    """Train/eval modes and requires_grad for a stage: in stage 2 the extractor is frozen in eval mode.
    The first ``freeze_blocks`` trunk blocks stay frozen, BN statistics included, in every stage."""
    nets.extractor.train(stage in (1, 3))
    nets.mask_generator.train(stage in (2, 3))
    for p in nets.extractor.parameters():
        p.requires_grad_(stage in (1, 3))
    for p in nets.mask_generator.parameters():
        p.requires_grad_(stage in (2, 3))
    for block in _unwrap(nets.extractor).trunk_blocks()[:freeze_blocks]:
        block.eval()
        for p in block.parameters():
            p.requires_grad_(False)


def _unwrap(module: nn.Module) -> Any:
    return getattr(module, "module", module)  # DistributedDataParallel keeps the network in .module


def warmup_factor(config: TrainConfig, stage: int, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The extractor's lr multiplier: linear from 0.1 to 1 over stage 1's first ``warmup_epochs`` epochs
    (per step, as fast-reid and torchreid warm up), 1 afterwards and in the other stages."""
    if stage != 1 or config.warmup_epochs == 0:
        return 1.0
    progress = (epoch * steps_per_epoch + step) / (config.warmup_epochs * max(steps_per_epoch, 1))
    return 0.1 + 0.9 * min(progress, 1.0)


def training_step(
    stage: int, images: torch.Tensor, pids: torch.Tensor, nets: Networks, config: TrainConfig, device: torch.device
) -> dict[str, torch.Tensor]:
    """One optimisation step of ``stage`` on a P x K batch; returns the detached losses."""
    ext, gen = nets.extractor, nets.mask_generator
    ext_params = [p for p in ext.parameters() if p.requires_grad]
    gen_params = [p for p in gen.parameters() if p.requires_grad]
    nets.opt_extractor.zero_grad(set_to_none=True)
    nets.opt_mask.zero_grad(set_to_none=True)
    with _autocast(config, device):
        if stage == 1:
            losses = {"loss_triplet": triplet_loss(ext(images), pids, config.margin, config.soft_margin)}
        elif stage == 2:
            with torch.no_grad():
                clean = ext(images)
            mask = gen(images)  # (B, 1, H, W)
            losses = mask_loss(clean, ext(mask * images), mask, config.lambda2)
        else:
            mask = gen(images)
            clean = ext(images)
            hidden = hide_top(images, mask.detach(), config.mask_ratio)
            losses = extractor_loss(clean, ext(hidden), pids, config.lambda1, config.margin, config.soft_margin)
            # L_mask uses the extractor but must not update it, buffers included: the running statistics
            # are put back after the backward passes (autograd checks they are unchanged until then).
            bn_stats = {k: v.clone() for k, v in ext.named_buffers()}
            losses.update(mask_loss(clean.detach(), ext(mask * images), mask, config.lambda2))
    _check_finite(losses)
    if stage in (1, 3):
        _backward(losses["loss_triplet" if stage == 1 else "loss_extractor"], ext_params, nets)
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
    return {k: v.detach() for k, v in losses.items()}


def train_one_epoch(
    stage: int,
    loader: Iterable[Batch],
    nets: Networks,
    config: TrainConfig,
    device: torch.device,
    progress: Callable[[Iterable], Iterable] | None = None,
    epoch: int = 0,
) -> dict[str, float]:
    """One epoch of ``stage`` (``epoch`` counts this stage's epochs done before it, for the warm-up);
    returns the mean of each loss over the batches."""
    set_stage_modes(stage, nets, config.freeze_blocks)
    steps = len(loader) if hasattr(loader, "__len__") else 1
    sums: dict[str, float] = {}
    count = 0
    for images, pids, _camids, _index in progress(loader) if progress else loader:
        for group in nets.opt_extractor.param_groups:
            group["lr"] = config.lr * warmup_factor(config, stage, epoch, count, steps)
        images, pids = images.to(device, non_blocking=True), pids.to(device, non_blocking=True)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        losses = training_step(stage, images, pids, nets, config, device)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.item()
        count += 1
    return {k: v / max(count, 1) for k, v in sums.items()}


@torch.no_grad()
def extract_features(
    extractor: nn.Module, loader: Iterable[Batch], device: torch.device, flip: bool = False
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Templates of the extractor in eval mode: (N, feat_dim), pids (N,), camids (N,)."""
    was_training = extractor.training
    extractor.eval()
    feats, pids, camids = [], [], []
    for images, pid, camid, _index in loader:
        images = images.to(device)
        f = extractor(images).float()
        if flip:
            f = (f + extractor(images.flip(-1)).float()) / 2
        feats.append(f.cpu())
        pids.append(torch.as_tensor(pid))
        camids.append(torch.as_tensor(camid))
    extractor.train(was_training)
    return torch.cat(feats), torch.cat(pids).numpy(), torch.cat(camids).numpy()


def evaluate(
    extractor: nn.Module,
    query_loader: Iterable[Batch],
    gallery_loader: Iterable[Batch],
    device: torch.device,
    flip: bool = False,
) -> dict[str, float]:
    """mAP, rank-1/5/10 and mINP in percent, both protocols (see ``evaluate_features``)."""
    qf, q_pids, q_camids = extract_features(extractor, query_loader, device, flip)
    gf, g_pids, g_camids = extract_features(extractor, gallery_loader, device, flip)
    return evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids)


def checkpoint_state(nets: Networks, config: TrainConfig, state: RunState) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "stage": state.stage,
        "epoch": state.epoch,
        "best_map": state.best_map,
        "history": state.history,
        "extractor": _unwrap(nets.extractor).state_dict(),
        "mask_generator": _unwrap(nets.mask_generator).state_dict(),
        "opt_extractor": nets.opt_extractor.state_dict(),
        "opt_mask": nets.opt_mask.state_dict(),
        "scaler": nets.scaler.state_dict() if nets.scaler else None,
        "rng": rng_state(),
    }


def restore(path: Path, nets: Networks) -> RunState:
    """Load a ``last.pt`` into the networks and optimisers; returns where the run stood."""
    ckpt = load_checkpoint(path)
    nets.extractor.load_state_dict(ckpt["extractor"])
    nets.mask_generator.load_state_dict(ckpt["mask_generator"])
    nets.opt_extractor.load_state_dict(ckpt["opt_extractor"])
    nets.opt_mask.load_state_dict(ckpt["opt_mask"])
    if nets.scaler and ckpt.get("scaler"):
        nets.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return RunState(ckpt["stage"], ckpt["epoch"], ckpt["best_map"], ckpt["history"])


@dataclass
class Loaders:
    train: Iterable[Batch]
    query: Iterable[Batch]
    gallery: Iterable[Batch]
    sampler: Any = None  # has set_epoch(epoch) when it is the P x K sampler
    figure_images: torch.Tensor | None = None  # (N, 3, H, W) normalised crops for the figure-1 grid


def _write_log(out: Path, history: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with open(out / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def run_stage(
    stage: int,
    nets: Networks,
    loaders: Loaders,
    config: TrainConfig,
    state: RunState,
    out: Path | None,
    device: torch.device,
    progress: Callable[[Iterable], Iterable] | None = None,
    is_main: bool = True,
) -> RunState:
    """The epochs of one stage from ``state.epoch``; evaluates every ``eval_every`` epochs and at the end,
    writes last.pt each epoch and best.pt at the best standard mAP."""
    total = config.epochs[stage - 1]
    while state.epoch < total:
        epoch = state.epoch
        if loaders.sampler is not None and hasattr(loaders.sampler, "set_epoch"):
            loaders.sampler.set_epoch(sum(config.epochs[: stage - 1]) + epoch)
        started = time.perf_counter()
        losses = train_one_epoch(stage, loaders.train, nets, config, device, progress, epoch)
        state.epoch += 1
        row: dict[str, Any] = {"stage": stage, "epoch": state.epoch, **losses}
        row["epoch_seconds"] = time.perf_counter() - started  # training only, evaluation excluded
        due = config.eval_every > 0 and state.epoch % config.eval_every == 0
        if (due or state.epoch == total) and is_main:
            row.update(evaluate(nets.extractor, loaders.query, loaders.gallery, device, config.flip_eval))
        logger.info(
            "stage %d epoch %d/%d %s",
            stage,
            state.epoch,
            total,
            " ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float)),
        )
        state.history.append(row)
        if out is not None and is_main:
            if "mAP" in row and row["mAP"] > state.best_map:
                state.best_map = row["mAP"]
                save_checkpoint(out / "best.pt", checkpoint_state(nets, config, state))
            save_checkpoint(out / "last.pt", checkpoint_state(nets, config, state))
            _write_log(out, state.history)
    return state


def fit(
    config: TrainConfig,
    loaders: Loaders,
    out: Path | None = None,
    resume: bool = False,
    nets: Networks | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    is_main: bool = True,
) -> tuple[Networks, RunState]:
    """Run ``config.stages`` in order (resuming from ``out/last.pt`` when asked)."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    nets = nets or build_networks(config, device)
    state = RunState(stage=config.stages[0])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if is_main:
            (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        if resume:
            if not (out / "last.pt").is_file():
                raise FileNotFoundError(f"cannot resume: {out / 'last.pt'} does not exist")
            state = restore(out / "last.pt", nets)
            logger.info("resumed at stage %d after epoch %d", state.stage, state.epoch)
    for stage in config.stages:
        if stage < state.stage:
            continue
        if stage > state.stage:
            state.stage, state.epoch = stage, 0
        state = run_stage(stage, nets, loaders, config, state, out, device, progress, is_main)
        if out is not None and is_main:
            _stage_plots(out, state, nets, loaders, config, stage, device)
    return nets, state


def _stage_plots(
    out: Path, state: RunState, nets: Networks, loaders: Loaders, config: TrainConfig, stage: int, device: torch.device
) -> None:
    from training import plots

    try:
        plots.plot_curves(state.history, out / "curves.png")
        if stage in (2, 3) and loaders.figure_images is not None:
            plots.mask_grid(
                nets.mask_generator,
                loaders.figure_images.to(device),
                config.model_config(),
                out / f"masks_stage{stage}.png",
            )
    except Exception:  # a plot must never cost a training run
        logger.exception("could not write the plots of stage %d", stage)
