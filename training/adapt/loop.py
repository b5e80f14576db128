"""``python -m training adapt``: a weights file and a site's unlabeled crops to weights adapted to that site.

Each round: the site's templates under the mean teacher (an average of the trained weights; without one, the
trained weights themselves), pseudo-identities from them (``pseudo_labels``), a cluster memory and camera proxies
over those (``memory``), then ``steps`` P x K steps on the crops in clusters (the left-out ones wait for a later
round); the teacher is what is saved. The round's checkpoint makes a stopped run resume where it was; a
seed fixes everything, so the same crops give the same weights. The weights record where they come from: the
source's fingerprint, the crop list's hash, the method and its settings; and their threshold, estimated from the
last round's pseudo-identities, says so (``threshold_split``)."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from models import MaskGenerator, build_eval_transform, hide_top, load_weights, save_weights
from models.clustering import camera_centred
from models.extractor import FeatureExtractor
from models.files import atomic_path
from training.adapt.memory import CameraProxies, ClusterMemory
from training.adapt.pseudo_labels import ClusterSettings, cluster_summary, pseudo_labels
from training.adapt.site import Site, read_site, site_identities
from training.adapt.thresholds import default_calibration, pseudo_calibration, threshold_check
from training.checkpoint import rng_state, save_checkpoint, set_rng_state
from training.data.base import ImageDataset, Sample
from training.engine.networks import running_stats_kept
from training.engine.precision import autocast
from training.evaluation import evaluate_features, extract_features
from training.samplers import RandomIdentitySampler
from training.transforms import split_train_transform

logger = logging.getLogger(__name__)

METHOD = "cluster-contrast + camera-proxies"
CHECKPOINT = "adapt.pt"


@dataclass(frozen=True)
class AdaptConfig:
    weights: str
    site: str
    out: str = "runs/adapt"
    # Pseudo-labels refreshed this many times. On cuhk01-site the site's mAP peaked after 4 of 10 rounds (46.0,
    # from 34.2) and then fell as clusters grew past a person's size (42.1 after 10): docs/TRAINING.md.
    rounds: int = 5
    steps: int = 100  # P x K steps per round
    p: int = 16  # clusters per batch
    k: int = 4  # crops per cluster
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    freeze_blocks: int = 0  # leading trunk blocks whose weights stay the source's
    # Their BN statistics follow the site's crops (AdaBN, Li et al. 2016): on cuhk01-site, 46.0 mAP at best
    # against 42.3 with the source's statistics kept (docs/TRAINING.md).
    adapt_bn: bool = True
    random_erasing: float = 0.5
    temperature: float = 0.05
    momentum: float = 0.1
    proxy_weight: float = 0.5  # camera proxies' share of the loss; 0: cluster memory alone
    # The paper's masks during adaptation: this share of each step's loss comes from the same crops with the source's
    # mask generator's top ``mask_ratio`` pixels hidden, as stage 3 does (the paper's 1 - lambda1 is 0.1). Off by
    # default, as measured (docs/TRAINING.md, "Adapting to a site": the masks).
    mask_weight: float = 0.0
    # A mean teacher (Tarvainen & Valpola 2017, as MMT uses one for re-ID): an exponential moving average of the
    # trained weights, with this decay per step, gives the templates each round clusters and is what is saved;
    # 0: none. 0.99 averages about the last 100 steps, one round of the defaults (chosen so, not tuned): on
    # cuhk01-site it added about 5 mAP points in each seed measured (docs/TRAINING.md, "A mean teacher pays").
    teacher_decay: float = 0.99
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    amp: str = "none"  # or bf16 (CPUs with AMX / AVX-512 bf16, or CUDA)
    seed: int = 0
    device: str = "cpu"
    channels_last: bool = False  # the networks and crops in channels_last memory format (oneDNN's fast path)
    workers: int = 0
    # The default threshold and score curve: "pseudo", estimated from the last round's pseudo-identities, or
    # "source", the source's own calibration. On cuhk01-site the estimate's FMR 1e-2 threshold let through 1.01% of
    # the impostor pairs (6 runs, two sources), the source's 0.2 to 0.5%: a stricter threshold than asked, at a
    # site it never saw (docs/TRAINING.md, "The threshold").
    threshold_from: str = "pseudo"
    eval: bool = False  # score each round with the manifest's pid column (never trained on)
    query_camid: int = 0

    def settings(self) -> dict[str, Any]:
        """What decides the weights (the method's settings): recorded in them, and a resume must match."""
        out = dataclasses.asdict(self)
        for key in ("weights", "site", "out", "device", "channels_last", "workers", "eval", "query_camid"):
            out.pop(key)
        return out


@dataclass
class Round:
    index: int
    clusters: dict[str, float]
    loss: float
    seconds: float
    figures: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: templates, clustering, steps


def _freeze(extractor: FeatureExtractor, blocks: int, adapt_bn: bool) -> None:
    """Training mode, with the leading ``blocks`` trunk blocks' weights frozen; their BN statistics follow the
    site's crops with ``adapt_bn`` (AdaBN), else they stay the source's."""
    extractor.train()
    for block in extractor.trunk_blocks()[:blocks]:
        if not adapt_bn:
            block.eval()
        for parameter in block.parameters():
            parameter.requires_grad_(False)


def site_figures(features: torch.Tensor, site: Site, pids: list[int], query_camid: int) -> dict[str, float]:
    """The site's rank-1 and mAP (its cameras' query protocol), raw and camera-centred: for --eval only."""
    camids = np.array([c.camid for c in site.crops])
    pids_a = np.asarray(pids)
    query, gallery = camids == query_camid, camids != query_camid
    figures = {}
    for name, x in (("", features), ("centred_", torch.from_numpy(camera_centred(features.numpy(), camids)))):
        f = evaluate_features(x[query], x[gallery], pids_a[query], pids_a[gallery], camids[query], camids[gallery])
        figures[f"{name}rank1"], figures[f"{name}mAP"] = f["rank1"], f["mAP"]
    return figures


def adapt(config: AdaptConfig, progress: Callable[[Iterable, str, int], Iterable] | None = None) -> Path:
    """Run (or resume) an adaptation; the adapted weights' path (``out/model.safetensors``)."""
    began = time.monotonic()
    progress = progress or (lambda it, desc, total: it)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    source = load_weights(config.weights, device)
    source_fingerprint = source.fingerprint  # now: the extractor below is trained in place
    extractor = source.extractor
    if config.channels_last:
        extractor.to(memory_format=torch.channels_last)
        if source.mask_generator is not None:
            source.mask_generator.to(memory_format=torch.channels_last)
    site = read_site(config.site)
    camids = np.array([c.camid for c in site.crops])
    site_sha = site.sha256()
    pids = site_identities(site) if config.eval else None
    if not 0 <= config.mask_weight < 1:
        raise ValueError(f"--mask-weight must be in [0, 1), not {config.mask_weight}")
    if config.mask_weight > 0 and source.mask_generator is None:
        raise ValueError(
            f"--mask-weight {config.mask_weight} needs a trained mask generator, and {config.weights} has none: "
            "adapt from weights of a run that trained stage 2 (the paper's recipe, or --stages 1,2 and more)"
        )
    if config.cluster.reliability_delta < 0 or not 0 < config.cluster.independence_quantile <= 1:
        raise ValueError(
            "--reliability-delta must be >= 0 and --independence-quantile in (0, 1], not "
            f"{config.cluster.reliability_delta} and {config.cluster.independence_quantile}"
        )
    if config.eval and pids is None:
        raise ValueError(f"--eval needs a manifest with a pid column under {config.site}")
    logger.info("site %s: %d crops, %d cameras (%s)", site.root, len(site.crops), len(site.cameras), site_sha[:12])

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    samples = [Sample(c.path, -1, c.camid) for c in site.crops]  # pid -1: this dataset holds no identities
    eval_loader = torch.utils.data.DataLoader(
        ImageDataset(samples, build_eval_transform(source.config)), batch_size=128, num_workers=config.workers
    )
    prepare, augment = split_train_transform(source.config, erasing_p=config.random_erasing)
    train_set = ImageDataset(samples, augment, prepare)
    _freeze(extractor, config.freeze_blocks, config.adapt_bn)
    params = [p for p in extractor.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if not 0 <= config.teacher_decay < 1:
        raise ValueError(f"--teacher-decay must be in [0, 1), not {config.teacher_decay}")
    teacher = (
        AveragedModel(extractor, multi_avg_fn=get_ema_multi_avg_fn(config.teacher_decay), use_buffers=True)
        if config.teacher_decay > 0
        else None
    )
    served = teacher.module if teacher is not None else extractor  # what clusters and what is saved

    history: list[Round] = []
    start = _resume(out / CHECKPOINT, config, site_sha, extractor, teacher, optimizer, history)
    # SpCL's independence bar, set by the first round with clusters (a resume reads it from that round's record)
    bar = next((r.clusters["independence_bar"] for r in history if "independence_bar" in r.clusters), None)
    for index in progress(range(start, config.rounds), "adapting", config.rounds - start):
        round_began = time.monotonic()
        features = _templates(served, eval_loader, config, device)
        figures = site_figures(features, site, pids, config.query_camid) if pids is not None else {}
        templates_done = time.monotonic()
        labels, bar = pseudo_labels(features.numpy(), camids, config.cluster, bar)
        summary = cluster_summary(labels, camids) | ({"independence_bar": bar} if bar is not None else {})
        clustering_done = time.monotonic()
        loss = _train_round(
            config, extractor, teacher, source.mask_generator, optimizer, train_set, features, labels, camids, device,
            index,
        )  # fmt: skip
        phases = {
            "templates": templates_done - round_began,
            "clustering": clustering_done - templates_done,
            "steps": time.monotonic() - clustering_done,
        }
        history.append(Round(index, summary, loss, time.monotonic() - round_began, figures, phases))
        logger.info(
            "round %d: %s, loss %.3f%s; %s", index, _words(summary), loss, _figure_words(figures), _phase_words(phases)
        )
        _checkpoint(out / CHECKPOINT, config, site_sha, extractor, teacher, optimizer, history)

    features = _templates(served, eval_loader, config, device)
    labels, _ = pseudo_labels(features.numpy(), camids, config.cluster, bar)
    calibration = pseudo_calibration(features, labels, camids)
    provenance = {
        **default_calibration(source.provenance, calibration, config.threshold_from),
        "adaptation": {
            # The source's own record (its data set, recipe, figures), not this file's: kept apart, so that no
            # figure of the source reads as the adapted weights' own.
            "source": {k: v for k, v in source.provenance.items() if k not in ("fmr_curve", "created_at")},
            "method": METHOD,
            "settings": config.settings(),
            "source_fingerprint": source_fingerprint,
            "site_crops": len(site.crops),
            "site_cameras": len(site.cameras),
            "site_crops_sha256": site_sha,
            "pseudo_calibration": calibration,
        },
    }
    path = save_weights(out / "model.safetensors", served.eval(), source.mask_generator, provenance)
    report: dict[str, Any] = {"rounds": [dataclasses.asdict(r) for r in history], "seconds": time.monotonic() - began}
    if pids is not None:
        report["final"] = site_figures(features, site, pids, config.query_camid)
        report["thresholds"] = threshold_check(source.provenance, calibration, features, pids, camids)
        logger.info("adapted: %s", _figure_words(report["final"]).lstrip(", "))
    with atomic_path(out / "adapt.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    logger.info("wrote %s (%.0f s)", path, time.monotonic() - began)
    return path


def _train_round(
    config: AdaptConfig,
    extractor: FeatureExtractor,
    teacher: AveragedModel | None,
    mask_generator: MaskGenerator | None,
    optimizer: torch.optim.Optimizer,
    train_set: ImageDataset,
    features: torch.Tensor,
    labels: np.ndarray,
    camids: np.ndarray,
    device: torch.device,
    index: int,
) -> float:
    _freeze(extractor, config.freeze_blocks, config.adapt_bn)  # again: ``extract_features`` left all in training mode
    kept = np.flatnonzero(labels >= 0)
    if len(np.unique(labels[kept])) < config.p:
        logger.warning(
            "round %d: %d clusters, fewer than P = %d: nothing trained", index, len(np.unique(labels[kept])), config.p
        )
        return float("nan")
    y = torch.from_numpy(labels)
    cams = torch.from_numpy(camids)
    memory = ClusterMemory(features[kept], y[kept], config.temperature, config.momentum)
    proxies = CameraProxies(features[kept], y[kept], cams[kept]) if config.proxy_weight > 0 else None
    clustered = [Sample(train_set.samples[i].path, int(labels[i]), int(camids[i])) for i in kept]
    sampler = RandomIdentitySampler(clustered, config.p, config.k, seed=config.seed)
    subset = torch.utils.data.Subset(train_set, kept.tolist())
    loader = torch.utils.data.DataLoader(
        subset, batch_size=config.p * config.k, sampler=sampler, drop_last=True, num_workers=config.workers
    )
    losses: list[float] = []
    epoch = 0
    while len(losses) < config.steps:
        sampler.set_epoch(index * 1000 + epoch)
        epoch += 1
        for images, _pid, _camid, rows in loader:
            batch_y, batch_cam = y[rows].to(device), cams[rows].to(device)
            images = _to(images, config, device)
            f = _features(extractor, images, config, device)
            loss = _site_loss(f, batch_y, batch_cam, memory, proxies, config)
            if config.mask_weight > 0:
                with torch.no_grad(), autocast(config.amp, device):
                    mask = mask_generator.eval()(images)
                hidden = hide_top(images, mask.float(), extractor.config.mask_ratio)
                with running_stats_kept(extractor):  # the clean crops alone move BN's statistics, as in stage 3
                    masked = _features(extractor, hidden, config, device)
                masked_loss = _site_loss(masked, batch_y, batch_cam, memory, proxies, config)
                loss = (1 - config.mask_weight) * loss + config.mask_weight * masked_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if teacher is not None:
                teacher.update_parameters(extractor)
            memory.update(f.detach().cpu(), batch_y.cpu())
            if proxies is not None:
                proxies.update(f.detach().cpu(), batch_y.cpu(), batch_cam.cpu())
            losses.append(float(loss.detach()))
            if len(losses) == config.steps:
                break
    return float(np.mean(losses))


def _to(images: torch.Tensor, config: AdaptConfig, device: torch.device) -> torch.Tensor:
    images = images.to(device)
    return images.contiguous(memory_format=torch.channels_last) if config.channels_last else images


def _templates(
    extractor: FeatureExtractor, loader: torch.utils.data.DataLoader, config: AdaptConfig, device: torch.device
) -> torch.Tensor:
    """The site's templates under the current weights (the served forward, float32)."""
    batches = ((_to(images, config, device), *rest) for images, *rest in loader)
    return extract_features(extractor, batches, device)[0]


def _features(extractor: FeatureExtractor, images: torch.Tensor, config: AdaptConfig, device: torch.device):
    """The feature the site's losses train: the served one (before or after the BNNeck), float32."""
    with autocast(config.amp, device):
        before, after = extractor.forward_neck(images)
    return (after if extractor.config.neck_feat == "after" else before).float()


def _site_loss(
    f: torch.Tensor,
    labels: torch.Tensor,
    cams: torch.Tensor,
    memory: ClusterMemory,
    proxies: CameraProxies | None,
    config: AdaptConfig,
) -> torch.Tensor:
    """The cluster memory's contrastive loss, plus the camera proxies' at ``proxy_weight``."""
    loss = memory.loss(f, labels)
    if proxies is not None:
        loss = loss + config.proxy_weight * proxies.loss(f, labels, cams)
    return loss


def _checkpoint(path, config, site_sha, extractor, teacher, optimizer, history) -> None:
    save_checkpoint(path, {
        "settings": json.dumps(config.settings(), sort_keys=True), "site_sha256": site_sha,
        "weights": str(config.weights), "extractor": extractor.state_dict(), "optimizer": optimizer.state_dict(),
        "rng": rng_state(), "history": json.dumps([dataclasses.asdict(r) for r in history]),
        **({"teacher": teacher.state_dict()} if teacher is not None else {}),
    })  # fmt: skip


def _resume(path, config, site_sha, extractor, teacher, optimizer, history) -> int:
    """The round to start from: 0, or the one after the checkpoint's when it is this run's."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["settings"] != json.dumps(config.settings(), sort_keys=True) or state["site_sha256"] != site_sha:
        raise ValueError(
            f"{path} is another adaptation's (other settings or other crops): pass another --out, or delete it"
        )
    extractor.load_state_dict(state["extractor"])
    if teacher is not None:
        teacher.load_state_dict(state["teacher"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    history.extend(Round(**r) for r in json.loads(state["history"]))
    logger.info("resuming after round %d of %d (%s)", len(history) - 1, config.rounds, path)
    return len(history)


def _words(summary: dict[str, float]) -> str:
    return (
        f"{summary['clusters']:.0f} clusters ({summary['clustered']:.0%} of crops, mean size "
        f"{summary['mean_size']:.1f}, {summary['cross_camera']:.0%} across cameras)"
    )


def _phase_words(phases: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())


def _figure_words(figures: dict[str, float]) -> str:
    if not figures:
        return ""
    return (
        f", site rank-1 {figures['rank1']:.1f} mAP {figures['mAP']:.1f} (camera-centred {figures['centred_rank1']:.1f}"
        f" / {figures['centred_mAP']:.1f})"
    )
