"""Throughput, latency and peak memory of the feature extractor or the mask generator at several batch sizes:
PyTorch eager fp32 is the reference, against channels_last, torch.compile and ONNX Runtime on the CPU, and on
CUDA against channels_last, torch.compile, bf16/fp16 autocast with and without CUDA graphs; with the achieved
share of the device's peak FLOP/s (FLOPs counted by torch.utils.flop_counter on the network itself).

    python -m bench.networks --net extractor
    python -m bench.networks --net mask

Inputs are random tensors already on the device: this measures the network, not decoding or copies.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import (
    PeakMemory,
    Table,
    add_common_args,
    conv_uses_tf32,
    cpu_cores,
    cpu_peak_gflops,
    gpu_peak_tflops,
    int_list,
    interleaved_rounds,
    median,
    mib,
    paired_ratio,
    report,
    rounds_within,
    setup,
    time_call,
)
from models import ModelConfig, build_extractor, build_mask_generator
from models.onnx_export import export_onnx as export_graph

logger = logging.getLogger("bench.networks")

NETS = ("extractor", "mask")
NO_CUDA = "n/a (no CUDA)"

Call = Callable[[], Any]


@dataclass
class Variant:
    name: str
    precision: str  # fp32, bf16 or fp16: which peak FLOP/s the row is compared with
    make: Callable[[torch.Tensor], Call]  # input (B, 3, H, W) on the device -> one forward pass per call
    memory_on_first_call: bool = False  # CPU: ONNX Runtime grows its arena on a session's first run


def build_network(net: str, config: ModelConfig) -> nn.Module:
    torch.manual_seed(0)
    if net == "extractor":
        return build_extractor(config).eval()
    if net == "mask":
        return build_mask_generator(config).eval()
    raise ValueError(f"unknown network {net!r}; choose {', '.join(NETS)}")


def flops_per_image(module: nn.Module, config: ModelConfig) -> float:
    """Multiply-adds x 2 of one forward pass at the config's input size."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, config.input_height, config.input_width)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(x)
    return float(counter.get_total_flops())


# -- the variants ------------------------------------------------------------------------------------------


def _eager(module: nn.Module, channels_last: bool = False, dtype: torch.dtype | None = None) -> Callable:
    cuda = next(module.parameters()).is_cuda

    def make(x: torch.Tensor) -> Call:
        def call() -> Any:
            inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                out = module(inp)
            if cuda:
                torch.cuda.synchronize()
            return out

        return call

    return make


def _compiled(module: nn.Module, mode: str | None = None, dtype: torch.dtype | None = None) -> Callable:
    compiled = torch.compile(module, mode=mode)
    cuda = next(module.parameters()).is_cuda

    def make(x: torch.Tensor) -> Call:
        def call() -> Any:
            if mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                out = compiled(x)
            if cuda:
                torch.cuda.synchronize()
            return out

        return call

    return make


def _cuda_graph(module: nn.Module, dtype: torch.dtype, channels_last: bool = False) -> Callable:
    """One forward pass captured as a CUDA graph per batch size; each call copies the batch into the graph's
    static input, as a server would, and replays it. Autocast's weight cache must be off while capturing."""

    def make(x: torch.Tensor) -> Call:
        static_x = x.clone().contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, cache_enabled=False):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs' documentation does
                    module(static_x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = module(static_x)

        def call() -> Any:
            static_x.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            return static_out

        return call

    return make


def _export_onnx(net: str, module: nn.Module, config: ModelConfig, path: Path) -> Path:
    if net == "extractor":
        from training.export import export_onnx  # the project's own export, checked against PyTorch

        return export_onnx(module, path, config)
    return export_graph(module, path, (config.input_height, config.input_width), "mask")


def _onnxruntime(path_of: Callable[[], Path]) -> Callable:
    """A fresh CPU session per batch size (so its arena's growth is measured), threads as torch's. Its threads
    must not spin after a run: spinning would take the cores from the variant timed next."""

    def make(x: torch.Tensor) -> Call:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(path_of()), options, providers=["CPUExecutionProvider"])
        feed = {"images": x.cpu().numpy()}
        return lambda: session.run(None, feed)

    return make


