"""``python -m training {fit,evaluate,export,adapt,demo}``: a thin argparse layer over the engine."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from models import ModelConfig
from training.allocator import allocator_advice
from training.config import RECIPES, TrainConfig, recipe_config

logger = logging.getLogger("training")
DATASETS = ("market1501", "dukemtmc", "cuhk03", "folder", "synthetic")
# Settings that are not flags: the nested model (its fields are flags), reader options (--query-camid), and
# the normalisation constants that travel with the ImageNet weights.
_NOT_FLAGS = {"model", "dataset_kwargs", "mean", "std", "root", "dataset", "workers", "device"}


def _int_list(count: int | None, name: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be comma-separated integers, got {text!r}") from None
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"{name} needs {count} comma-separated numbers, got {text!r}")
        if any(v < 0 for v in values):
            raise argparse.ArgumentTypeError(f"{name} has a negative value in {text!r}")
        return values

    return parse


def _flag_kwargs(f: dataclasses.Field, flag: str) -> dict[str, Any]:
    """argparse options for a dataclass field, from its annotation, default and ``help`` metadata. Defaults
    are left out of the namespace (SUPPRESS), so only the flags given override the recipe's settings."""
    kind = str(f.type)
    kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {f.default})"}
    if "choices" in f.metadata:
        kw["choices"] = f.metadata["choices"]
    if kind == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    elif kind.startswith("tuple[int"):
        kw["type"] = _int_list(None if "..." in kind else kind.count("int"), flag)
    else:
        kw["type"] = {"int": int, "float": float}.get(kind, str)
    return kw


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig and ModelConfig field (``lr_steps`` -> ``--lr-steps``)."""
    for cls, group in ((TrainConfig, p.add_argument_group("training")), (ModelConfig, p.add_argument_group("model"))):
        for f in dataclasses.fields(cls):
            if f.name not in _NOT_FLAGS:
                flag = "--" + f.name.replace("_", "-")
                group.add_argument(flag, dest=f.name, **_flag_kwargs(f, flag))


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="market1501", choices=DATASETS, help="data set layout under --root")
    p.add_argument("--root", default=None, required=True, help="folder holding the data set")
    p.add_argument("--workers", type=int, default=4, help="data loader processes")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--query-camid", type=int, default=0, help="folder/CSV data: the val camera used as queries")


def _add_adapt_args(p: argparse.ArgumentParser) -> None:
    from training.adapt import AdaptConfig, ClusterSettings

    d, c = AdaptConfig("", ""), ClusterSettings()
    p.add_argument("--weights", required=True, help="the source weights file (.safetensors)")
    p.add_argument(
        "--site", required=True, help="the site's crops: a folder (one subfolder per camera) or a manifest "
        "(path,camid; a pid column is read by --eval alone)",
    )  # fmt: skip
    p.add_argument("--out", default=d.out, help="run folder: checkpoint, adapt.json and model.safetensors")
    p.add_argument("--rounds", type=int, default=d.rounds, help="pseudo-label refreshes (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="P x K steps per round (default %(default)s)")
    p.add_argument("--p", type=int, default=d.p, help="clusters per batch (default %(default)s)")
    p.add_argument("--k", type=int, default=d.k, help="crops per cluster in a batch (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam's learning rate (default %(default)s)")
    p.add_argument("--freeze-blocks", type=int, default=d.freeze_blocks, help="leading trunk blocks kept as they are")
    p.add_argument(
        "--adapt-bn", action=argparse.BooleanOptionalAction, default=d.adapt_bn,
        help="the frozen blocks' BN statistics follow the site's crops (AdaBN); --no-adapt-bn keeps the source's",
    )  # fmt: skip
    p.add_argument("--random-erasing", type=float, default=d.random_erasing, help="(default %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="cluster memory's (default %(default)s)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="cluster memory's (default %(default)s)")
    p.add_argument("--proxy-weight", type=float, default=d.proxy_weight, help="camera proxies' weight; 0: none")
    p.add_argument(
        "--mask-weight", type=float, default=d.mask_weight,
        help="share of the loss from the crops with the mask generator's top 30%% hidden (the paper's 0.1); 0: off",
    )  # fmt: skip
    p.add_argument(
        "--teacher-decay", type=float, default=d.teacher_decay,
        help="mean teacher: an EMA of the weights (this decay a step) clusters, and is saved (default %(default)s)",
    )  # fmt: skip
    p.add_argument("--k1", type=int, default=c.k1, help="Jaccard distance's k1 (default %(default)s)")
    p.add_argument("--k2", type=int, default=c.k2, help="Jaccard distance's k2 (default %(default)s)")
    p.add_argument("--eps", type=float, default=c.eps, help="DBSCAN's eps on it (default %(default)s)")
    p.add_argument("--min-samples", type=int, default=c.min_samples, help="DBSCAN's (default %(default)s)")
    p.add_argument(
        "--camera-centring", action=argparse.BooleanOptionalAction, default=c.camera_centring,
        help="cluster with each camera's mean template taken out",
    )  # fmt: skip
    p.add_argument(
        "--reliability-delta", type=float, default=c.reliability_delta,
        help="SpCL's reliability criterion: trust clusters that stay themselves at eps -/+ this (0: off; default "
        "%(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--independence-quantile", type=float, default=c.independence_quantile,
        help="SpCL's: the first round's share of clusters independent enough (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--threshold-from", choices=("source", "pseudo"), default=d.threshold_from,
        help="the served default threshold: one estimated from the pseudo-identities (default) or the source's "
        "calibration",
    )  # fmt: skip
    p.add_argument("--amp", choices=("none", "bf16"), default=d.amp, help="mixed precision of the steps")
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last,
        help="channels_last memory format (as fit's; faster on CPUs with oneDNN's AVX-512 kernels)",
    )  # fmt: skip
    p.add_argument(
        "--seed", type=int, default=d.seed, help="fixes the weights for the same crops (default %(default)s)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, default=d.workers, help="data loader processes")
    p.add_argument("--eval", action="store_true", help="print the site's figures each round (needs a pid column)")
    p.add_argument("--query-camid", type=int, default=d.query_camid, help="--eval's query camera")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="train: the paper's three stages, or the strong recipe (--recipe strong)")
    _add_data_args(fit)
    fit.add_argument("--resume", action="store_true", help="continue from --out/last.pt")
    _add_config_flags(fit)

    ev = sub.add_parser("evaluate", help="figures and open-set thresholds of a weights file on a data set")
    _add_data_args(ev)
    ev.add_argument("--weights", required=True, default=None, help="weights file (.safetensors)")
    ev.add_argument("--rerank", action="store_true", help="also the figures after k-reciprocal re-ranking")
    ev.add_argument("--histogram", default=None, help="write the genuine/impostor distance histograms to this PNG")

    ad = sub.add_parser("adapt", help="adapt weights to a site from its unlabeled crops (no identities read)")
    _add_adapt_args(ad)

    ex = sub.add_parser("export", help="write weights for the app (and ONNX) from a run")
    ex.add_argument("--run", required=True, default=None, help="run folder written by fit")
    ex.add_argument("--out", default=None, help="weights path (default RUN/model.safetensors)")
    ex.add_argument(
        "--checkpoint", default="last", choices=("last", "best"), help="last (default) or best-on-val checkpoint"
    )
    ex.add_argument("--root", default=None, help="the run's data set, if it moved (thresholds use its val split)")
    ex.add_argument("--no-thresholds", action="store_true", help="skip the open-set threshold calibration")
    ex.add_argument("--onnx", action="store_true", help="also write RUN/extractor.onnx, checked to 1e-4")

    demo = sub.add_parser("demo", help="synthetic data, all three stages on the CPU in minutes")
    demo.add_argument("--out", default="runs/demo", help="run folder (the data goes in OUT/data)")
    demo.add_argument("--epochs", type=_int_list(3, "--epochs"), default=(8, 2, 4), help="epochs of stages 1,2,3")
    demo.add_argument("--recipe", default="paper", choices=tuple(RECIPES), help="paper or strong")
    demo.add_argument("--device", default="cpu", help="cpu or cuda")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The recipe's settings, overridden by each flag given."""
    given = vars(args)
    model = {f.name: given[f.name] for f in dataclasses.fields(ModelConfig) if f.name in given}
    train = {f.name: given[f.name] for f in dataclasses.fields(TrainConfig) if f.name in given}
    train.pop("recipe", None)
    train.update(dataset=args.dataset, root=args.root, workers=args.workers, device=args.device)
    train["dataset_kwargs"] = {"query_camid": args.query_camid} if args.dataset == "folder" else {}
    return recipe_config(given.get("recipe", "paper"), model, **train)


