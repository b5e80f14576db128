"""One prepared check of every CUDA path, for whenever a GPU machine is lent: under 8 minutes on one GPU.

    python -m bench.gpu                                  # everything, ResNet-50 at 224x112, random weights
    python -m bench.gpu --weights model.safetensors --crops /data/crops   # trained weights, real check crops

Sections (``--sections``, all by default):
- ``backends``: the extractor and the mask generator behind each CUDA backend: eager fp32 (the reference), the
  service's torch backend (autocast bf16 and fp16, channels_last, CUDA graphs per batch bucket),
  ``torch.compile`` (reduce-overhead, bf16), ONNX Runtime's CUDA and TensorRT providers where installed. Each
  with its parity (``app.backends.check_parity``: cosine with fp32, and the nearest-neighbour agreement on real
  crops) and images/s at batch 1, 8 and 32.
- ``faiss``: the service's index (``app.index.VectorIndex``) on the GPU over 1e6 512-d templates, Flat and IVF:
  queries/s one at a time and in a batch, and the same top-10 as on the CPU.
- ``training``: a few steps of each training stage (``training.engine.training_step``) with AMP.
Every row has the peak GPU memory of its section's work (PyTorch's allocator; ONNX Runtime's own arena is not in
it). A row that fails says why and the others go on. One table, printed and appended to bench/RESULTS.md.

``--device cpu`` runs the same code at whatever sizes are given, CUDA-only rows reading "n/a (no CUDA)": the
tests use it on machines without a GPU.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.backends import Backend, OnnxBackend, TorchBackend, check_parity, reference_crops
from app.backends.onnx import fp32_graph
from app.backends.parity import MIN_COSINE, MIN_COSINE_REDUCED, reference_outputs
from bench.common import Table, add_common_args, int_list, median, report, setup
from models import ModelConfig, build_extractor, build_mask_generator, load_weights

logger = logging.getLogger("bench.gpu")

SECTIONS = ("backends", "faiss", "training")
SKIPPABLE = ("compile", "onnxruntime", "tensorrt")
NO_CUDA = "n/a (no CUDA)"


@dataclass
class Row:
    section: str
    variant: str
    batch: int | str
    rate: float | None
    unit: str
    parity: str = ""
    peak_mib: float | None = None
    status: str = "ok"


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _error(exc: BaseException) -> str:
    return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def _seconds_per_call(call: Callable[[], Any], calls: int) -> float:
    call()
    call()  # the first calls pay for capture, compilation, arenas
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return median(times)


# -- backends ----------------------------------------------------------------------------------------------


class CompiledBackend:
    """``torch.compile`` of the network; on CUDA in reduce-overhead mode (CUDA graphs) under bf16 autocast."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.fn = torch.compile(module, mode="reduce-overhead" if self.cuda else None)
        self.name = "torch.compile reduce-overhead bf16" if self.cuda else "torch.compile fp32"

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda):
            if self.cuda:
                torch.compiler.cudagraph_mark_step_begin()
            return self.fn(x.to(self.device)).float().cpu().numpy()


def backend_variants(
    module: nn.Module, role: str, config: ModelConfig, device: torch.device, graph: Callable[[], Path], skip: list[str]
) -> dict[str, Callable[[], Backend] | str]:
    """Name -> a builder of the backend, or the reason it is not run here."""
    cuda = device.type == "cuda"
    buckets = (1, 8, 32)

    def torch_backend(dtype: torch.dtype | None) -> Callable[[], Backend]:
        return lambda: TorchBackend(module, device, dtype, channels_last=True, graph_batches=buckets)

    def onnx(provider: str) -> Callable[[], Backend] | str:
        import onnxruntime

        if provider not in onnxruntime.get_available_providers():
            return f"n/a ({provider} not in this onnxruntime)"
        return lambda: OnnxBackend(graph(), device, providers=[provider, "CPUExecutionProvider"])

    variants: dict[str, Callable[[], Backend] | str] = {
        "eager fp32 (the reference)": lambda: TorchBackend(module, device)
    }
    variants["torch autocast bf16 + channels_last + CUDA graphs"] = torch_backend(torch.bfloat16) if cuda else NO_CUDA
    variants["torch autocast fp16 + channels_last + CUDA graphs"] = torch_backend(torch.float16) if cuda else NO_CUDA
    variants["torch.compile"] = (
        "skipped (--skip compile)" if "compile" in skip else lambda: CompiledBackend(module, device)
    )
    cuda_provider = onnx("CUDAExecutionProvider") if cuda else NO_CUDA
    trt_provider = onnx("TensorrtExecutionProvider") if cuda else NO_CUDA
    variants["onnxruntime CUDA"] = "skipped (--skip onnxruntime)" if "onnxruntime" in skip else cuda_provider
    variants["onnxruntime TensorRT"] = "skipped (--skip tensorrt)" if "tensorrt" in skip else trt_provider
    return variants