def cpu_variants(net: str, module: nn.Module, config: ModelConfig, tmp: Path) -> list[Variant]:
    exported: dict[str, Path] = {}

    def onnx_path() -> Path:
        if "path" not in exported:  # exported on first use, so that a failure is one row's error
            exported["path"] = _export_onnx(net, copy.deepcopy(module), config, tmp / f"{net}.onnx")
        return exported["path"]

    channels_last = copy.deepcopy(module).to(memory_format=torch.channels_last)
    return [
        Variant("eager fp32", "fp32", _eager(module)),
        Variant("channels_last fp32", "fp32", _eager(channels_last, channels_last=True)),
        Variant("torch.compile fp32", "fp32", _compiled(copy.deepcopy(module))),
        Variant("ONNX Runtime CPU fp32", "fp32", _onnxruntime(onnx_path), memory_on_first_call=True),
    ]


CUDA_VARIANT_NAMES = (
    "eager fp32",
    "channels_last fp32",
    "torch.compile fp32",
    "autocast bf16",
    "autocast fp16",
    "autocast bf16 + CUDA graph",
    "autocast fp16 + CUDA graph",
    "channels_last autocast bf16 + CUDA graph",
    "torch.compile reduce-overhead bf16 (CUDA graphs)",
)


def cuda_variants(module: nn.Module) -> list[Variant]:
    gpu = copy.deepcopy(module).cuda()
    gpu_cl = copy.deepcopy(gpu).to(memory_format=torch.channels_last)
    bf16, fp16 = torch.bfloat16, torch.float16
    variants = [
        Variant("eager fp32", "fp32", _eager(gpu)),
        Variant("channels_last fp32", "fp32", _eager(gpu_cl, channels_last=True)),
        Variant("torch.compile fp32", "fp32", _compiled(copy.deepcopy(gpu))),
        Variant("autocast bf16", "bf16", _eager(gpu, dtype=bf16)),
        Variant("autocast fp16", "fp16", _eager(gpu, dtype=fp16)),
        Variant("autocast bf16 + CUDA graph", "bf16", _cuda_graph(gpu, bf16)),
        Variant("autocast fp16 + CUDA graph", "fp16", _cuda_graph(gpu, fp16)),
        Variant("channels_last autocast bf16 + CUDA graph", "bf16", _cuda_graph(gpu_cl, bf16, channels_last=True)),
        Variant(
            "torch.compile reduce-overhead bf16 (CUDA graphs)",
            "bf16",
            _compiled(copy.deepcopy(gpu), mode="reduce-overhead", dtype=bf16),
        ),
    ]
    assert tuple(v.name for v in variants) == CUDA_VARIANT_NAMES
    return variants


# -- measuring -----------------------------------------------------------------------------------------------


@dataclass
class Warm:
    call: Call
    first_s: float  # set-up (session, compilation, graph capture) + the first call
    warm_s: float  # the second call
    memory: int | None


def _warm_up(variant: Variant, x: torch.Tensor, cuda: bool) -> Warm:
    start = time.perf_counter()
    if cuda:  # set-up included: CUDA graph pools and static buffers are this variant's memory
        with PeakMemory("cuda") as peak:
            call = variant.make(x)
            call()
            first = time.perf_counter() - start
            warm = time_call(call)
        return Warm(call, first, warm, peak.bytes)
    call = variant.make(x)
    if variant.memory_on_first_call:
        with PeakMemory() as peak:
            call()
        first = time.perf_counter() - start
        warm = time_call(call)
    else:
        call()
        first = time.perf_counter() - start
        with PeakMemory() as peak:
            warm = time_call(call)
    return Warm(call, first, warm, peak.bytes)


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return "failed: " + (text[:117] + "..." if len(text) > 120 else text).replace("|", "/")


