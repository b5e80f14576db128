"""The training loops of section 3.3: ``train_one_epoch`` for each stage, ``evaluate``, ``run_stage``
and ``fit`` (all stages, checkpoints, CSV log, plots).

Stage 1 trains the extractor with the triplet loss (and, in the strong recipe, the ID loss on the BNNeck
feature, through a training-only classifier). Stage 2 trains the mask generator with L_mask,
the extractor frozen and in eval mode. Stage 3 trains both: L_extractor reaches only the extractor
and L_mask only the mask generator (``backward(inputs=...)`` keeps each loss to its own network).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import FeatureExtractor, MaskGenerator, hide_top
from models.devices import resolve_device
from models.weights import FORMAT_VERSION
from training import distributed
from training.checkpoint import checkpoint_config, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from training.config import TrainConfig
from training.evaluation import evaluate_features
from training.losses import extractor_loss, id_loss, mask_loss, triplet_loss

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # image, pid, camid, index


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message holds the loss dict."""


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
        return _unwrap(self.model)


@dataclass
class RunState:
    stage: int = 1
    epoch: int = 0  # epochs of ``stage`` completed
    best_map: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)


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


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision: bf16 on CUDA or the CPU (oneDNN runs it on AMX / AVX-512 bf16, where a CPU has them), fp16
    (with a GradScaler) on CUDA only. BatchNorm, the losses and the optimiser stay fp32."""
    if config.amp == "none":
        return contextlib.nullcontext()
    if config.amp == "fp16" and device.type != "cuda":
        raise ValueError(f"--amp fp16 needs CUDA, not {device.type}; use --amp bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.amp == "bf16" else torch.float16)


def check_mixed_precision(networks: dict[str, nn.Module], config: TrainConfig, device: torch.device) -> None:
    """Refuses, before any training, a precision whose kernels give wrong answers here: one eval-mode forward of
    each network at the input size, every convolution and linear layer also run under ``config.amp``'s autocast
    on the same input and compared with fp32. bf16 keeps a layer within 0.3-0.6% (relative L2 error, measured);
    across a whole MobileNetV2 that adds up to about 6%, so the check is per layer. oneDNN's CPU bf16 3x3 stride-2
    convolution fails it (torch 2.14.1) where its output is one pixel wide, as in a ResNet's layer4 at inputs 32
    pixels wide: relative errors of 0.6 or NaN."""
    if config.amp == "none":
        return
    _autocast(config, device)  # refuses fp16 off CUDA
    m = config.model_config()
    x = torch.randn(2, 3, m.input_height, m.input_width, generator=torch.Generator().manual_seed(0)).to(device)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    errors: dict[str, float] = {}

    def compare(name: str, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        with _autocast(config, device):
            low = module.forward(*inputs)  # .forward: no hooks, so no recursion
        errors[name] = ((low.float() - output.float()).norm() / output.float().norm().clamp_min(1e-12)).item()

    for net_name, net in networks.items():
        layers = [(n, mod) for n, mod in net.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
        hooks = [mod.register_forward_hook(functools.partial(compare, f"{net_name} {n}")) for n, mod in layers]
        was_training = net.training
        net.eval()  # no running statistics touched
        try:
            with torch.no_grad():
                net(x)
        finally:
            net.train(was_training)
            for hook in hooks:
                hook.remove()
    name, error = max(errors.items(), key=lambda kv: kv[1] if math.isfinite(kv[1]) else math.inf, default=("", 0.0))
    if not error < 0.1:
        raise ValueError(
            f"--amp {config.amp} gives wrong outputs in the {name} layer on {device.type} at "
            f"{m.input_height}x{m.input_width} (relative error {error:.3g} against fp32); use --amp none or a larger "
            "input (oneDNN's bf16 stride-2 convolution fails on maps 2 pixels wide)"
        )


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


def set_stage_modes(stage: int, nets: Networks, freeze_blocks: int = 0) -> None:
    """Train/eval modes and requires_grad for a stage: in stage 2 the extractor is frozen in eval mode.
    The first ``freeze_blocks`` trunk blocks stay frozen, BN statistics included, in every stage, and so does
    the BNNeck's shift (it has none, as in Luo et al.)."""
    extractor = _unwrap(nets.extractor)
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


def _unwrap(module: nn.Module) -> Any:
    return getattr(module, "module", module)  # DistributedDataParallel keeps the network in .module


def extractor_epochs(config: TrainConfig) -> int:
    """The epochs the extractor trains, stage 1's and stage 3's, over which its lr schedule runs. All three
    stage lengths count whatever ``stages`` this invocation runs, so a run continued after stage 1 keeps its curve."""
    return config.epochs[0] + config.epochs[2]


