"""Training throughput: images/s of ``training.engine.training_step`` in each stage, fed by the real data loader
(``training.data.loaders.build_loaders`` over JPEGs from the synthetic Market-1501 generator: decoding, the section 3.2
transform, the P x K sampler, worker processes) against the same kind of batches already in memory on the device.
Their ratio shows whether loading starves the networks.

    python -m bench.training                         # CPU: P x K = 4 x 2, a few minutes
    python -m bench.training --p 20 --k 3 --amp bf16  # a GPU, the paper's batch
    python -m bench.training --backbone mobilenet_v2 --input-size 160x80 --p 20 --k 3 --freeze-blocks 7 \
        --unet-width 8 --workers 0 --stages 1,3 --amp bf16 --channels-last   # the CPU table's steps

Rounds alternate a block of steps from the loader (a fresh iterator, its first step untimed: no batches prefetched
while the other block ran) with a block from memory; the ratio is paired within each round.
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Table, add_common_args, int_list, median, report, setup
from models import ModelConfig
from models.devices import resolve_device
from training.config import AMP_MODES, TrainConfig
from training.data.loaders import build_loaders
from training.data.synthetic import generate_synthetic_market1501
from training.engine import Networks, build_networks, set_stage_modes, training_step

logger = logging.getLogger("bench.training")


def _to_device(batch: tuple, device: torch.device, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """What train_one_epoch does with a batch before the step."""
    images, pids = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, pids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(
    stage: int,
    source,
    steps: int,
    nets: Networks,
    config: TrainConfig,
    device: torch.device,
) -> tuple[list[float], list[float]]:
    """(seconds per step including the wait for its batch, seconds waiting for the batch) over ``steps``."""
    step_s, wait_s = [], []
    for _ in range(steps):
        start = time.perf_counter()
        images, pids = source()
        _sync(device)
        ready = time.perf_counter()
        training_step(stage, images, pids, nets, config, device)
        _sync(device)
        step_s.append(time.perf_counter() - start)
        wait_s.append(ready - start)
    return step_s, wait_s


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int_list, default=[1, 2, 3], help="stages measured")
    parser.add_argument("--backbone", default="resnet50", help="extractor trunk (the paper's resnet50)")
    parser.add_argument("--input-size", default="224x112", help="HxW of the network input (the paper's 224x112)")
    parser.add_argument("--unet-width", type=int, default=32, help="U-Net base width (the paper's 32)")
    parser.add_argument("--unet-levels", type=int, default=5, help="U-Net resolution levels (the paper's 5)")
    parser.add_argument("--p", type=int, default=None, help="identities per batch (default 20 on CUDA, 4 on the CPU)")
    parser.add_argument("--k", type=int, default=None, help="images per identity (default 3 on CUDA, 2 on the CPU)")
    parser.add_argument("--workers", type=int, default=2, help="data loader worker processes")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block (default 5 on CUDA, 2 on CPU)")
    parser.add_argument("--rounds", type=int, default=None, help="loader/memory block pairs (default 3 CUDA, 2 CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="none", choices=AMP_MODES, help="bf16 (CUDA or CPU) or fp16 (CUDA)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last networks and batches")
    parser.add_argument("--freeze-blocks", type=int, default=0, help="leading trunk blocks frozen (no backward)")
    parser.add_argument("--last-stride", type=int, default=2, choices=(1, 2), help="the trunk's last stride (paper: 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = setup(args)
    started = time.time()
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    p = args.p or (20 if cuda else 4)
    k = args.k or (3 if cuda else 2)
    steps = args.steps or (5 if cuda else 2)
    rounds = args.rounds or (3 if cuda else 2)
    height, width = (int(v) for v in args.input_size.lower().split("x"))
    table = Table(
        "training_step per stage: real data loader against batches in memory",
        ["stage", "source", "images/s", "step ms (median)", "data wait ms (median)", "x in memory (paired)", "steps"],
    )
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        # Enough training identities for an epoch of 1 + steps batches; each gives two groups of K.
        num_ids = 2 * p * math.ceil((1 + steps) / 2) + 2 * p
        logger.info("writing %d synthetic identities", num_ids)
        root = generate_synthetic_market1501(
            Path(tmp) / "data", num_ids=num_ids, images_per_id=2 * k + 2, seed=args.seed, size=(128, 64)
        )
        config = TrainConfig(
            dataset="market1501",
            root=str(root),
            out=str(Path(tmp) / "run"),
            model=ModelConfig(
                backbone=args.backbone,
                input_height=height,
                input_width=width,
                unet_base_width=args.unet_width,
                unet_levels=args.unet_levels,
                last_stride=args.last_stride,
            ),
            p=p,
            k=k,
            workers=args.workers,
            device=str(device),
            amp=args.amp,
            channels_last=args.channels_last,
            freeze_blocks=args.freeze_blocks,
            seed=args.seed,
        )
        loaders = build_loaders(config)
        torch.manual_seed(args.seed)
        nets = build_networks(config, device)
        epoch = 0
        warm = iter(loaders.train)
        in_memory = [_to_device(next(warm), device, config) for _ in range(steps)]
        del warm
        for stage in args.stages:
            set_stage_modes(stage, nets, config.freeze_blocks)
            logger.info("stage %d: warm-up", stage)
            timed_steps(stage, lambda: in_memory[0], 1, nets, config, device)
            loader_s, loader_wait, memory_s, ratios = [], [], [], []
            for round_ in range(rounds):
                logger.info("stage %d round %d: loader, then memory", stage, round_ + 1)
                epoch += 1
                loaders.sampler.set_epoch(epoch)
                batches = iter(loaders.train)

                def from_loader(batches=batches) -> tuple[torch.Tensor, torch.Tensor]:
                    return _to_device(next(batches), device, config)

                timed_steps(stage, from_loader, 1, nets, config, device)  # untimed: the iterator's cold start
                s, w = timed_steps(stage, from_loader, steps, nets, config, device)
                del batches
                queue = iter(range(steps))
                m, _ = timed_steps(stage, lambda q=queue: in_memory[next(q)], steps, nets, config, device)
                loader_s += s
                loader_wait += w
                memory_s += m
                ratios.append(median(m) / median(s))
            batch = p * k
            table.add(stage, "in memory", batch / median(memory_s), 1e3 * median(memory_s), 0.0, 1.0, len(memory_s))
            table.add(
                stage,
                f"DataLoader, {args.workers} workers",
                batch / median(loader_s),
                1e3 * median(loader_s),
                1e3 * median(loader_wait),
                median(ratios),
                len(loader_s),
            )
    table.notes += [
        f"{args.backbone} extractor and U-Net (base {args.unet_width}) at {height}x{width}, P x K = {p} x {k} = "
        f"{p * k} images a step, amp {args.amp}, channels_last {args.channels_last}, {args.freeze_blocks} trunk "
        f"blocks frozen, last stride {args.last_stride}, on {device}; random initial "
        "weights, Adam; synthetic 128x64 JPEGs.",
        f"{rounds} rounds of {steps} steps from the loader then {steps} from memory; x in memory: median over rounds "
        "of the in-memory step time / the loader's (1 = loading keeps up; below 1 it starves the networks). "
        "Data wait: time to get the next batch onto the device.",
    ]
    report("Training throughput", "bench.training", [table], started, results, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
