"""``python -m training {fit,evaluate,export,demo}``: a thin argparse layer over the engine."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from training.config import AMP_MODES, TrainConfig

logger = logging.getLogger("training")
DATASETS = ("market1501", "dukemtmc", "cuhk03", "folder", "synthetic")
_DEFAULTS = TrainConfig()


def _int_list(count: int | None, name: str, allowed: tuple[int, ...] | None = None):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {text!r}") from None
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"{name} needs {count} comma-separated numbers, got {text!r}")
        if any(v < 0 for v in values) or (allowed and any(v not in allowed for v in values)):
            raise argparse.ArgumentTypeError(f"{name} has a value out of range in {text!r}")
        return values

    return parse


def _input_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-size must look like 224x112, got {text!r}") from None
    return h, w


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=_DEFAULTS.dataset, choices=DATASETS, help="data set layout under --root")
    p.add_argument("--root", default=None, required=True, help="folder holding the data set")
    p.add_argument("--workers", type=int, default=_DEFAULTS.workers, help="data loader processes")
    p.add_argument("--device", default=_DEFAULTS.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--flip-eval", action="store_true", help="average features of each image and its mirror")
    p.add_argument("--query-camid", type=int, default=0, help="folder/CSV data: the val camera used as queries")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="train the three stages of the paper")
    _add_data_args(fit)
    fit.add_argument("--out", default=_DEFAULTS.out, help="run folder (config, checkpoints, log, plots)")
    fit.add_argument("--resume", action="store_true", help="continue from --out/last.pt")
    fit.add_argument(
        "--stages",
        type=_int_list(None, "--stages", (1, 2, 3)),
        default=_DEFAULTS.stages,
        help="stages to run, e.g. 1,2,3 or 2",
    )
    fit.add_argument(
        "--epochs",
        type=_int_list(3, "--epochs"),
        default=_DEFAULTS.epochs,
        help="epochs of stages 1,2,3 (paper: 50,25,100)",
    )
    fit.add_argument(
        "--backbone",
        default=_DEFAULTS.backbone,
        choices=("resnet50", "resnet18", "mobilenet_v2"),
        help="extractor trunk",
    )
    fit.add_argument("--pretrained", default=None, help="local ImageNet weights file for the trunk")
    fit.add_argument(
        "--input-size",
        type=_input_size,
        default=(_DEFAULTS.input_height, _DEFAULTS.input_width),
        help="HxW of the network input (paper: 224x112)",
    )
    fit.add_argument("--feat-dim", type=int, default=_DEFAULTS.feat_dim, help="template size")
    fit.add_argument("--unet-width", type=int, default=_DEFAULTS.unet_base_width, help="U-Net base width")
    fit.add_argument("--unet-levels", type=int, default=_DEFAULTS.unet_levels, help="U-Net resolution levels")
    fit.add_argument("--p", type=int, default=_DEFAULTS.p, help="identities per batch")
    fit.add_argument("--k", type=int, default=_DEFAULTS.k, help="images per identity")
    fit.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="Adam lr of the extractor")
    fit.add_argument(
        "--warmup-epochs",
        type=int,
        default=_DEFAULTS.warmup_epochs,
        help="linear lr warm-up (from lr/10) over stage 1's first epochs; 0 = none (the paper's)",
    )
    fit.add_argument(
        "--freeze-blocks",
        type=int,
        default=_DEFAULTS.freeze_blocks,
        help="leading trunk blocks kept at their ImageNet weights (ResNet: stem, layer1..4; MobileNetV2: 19 blocks)",
    )
    fit.add_argument("--mask-lr", type=float, default=_DEFAULTS.mask_lr, help="Adam lr of the mask generator")
    fit.add_argument("--margin", type=float, default=_DEFAULTS.margin, help="triplet margin")
    fit.add_argument("--soft-margin", action="store_true", help="soft-margin triplet loss")
    fit.add_argument("--lambda1", type=float, default=_DEFAULTS.lambda1, help="weight of the clean triplet loss")
    fit.add_argument("--lambda2", type=float, default=_DEFAULTS.lambda2, help="weight of the identity loss")
    fit.add_argument("--mask-ratio", type=float, default=_DEFAULTS.mask_ratio, help="share of pixels hidden")
    fit.add_argument("--eval-every", type=int, default=_DEFAULTS.eval_every, help="evaluate every N epochs")
    fit.add_argument("--amp", default=_DEFAULTS.amp, choices=AMP_MODES, help="mixed precision on CUDA")
    fit.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    fit.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="random seed")

    ev = sub.add_parser("evaluate", help="evaluate a weights file on a data set's query/gallery")
    _add_data_args(ev)
    ev.add_argument("--weights", required=True, default=None, help="weights file (.safetensors)")

    ex = sub.add_parser("export", help="write weights for the app (and ONNX) from a run")
    ex.add_argument("--run", required=True, default=None, help="run folder written by fit")
    ex.add_argument("--out", default=None, help="weights path (default RUN/model.safetensors)")
    ex.add_argument("--onnx", action="store_true", help="also write RUN/extractor.onnx, checked to 1e-4")

    demo = sub.add_parser("demo", help="synthetic data, all three stages on the CPU in minutes")
    demo.add_argument("--out", default="runs/demo", help="run folder (the data goes in OUT/data)")
    demo.add_argument("--epochs", type=_int_list(3, "--epochs"), default=(8, 2, 4), help="epochs of stages 1,2,3")
    demo.add_argument("--device", default="cpu", help="cpu or cuda")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    kwargs = {"query_camid": args.query_camid} if args.dataset == "folder" else {}
    return TrainConfig(
        dataset=args.dataset,
        root=args.root,
        out=args.out,
        backbone=args.backbone,
        pretrained=args.pretrained,
        input_height=args.input_size[0],
        input_width=args.input_size[1],
        feat_dim=args.feat_dim,
        unet_base_width=args.unet_width,
        unet_levels=args.unet_levels,
        mask_ratio=args.mask_ratio,
        epochs=args.epochs,
        stages=args.stages,
        p=args.p,
        k=args.k,
        lr=args.lr,
        warmup_epochs=args.warmup_epochs,
        freeze_blocks=args.freeze_blocks,
        mask_lr=args.mask_lr,
        margin=args.margin,
        soft_margin=args.soft_margin,
        lambda1=args.lambda1,
        lambda2=args.lambda2,
        eval_every=args.eval_every,
        flip_eval=args.flip_eval,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        workers=args.workers,
        seed=args.seed,
        dataset_kwargs=kwargs,
    )


def _progress(desc: str):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, leave=False, dynamic_ncols=True)


def _eval_loaders(dataset, model_config, workers: int):
    from models import build_eval_transform
    from training.data import ImageDataset

    t = build_eval_transform(model_config)
    kw = dict(batch_size=128, shuffle=False, num_workers=workers)
    return (
        torch.utils.data.DataLoader(ImageDataset(dataset.query, t), **kw),
        torch.utils.data.DataLoader(ImageDataset(dataset.gallery, t), **kw),
    )


def build_loaders(config: TrainConfig, rank: int = 0, world_size: int = 1):
    """Train (P x K sampler), query and gallery loaders from the data package."""
    if not Path(config.root).exists():
        raise FileNotFoundError(f"data set root {config.root} does not exist")
    from training.data import ImageDataset, build_dataset
    from training.engine import Loaders
    from training.samplers import RandomIdentitySampler
    from training.transforms import build_train_transform

    dataset = build_dataset(config.dataset, config.root, **config.dataset_kwargs)
    model_config = config.model_config()
    sampler = RandomIdentitySampler(
        dataset.train, num_pids=config.p, num_instances=config.k, seed=config.seed, rank=rank, world_size=world_size
    )
    train = torch.utils.data.DataLoader(
        ImageDataset(dataset.train, build_train_transform(model_config)),
        batch_size=config.p * config.k,
        sampler=sampler,
        drop_last=True,
        num_workers=config.workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=config.workers > 0,
    )
    query, gallery = _eval_loaders(dataset, model_config, config.workers)
    figure = torch.stack([query.dataset[i][0] for i in range(min(8, len(query.dataset)))])
    return Loaders(train, query, gallery, sampler, figure)


def cmd_fit(args: argparse.Namespace) -> int:
    from training.engine import fit

    config = _config_from_args(args)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:  # torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            config.device = f"cuda:{local}"
    loaders = build_loaders(config, rank, world_size)
    start = time.time()
    _, state = fit(
        config,
        loaders,
        Path(args.out),
        resume=args.resume,
        progress=_progress("train") if rank == 0 else None,
        is_main=rank == 0,
    )
    if rank == 0:
        final = next((r for r in reversed(state.history) if "mAP" in r), {})
        logger.info(
            "done in %.0f s; %s",
            time.time() - start,
            {k: round(v, 2) for k, v in final.items() if isinstance(v, float)},
        )
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models import load_weights
    from training.engine import evaluate, resolve_device

    if not Path(args.root).exists():
        raise FileNotFoundError(f"data set root {args.root} does not exist")
    device = resolve_device(args.device)
    model = load_weights(args.weights, device)
    from training.data import build_dataset

    kwargs = {"query_camid": args.query_camid} if args.dataset == "folder" else {}
    dataset = build_dataset(args.dataset, args.root, **kwargs)
    query, gallery = _eval_loaders(dataset, model.config, args.workers)
    figures = evaluate(model.extractor, query, gallery, device, args.flip_eval)
    sys.stdout.write(json.dumps({k: round(v, 2) for k, v in figures.items()}) + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_onnx, export_weights, networks_from_run

    run = Path(args.run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    path = export_weights(run, args.out or run / "model.safetensors")
    sys.stdout.write(f"weights: {path}\n")
    if args.onnx:
        extractor, _, _ = networks_from_run(run)
        sys.stdout.write(f"onnx: {export_onnx(extractor, run / 'extractor.onnx')}\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from training.data.synthetic import generate_synthetic_market1501
    from training.engine import build_networks, evaluate, fit, resolve_device

    out = Path(args.out)
    root = generate_synthetic_market1501(out / "data", seed=args.seed, size=(64, 32))
    config = TrainConfig(
        dataset="market1501",
        root=str(root),
        out=str(out),
        backbone="resnet18",
        input_height=64,
        input_width=32,
        feat_dim=64,
        unet_base_width=8,
        unet_levels=3,
        epochs=args.epochs,
        p=8,
        k=3,
        lr=1e-3,
        eval_every=0,
        device=args.device,
        workers=0,
        seed=args.seed,
    )
    loaders = build_loaders(config)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    nets = build_networks(config, device)
    before = evaluate(nets.extractor, loaders.query, loaders.gallery, device)
    sys.stdout.write(f"untrained: mAP {before['mAP']:.1f}%  rank-1 {before['rank1']:.1f}%\n")
    start = time.time()
    _, state = fit(config, loaders, out, nets=nets, progress=_progress("demo"))
    after = state.history[-1]
    sys.stdout.write(
        f"trained ({time.time() - start:.0f} s): mAP {after['mAP']:.1f}%  rank-1 {after['rank1']:.1f}%"
        f"  (run folder {out})\n"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    commands = {"fit": cmd_fit, "evaluate": cmd_evaluate, "export": cmd_export, "demo": cmd_demo}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