def lr_factor(config: TrainConfig, stage: int, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The extractor's lr multiplier at ``step`` of ``epoch`` (0-based, counted in ``stage``): a linear warm-up
    from 0.1 to 1 over its first ``warmup_epochs`` epochs (per step, as fast-reid and torchreid warm up), then
    constant (the paper), cosine to 0 or divided by 10 at each of ``lr_steps``, over stage 1 then stage 3."""
    if stage == 2:
        return 1.0
    done = epoch + (config.epochs[0] if stage == 3 else 0)  # extractor epochs before this one
    t = done + step / max(steps_per_epoch, 1)
    if t < config.warmup_epochs:
        return 0.1 + 0.9 * t / config.warmup_epochs
    if config.lr_schedule == "cosine":
        span = max(extractor_epochs(config) - config.warmup_epochs, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min((t - config.warmup_epochs) / span, 1.0)))
    if config.lr_schedule == "step":
        return 0.1 ** sum(done >= s for s in config.lr_steps)
    return 1.0


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
    with _autocast(config, device):
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


@torch.no_grad()
def extract_features(
    extractor: nn.Module, loader: Iterable[Batch], device: torch.device
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Served templates (the extractor's eval forward): (N, feat_dim), pids (N,), camids (N,)."""
    was_training = extractor.training
    extractor.eval()
    feats, pids, camids = [], [], []
    for images, pid, camid, _index in loader:
        feats.append(extractor(images.to(device)).float().cpu())
        pids.append(torch.as_tensor(pid))
        camids.append(torch.as_tensor(camid))
    extractor.train(was_training)
    return torch.cat(feats), torch.cat(pids).numpy(), torch.cat(camids).numpy()


def evaluate(
    extractor: nn.Module,
    query_loader: Iterable[Batch],
    gallery_loader: Iterable[Batch],
    device: torch.device,
    rerank: bool = False,
) -> dict[str, float]:
    """mAP, rank-1/5/10 and mINP in percent, both protocols (see ``evaluate_features``); with ``rerank`` also
    the standard protocol's figures after k-reciprocal re-ranking, prefixed ``rerank_``."""
    qf, q_pids, q_camids = extract_features(extractor, query_loader, device)
    gf, g_pids, g_camids = extract_features(extractor, gallery_loader, device)
    return evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, rerank=rerank)


def checkpoint_state(nets: Networks, config: TrainConfig, state: RunState) -> dict[str, Any]:
    """Tensors, numbers, strings, lists and dicts only, so ``torch.load(weights_only=True)`` reads it."""
    head = {k: v for k, v in nets.train_model.state_dict().items() if not k.startswith("extractor.")}
    return {
        "format_version": FORMAT_VERSION,  # of the networks' meaning, as in a weights file
        "config": config.to_dict(),
        "stage": state.stage,
        "epoch": state.epoch,
        "best_map": state.best_map,
        "history": state.history,
        "extractor": _unwrap(nets.extractor).state_dict(),
        "classifier": head,
        "mask_generator": _unwrap(nets.mask_generator).state_dict(),
        "opt_extractor": nets.opt_extractor.state_dict(),
        "opt_mask": nets.opt_mask.state_dict(),
        "scaler": nets.scaler.state_dict() if nets.scaler else None,
        "rng": rng_state(),
    }


# ModelConfig settings that change only what is served or how stage 3 hides pixels, not what the weights compute:
# a resumed run may change them.
SERVING_ONLY = frozenset({"neck_feat", "normalize", "flip_average", "mask_ratio"})


def restore(path: Path, nets: Networks) -> RunState:
    """Load a ``last.pt`` into the networks and optimisers; returns where the run stood. A checkpoint whose networks
    were built otherwise (another input size, or a MobileNetV2 written before it honoured ``last_stride``) is
    refused: its weights would load and compute something else."""
    ckpt = load_checkpoint(path)
    written, wanted = checkpoint_config(ckpt).model, _unwrap(nets.extractor).config
    differ = {
        f.name: (getattr(written, f.name), getattr(wanted, f.name))
        for f in dataclasses.fields(wanted)
        if f.name not in SERVING_ONLY and getattr(written, f.name) != getattr(wanted, f.name)
    }
    if differ:
        raise ValueError(
            f"cannot resume from {path}: its networks were built with other settings (checkpoint, this run): {differ}; "
            "resume with the checkpoint's settings (a MobileNetV2 checkpoint from before weights format 2 computed "
            "last stride 2, whatever its config.json says)"
        )
    nets.extractor.load_state_dict(ckpt["extractor"])
    head = nets.train_model.state_dict()
    head.update({k: v for k, v in ckpt.get("classifier", {}).items()})
    head.update({f"extractor.{k}": v for k, v in ckpt["extractor"].items()})
    nets.train_model.load_state_dict(head)
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
    train_pids: list[int] | None = None  # the training identities, for the ID loss's classifier


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
            row.update(evaluate(nets.extractor, loaders.query, loaders.gallery, device, config.rerank))
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
    nets = nets or build_networks(config, device, loaders.train_pids)
    state = RunState(stage=config.stages[0])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            if not (out / "last.pt").is_file():
                raise FileNotFoundError(f"cannot resume: {out / 'last.pt'} does not exist")
            state = restore(out / "last.pt", nets)
            logger.info("resumed at stage %d after epoch %d", state.stage, state.epoch)
        if is_main:  # after a refused resume the run's config.json still describes its checkpoints
            (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
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