def backend_rows(
    module: nn.Module, role: str, config: ModelConfig, inputs: torch.Tensor, check_set: str | None, args: Any, tmp: Path
) -> list[Row]:
    device = next(module.parameters()).device
    path = tmp / f"{role}.onnx"
    graph = lambda: fp32_graph(module, role, (config.input_height, config.input_width), path)  # noqa: E731
    expected = reference_outputs(module, inputs)
    rows = []
    for name, make in backend_variants(module, role, config, device, graph, args.skip).items():
        section = f"backends: {role}"
        if isinstance(make, str):
            rows.append(Row(section, name, "", None, "images/s", status=make))
            continue
        logger.info("%s: %s", role, name)
        try:
            _peak_reset(device)
            backend = make()
            reduced = "autocast" in name or ("compile" in name and device.type == "cuda")
            parity = check_parity(
                expected,
                backend,
                inputs,
                min_cosine=MIN_COSINE_REDUCED if reduced else MIN_COSINE,
                templates=role == "extractor",
                check_set=check_set,
            )
            figures = f"{'pass' if parity.ok else 'FAIL'}: cos {min(parity.cosines):.4f}"
            if parity.nn_agreement is not None:
                figures += f", NN {100 * parity.nn_agreement:.0f}%"
            for batch in args.batches:
                x = inputs[torch.arange(batch) % len(inputs)]
                seconds = _seconds_per_call(lambda b=backend, x=x: b(x), args.calls)
                rows.append(Row(section, backend.name, batch, batch / seconds, "images/s", figures, _peak_mib(device)))
        except Exception as exc:  # a provider that will not build, a capture that fails: a row, not a crash
            logger.exception("%s %s failed", role, name)
            rows.append(Row(section, name, "", None, "images/s", status=_error(exc)))
    return rows


# -- FAISS -------------------------------------------------------------------------------------------------


def faiss_rows(args: Any, device: torch.device) -> list[Row]:
    import faiss

    from app.index import VectorIndex

    if device.type == "cuda" and not hasattr(faiss, "StandardGpuResources"):
        return [
            Row("faiss", "GPU index", "", None, "queries/s", status="n/a (faiss-cpu installed: pip install .[gpu])")
        ]
    rng = np.random.default_rng(0)
    n, dim = args.faiss_size, 512
    logger.info("faiss: %d random %d-d templates", n, dim)
    data = rng.standard_normal((n, dim), dtype=np.float32)
    ids = np.arange(n, dtype=np.int64)
    queries = data[rng.choice(n, args.faiss_queries, replace=False)] + 0.1 * rng.standard_normal(
        (args.faiss_queries, dim), dtype=np.float32
    )
    rows = []
    for factory in args.faiss_factories:
        try:
            _peak_reset(device)
            start = time.perf_counter()
            gpu = VectorIndex.build(dim, factory, ids, data, use_gpu=device.type == "cuda")
            gpu.search(queries[:1], 10)  # the GPU copy is made at the first search
            built = time.perf_counter() - start
            where = "GPU" if gpu.use_gpu else "CPU"
            batch_s = _seconds_per_call(lambda g=gpu: g.search(queries, 10), 3)
            one_s = _seconds_per_call(lambda g=gpu: g.search(queries[:1], 10), 20)
            cpu = VectorIndex.build(dim, factory, ids, data, use_gpu=False) if gpu.use_gpu else gpu
            few = queries[:20]
            same = sum(set(a) == set(b) for a, b in zip(gpu.search(few, 10)[1], cpu.search(few, 10)[1], strict=True))
            note = f"built + copied in {built:.1f} s; same top-10 as the CPU for {same} of {len(few)}"
            rows.append(Row("faiss", f"{factory} on the {where}, {n:.0e}", 1, 1 / one_s, "queries/s", "", None, note))
            rows.append(
                Row("faiss", f"{factory} on the {where}, {n:.0e}", len(queries), len(queries) / batch_s, "queries/s",
                    "", _peak_mib(device), note)
            )  # fmt: skip
        except Exception as exc:
            logger.exception("faiss %s failed", factory)
            rows.append(Row("faiss", factory, "", None, "queries/s", status=_error(exc)))
    return rows


# -- training ----------------------------------------------------------------------------------------------


def training_rows(args: Any, device: torch.device, config: ModelConfig, tmp: Path) -> list[Row]:
    from training.config import TrainConfig
    from training.engine import build_networks, set_stage_modes, training_step

    amp = args.amp if device.type == "cuda" else "none"
    train = TrainConfig(
        dataset="market1501", root=str(tmp), out=str(tmp / "run"), model=config, p=args.p, k=args.k,
        device=str(device), amp=amp, channels_last=device.type == "cuda",
    )  # fmt: skip
    pids = torch.arange(args.p).repeat_interleave(args.k)
    images = torch.randn(len(pids), 3, config.input_height, config.input_width)
    rows = []
    try:
        nets = build_networks(train, device, train_pids=list(range(args.p)))
    except Exception as exc:
        return [Row("training", "build", "", None, "images/s", status=_error(exc))]
    for stage in (1, 2, 3):
        try:
            _peak_reset(device)
            set_stage_modes(stage, nets, train.freeze_blocks)
            x, y = images.to(device), pids.to(device)

            def step(stage: int = stage, x: torch.Tensor = x, y: torch.Tensor = y) -> None:
                training_step(stage, x, y, nets, train, device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)

            seconds = _seconds_per_call(step, args.steps)
            note = f"{1e3 * seconds:.0f} ms a step, P x K = {args.p} x {args.k}"
            rows.append(Row("training", f"stage {stage}, amp {amp}", len(pids), len(pids) / seconds, "images/s", "",
                            _peak_mib(device), note))  # fmt: skip
        except Exception as exc:
            logger.exception("training stage %d failed", stage)
            rows.append(Row("training", f"stage {stage}", "", None, "images/s", status=_error(exc)))
    return rows