def measure(
    table: Table,
    variants: list[Variant],
    batches: list[int],
    config: ModelConfig,
    device: str,
    flops: float,
    peak_flops: dict[str, float | None],
    args: argparse.Namespace,
) -> None:
    """One row per (variant, batch); variants interleaved round by round at each batch size."""
    cuda = device == "cuda"
    max_rounds = args.cuda_rounds if cuda else args.rounds
    scale = 1e12 if cuda else 1e9
    for batch in batches:
        x = torch.randn(batch, 3, config.input_height, config.input_width, device=device)
        warm: dict[str, Warm] = {}
        failed: dict[str, str] = {}
        for variant in variants:
            logger.info("%s batch %d: %s, set-up and warm-up", device, batch, variant.name)
            try:
                warm[variant.name] = _warm_up(variant, x, cuda)
            except Exception as exc:  # a variant that cannot run here is reported, not fatal
                logger.warning("%s batch %d: %s failed: %s", device, batch, variant.name, exc)
                failed[variant.name] = _error(exc)
        rounds = rounds_within(args.budget_s, sum(w.warm_s for w in warm.values()), args.min_rounds, max_rounds)
        logger.info("%s batch %d: %d interleaved rounds", device, batch, rounds)
        times = interleaved_rounds({name: w.call for name, w in warm.items()}, rounds)
        reference = times.get(variants[0].name)
        for variant in variants:
            if variant.name in failed:
                table.add(variant.name, batch, failed[variant.name], *[None] * (len(table.columns) - 3))
                continue
            latency = median(times[variant.name])
            throughput = batch / latency
            achieved = flops * throughput
            peak = peak_flops.get(variant.precision)
            table.add(
                variant.name,
                batch,
                latency * 1e3,
                throughput,
                paired_ratio(reference, times[variant.name]) if reference else None,
                achieved / scale,
                100 * achieved / peak if peak else None,
                mib(warm[variant.name].memory),
                warm[variant.name].first_s,
                rounds,
            )
        del warm, times, x
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


COLUMNS = [
    "variant",
    "batch",
    "latency ms (median)",
    "images/s",
    "x eager fp32 (paired)",
    "{unit}FLOP/s",
    "% of peak",
    "peak memory MiB",
    "set-up + first call s",
    "rounds",
]