def _progress(desc: str):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, leave=False, dynamic_ncols=True)


def cmd_fit(args: argparse.Namespace) -> int:
    from training.data.loaders import build_loaders
    from training.engine import fit

    config = config_from_args(args)
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
        Path(config.out),
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
    from models.devices import resolve_device
    from training.data.loaders import val_loaders
    from training.evaluation import (
        calibrate_thresholds,
        evaluate_features,
        extract_features,
        pair_distances,
        rates_at,
    )
    from training.export import THRESHOLD_FMRS

    device = resolve_device(args.device)
    model = load_weights(args.weights, device)
    kwargs = {"query_camid": args.query_camid} if args.dataset == "folder" else {}
    config = TrainConfig(dataset=args.dataset, root=args.root, dataset_kwargs=kwargs, model=model.config)
    query, gallery = val_loaders(config, workers=args.workers)
    qf, q_pids, q_camids = extract_features(model.extractor, query, device)
    gf, g_pids, g_camids = extract_features(model.extractor, gallery, device)
    figures = evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, rerank=args.rerank)
    genuine, impostor = pair_distances(qf, gf, q_pids, g_pids, q_camids, g_camids)
    thresholds = calibrate_thresholds(genuine, impostor, THRESHOLD_FMRS)
    # The thresholds the weights serve, calibrated elsewhere, and the rates they really give on these pairs:
    # whether the served default holds at this site.
    stored = [
        {**entry, "here": rates_at(genuine, impostor, entry["distance"])}
        for entry in model.provenance.get("thresholds") or []
    ]
    report = {
        "figures": {k: round(v, 2) for k, v in figures.items()},
        "thresholds": thresholds,
        "pairs": {"genuine": len(genuine), "impostor": len(impostor)},
        "stored_thresholds": stored,
    }
    if args.histogram:
        from training.plots import distance_histograms

        report["histogram"] = str(distance_histograms(genuine, impostor, thresholds, Path(args.histogram)))
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_onnx, export_weights, networks_from_run

    run = Path(args.run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    out = args.out or run / "model.safetensors"
    path = export_weights(run, out, which=args.checkpoint, calibrate=not args.no_thresholds, root=args.root)
    sys.stdout.write(f"weights: {path}\n")
    if args.onnx:
        extractor, _, _ = networks_from_run(run, args.checkpoint)
        sys.stdout.write(f"onnx: {export_onnx(extractor, run / 'extractor.onnx')}\n")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from models.devices import resolve_device
    from training.adapt import AdaptConfig, ClusterSettings, adapt

    config = AdaptConfig(
        weights=args.weights, site=args.site, out=args.out, rounds=args.rounds, steps=args.steps, p=args.p, k=args.k,
        lr=args.lr, freeze_blocks=args.freeze_blocks, adapt_bn=args.adapt_bn, random_erasing=args.random_erasing,
        temperature=args.temperature, momentum=args.momentum, proxy_weight=args.proxy_weight,
        mask_weight=args.mask_weight, teacher_decay=args.teacher_decay,
        cluster=ClusterSettings(
            k1=args.k1, k2=args.k2, eps=args.eps, min_samples=args.min_samples, camera_centring=args.camera_centring,
            reliability_delta=args.reliability_delta, independence_quantile=args.independence_quantile,
        ), amp=args.amp,
        seed=args.seed, threshold_from=args.threshold_from, device=str(resolve_device(args.device)),
        channels_last=args.channels_last, workers=args.workers, eval=args.eval,
        query_camid=args.query_camid,
    )  # fmt: skip
    path = adapt(config, progress=lambda it, desc, total: _progress(desc)(it))
    sys.stdout.write(f"weights: {path}\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from models.devices import resolve_device
    from training.data.loaders import build_loaders
    from training.data.synthetic import generate_synthetic_market1501
    from training.engine import build_networks, fit
    from training.evaluation import evaluate

    out = Path(args.out)
    root = generate_synthetic_market1501(out / "data", seed=args.seed, size=(64, 32))
    small = dict(backbone="resnet18", input_height=64, input_width=32, feat_dim=64, unet_base_width=8, unet_levels=3)
    config = recipe_config(
        args.recipe,
        small,
        dataset="market1501",
        root=str(root),
        out=str(out),
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
    nets = build_networks(config, device, loaders.train_pids)
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
    commands = {"fit": cmd_fit, "evaluate": cmd_evaluate, "export": cmd_export, "adapt": cmd_adapt, "demo": cmd_demo}
    if args.command in ("fit", "adapt"):
        advice = allocator_advice(on_gpu=args.device != "cpu" and torch.cuda.is_available())
        if advice:
            logger.info(advice)
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