# -- main --------------------------------------------------------------------------------------------------


def _names(allowed: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown or text!r}; choose among {', '.join(allowed)}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the point of it) or cpu (the code path, for tests)")
    parser.add_argument("--sections", type=_names(SECTIONS, "section"), default=list(SECTIONS))
    parser.add_argument("--skip", type=_names(SKIPPABLE, "variant"), default=[], help="variants not to run")
    parser.add_argument("--weights", type=Path, default=None, help="a weights file (random ResNet-50 if unset)")
    parser.add_argument("--backbone", default="resnet50", help="extractor built when --weights is unset")
    parser.add_argument("--input-size", default="224x112", help="HxW when --weights is unset")
    parser.add_argument("--unet-width", type=int, default=64, help="U-Net base width when --weights is unset")
    parser.add_argument("--crops", type=Path, default=None, help="a folder of real crops: the parity check's set")
    parser.add_argument("--batches", type=int_list, default=[1, 8, 32], help="batch sizes of the backends")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per backend and batch (median)")
    parser.add_argument("--faiss-size", type=int, default=1_000_000, help="templates in the index")
    parser.add_argument("--faiss-queries", type=int, default=1000, help="queries of the batched search")
    parser.add_argument(
        "--faiss-factories", type=lambda t: [v for v in t.split(";") if v], default=["Flat", "IVF1000,Flat"],
        help="index factories, separated by ';' (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16"), help="training autocast on CUDA")
    parser.add_argument("--p", type=int, default=16, help="identities per training batch")
    parser.add_argument("--k", type=int, default=4, help="images per identity in a training batch")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per training stage (median)")
    add_common_args(parser)
    return parser


def _networks(args: Any, device: torch.device) -> tuple[ModelConfig, nn.Module, nn.Module | None]:
    if args.weights is not None:
        model = load_weights(args.weights, device)
        return model.config, model.extractor, model.mask_generator
    height, width = (int(v) for v in args.input_size.lower().split("x"))
    config = ModelConfig(
        backbone=args.backbone, input_height=height, input_width=width, unet_base_width=args.unet_width
    )
    torch.manual_seed(0)
    return config, build_extractor(config).to(device).eval(), build_mask_generator(config).to(device).eval()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, "bench.gpu: no CUDA device is visible here; run it on a GPU machine (--device cpu runs the "
                    "code path only)\n")  # fmt: skip
    if args.weights is not None and not args.weights.is_file():
        parser.exit(2, f"bench.gpu: --weights {args.weights} is not a file\n")
    if args.crops is not None and not args.crops.is_dir():
        parser.exit(2, f"bench.gpu: --crops {args.crops} is not a folder\n")
    results = setup(args)
    started = time.time()
    device = torch.device(args.device)
    rows: list[Row] = []
    config, extractor, mask_generator = _networks(args, device)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        if "backends" in args.sections:
            crops = reference_crops(args.crops, config) if args.crops is not None else None
            inputs = crops.check if crops else torch.randn(32, 3, config.input_height, config.input_width)
            check_set = crops.source if crops else None
            rows += backend_rows(extractor, "extractor", config, inputs, check_set, args, tmp)
            if mask_generator is not None:
                rows += backend_rows(mask_generator, "mask_generator", config, inputs[:8], None, args, tmp)
        if "faiss" in args.sections:
            rows += faiss_rows(args, device)
        if "training" in args.sections:
            rows += training_rows(args, device, config, tmp)
    table = Table("Every CUDA path", ["section", "variant", "batch", "rate", "unit", "parity", "peak MiB", "status"])
    for r in rows:
        table.add(r.section, r.variant, r.batch, r.rate, r.unit, r.parity, r.peak_mib, r.status)
    failed = [r for r in rows if r.status.startswith("failed")]
    table.notes += [
        f"{config.backbone} at {config.input_height}x{config.input_width}"
        f"{f' from {args.weights}' if args.weights else ', random weights'}, on {device}"
        f"{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}; parity on "
        f"{args.crops or 'seeded noise'}: pass = cosine >= {MIN_COSINE} (fp32) or {MIN_COSINE_REDUCED} (reduced "
        "precision), and on real crops the same nearest neighbour for >= 99%.",
        "Peak MiB: torch.cuda.max_memory_allocated over the row's section work (not ONNX Runtime's or FAISS's own).",
        f"{len(failed)} row(s) failed"
        + (": " + "; ".join(f"{r.section} {r.variant}" for r in failed) if failed else "."),
    ]
    report("Every CUDA path (bench.gpu)", "bench.gpu", [table], started, results, argv)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