def _columns(unit: str) -> list[str]:
    return [c.format(unit=unit) for c in COLUMNS]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.networks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", default="extractor", choices=NETS, help="extractor or the U-Net mask generator")
    parser.add_argument("--backbone", default="resnet50", help="extractor trunk: resnet50, resnet18, mobilenet_v2")
    parser.add_argument("--input-size", default="224x112", help="HxW of the input (the paper's 224x112)")
    parser.add_argument("--unet-width", type=int, default=32, help="U-Net base width (the paper's 32)")
    parser.add_argument("--unet-levels", type=int, default=5, help="U-Net resolution levels (the paper's 5)")
    parser.add_argument(
        "--batches", type=int_list, default=[1, 8, 32, 128], help="batch sizes on CUDA (default %(default)s)"
    )
    parser.add_argument(
        "--cpu-batches",
        type=int_list,
        default=None,
        help="batch sizes on the CPU (default: --batches for the extractor, 1,8,32 for the mask generator, "
        "whose batch of 128 takes minutes a call on two cores)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="most interleaved timing rounds per batch size (CPU)")
    parser.add_argument(
        "--cuda-rounds", type=int, default=30, help="most interleaved timing rounds per batch size on CUDA"
    )
    parser.add_argument("--min-rounds", type=int, default=3, help="fewest rounds, however long they take")
    parser.add_argument(
        "--budget-s", type=float, default=20.0, help="seconds of timing rounds per batch size (within the bounds)"
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated substrings of variant names to leave out, e.g. compile,ONNX"
    )
    parser.add_argument("--no-cuda", action="store_true", help="measure the CPU only, even where CUDA is present")
    parser.add_argument(
        "--cpu-peak-gflops",
        type=float,
        default=None,
        help="the CPU's FP32 peak, GFLOP/s (default: an estimate, min(threads, cores) x nominal clock x 32 FLOP/cycle)",
    )
    add_common_args(parser)
    return parser


def _skip(variants: list[Variant], skip: list[str]) -> list[Variant]:
    """Leave out the named variants, never the reference (the first)."""
    return variants[:1] + [v for v in variants[1:] if not any(s.lower() in v.name.lower() for s in skip)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = setup(args)
    started = time.time()
    height, width = (int(v) for v in args.input_size.lower().split("x"))
    config = ModelConfig(
        backbone=args.backbone,
        input_height=height,
        input_width=width,
        unet_base_width=args.unet_width,
        unet_levels=args.unet_levels,
    )
    module = build_network(args.net, config)
    flops = flops_per_image(module, config)
    params = sum(p.numel() for p in module.parameters())
    label = (
        f"{args.backbone} extractor" if args.net == "extractor" else f"U-Net mask generator (base {args.unet_width})"
    )
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    cpu_batches = args.cpu_batches or (
        args.batches if args.net == "extractor" else [b for b in args.batches if b <= 32] or [min(args.batches)]
    )
    common_notes = [
        f"{label} at {height}x{width}: {flops / 2e9:.2f} GMAC per image (torch.utils.flop_counter), "
        f"{params / 1e6:.1f} M parameters; random weights, random inputs already on the device.",
        "latency: median time of one call at that batch; x eager fp32: median over rounds of the reference's "
        "time / the variant's, each round running every variant once in turn (> 1 is faster).",
    ]

    cpu_peak = args.cpu_peak_gflops * 1e9 if args.cpu_peak_gflops else (cpu_peak_gflops() or 0) * 1e9 or None
    cpu_table = Table(f"{label}, CPU", _columns("G"), notes=list(common_notes))
    used = min(torch.get_num_threads(), cpu_cores())
    if args.cpu_peak_gflops:
        peak_note = f"% of peak: against the given {cpu_peak / 1e9:.0f} GFLOP/s"
    elif cpu_peak:
        peak_note = (
            f"% of peak: against {cpu_peak / 1e9:.0f} GFLOP/s FP32, an estimate for {used} core(s): nominal clock x "
            "32 FLOP/cycle; cores boosting above the nominal clock can pass it"
        )
    else:
        peak_note = "% of peak: n/a (no clock in /proc/cpuinfo; give --cpu-peak-gflops)"
    cpu_table.notes += [
        f"{peak_note}.",
        "peak memory: the process's peak resident set during one warm call above the set before it (ONNX Runtime: "
        "its session's first run, which grows its arena); set-up + first call includes torch.compile's "
        "compilation (from inductor's on-disk cache when an earlier run filled it) and the ONNX session.",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-networks-") as tmp:
        variants = _skip(cpu_variants(args.net, module, config, Path(tmp)), skip)
        measure(cpu_table, variants, cpu_batches, config, "cpu", flops, {"fp32": cpu_peak}, args)

    cuda_table = Table(f"{label}, CUDA", _columns("T"), notes=list(common_notes))
    if torch.cuda.is_available() and not args.no_cuda:
        peaks = {p: (gpu_peak_tflops(p) or 0) * 1e12 or None for p in ("fp32", "bf16", "fp16")}
        cuda_table.notes += [
            f"% of peak: against the dense peak of {torch.cuda.get_device_name(0)} from NVIDIA's data sheet "
            f"(fp32 rows: {'TF32, which cuDNN uses by default' if conv_uses_tf32() else 'FP32'}); "
            "n/a for a GPU not in bench/common.py's table.",
            "peak memory: torch.cuda.max_memory_allocated during set-up and two calls, above the allocation before "
            "(CUDA graph pools and static buffers included). CUDA graph calls copy the batch into the graph's "
            "static input first.",
        ]
        measure(cuda_table, _skip(cuda_variants(module), skip), args.batches, config, "cuda", flops, peaks, args)
    else:
        reason = NO_CUDA if not torch.cuda.is_available() else "n/a (--no-cuda)"
        for name in CUDA_VARIANT_NAMES:
            cuda_table.add(name, "all", reason, *[None] * (len(COLUMNS) - 3))
    title = "Extractor throughput" if args.net == "extractor" else "Mask generator throughput"
    report(title, "bench.networks", [cpu_table, cuda_table], started, results, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
