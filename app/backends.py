"""Inference backends: one network (the extractor or the mask generator) behind one call, ``backend(x)`` with
``x`` a preprocessed (B, 3, H, W) float32 batch on the CPU and a float32 NumPy answer.

- ``torch``: PyTorch on the service's device. On CUDA it runs under bf16 (or fp16) autocast, channels_last,
  and replays a CUDA graph captured per batch-size bucket (a batch is padded up to its bucket).
- ``onnxruntime``: a graph exported from the weights at first start and cached in the data folder under the
  weights' fingerprint; the CPU provider, or CUDA / TensorRT where they are installed and the device is CUDA.
- ``auto``: ONNX Runtime on a CPU (bench/networks.py measured it 1.5-2x eager there), PyTorch on CUDA.

Every backend but the fp32 reference itself is checked at load against fp32 PyTorch on a fixed batch: each
output's cosine with the reference must be at least ``MIN_COSINE``, or the backend is refused with the figures.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from models import ModelConfig

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime")
MIN_COSINE = 0.999  # per template (per mask, flattened) against fp32 PyTorch on the parity batch
PARITY_BATCH = 4
ONNX_OPSET = 17


class BackendError(ValueError):
    """A backend that cannot serve: not installed, or refused by the parity check (the message has the figures)."""


class Backend(Protocol):
    name: str  # e.g. "onnxruntime CPUExecutionProvider", "torch cuda bf16 channels_last graphs 1,8,32"

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) float32 on the CPU -> the network's output as float32 NumPy, B first."""
        ...


# -- PyTorch ---------------------------------------------------------------------------------------------------


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """``auto`` | ``bf16`` | ``fp16`` | ``fp32`` -> the CUDA autocast dtype (None: fp32). On the CPU always None:
    CPU autocast is slower than fp32 on the machines this project measured."""
    if device.type != "cuda" or name == "fp32":
        return None
    if name == "fp16":
        return torch.float16
    if name == "bf16" or (name == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def bucket_for(batch: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds ``batch``, or None when it is larger than every bucket (then it runs
    without a graph). Buckets need not be sorted."""
    fitting = [b for b in buckets if b >= batch]
    return min(fitting) if fitting else None


class TorchBackend:
    """``module`` on its device. On CUDA: autocast ``dtype``, channels_last, and one CUDA graph per bucket of
    ``graph_batches`` captured on first use (graphs need static shapes: a batch is zero-padded to its bucket)."""

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
        graph_batches: Sequence[int] = (),
    ) -> None:
        self.device = device
        self.dtype = dtype if device.type == "cuda" else None
        self.channels_last = channels_last and device.type == "cuda"
        self.graph_batches = tuple(graph_batches) if device.type == "cuda" else ()
        self.module = module.to(memory_format=torch.channels_last) if self.channels_last else module
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()  # one forward at a time: CUDA graphs share static buffers
        parts = [f"torch {device.type}", {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]]
        if self.channels_last:
            parts.append("channels_last")
        if self.graph_batches:
            parts.append("CUDA graphs " + ",".join(map(str, sorted(self.graph_batches))))
        self.name = " ".join(parts)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=self.dtype, enabled=self.dtype is not None, cache_enabled=False):
            return self.module(x)

    def _graph(self, bucket: int, shape: tuple[int, ...]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """Capture the forward pass at ``bucket`` images (torch.cuda.graphs' recipe: warm up on a side stream)."""
        if bucket not in self._graphs:
            static_x = torch.zeros((bucket, *shape[1:]), device=self.device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._forward(static_x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._forward(static_x)
            self._graphs[bucket] = (graph, static_x, static_out)
            logger.info("%s: CUDA graph captured for batches up to %d", self.name, bucket)
        return self._graphs[bucket]

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        n = len(x)
        with self._lock, torch.inference_mode():
            bucket = bucket_for(n, self.graph_batches) if self.graph_batches else None
            if bucket is None:
                out = self._forward(x.to(self.device, non_blocking=True))
            else:
                graph, static_x, static_out = self._graph(bucket, tuple(x.shape))
                static_x.zero_()
                static_x[:n].copy_(x, non_blocking=True)
                graph.replay()
                out = static_out[:n]
            return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)


# -- ONNX Runtime ----------------------------------------------------------------------------------------------


def export_onnx(module: nn.Module, path: Path, config: ModelConfig, output_name: str) -> Path:
    """``module`` (fp32, eval) as an ONNX graph with a dynamic batch, written atomically to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    device = next(module.parameters()).device
    example = torch.randn(2, 3, config.input_height, config.input_width, device=device)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about Python-side shape checks
            torch.onnx.export(
                module,
                (example,),
                tmp,
                input_names=["images"],
                output_names=[output_name],
                dynamic_axes={"images": {0: "batch"}, output_name: {0: "batch"}},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def onnx_providers(device: torch.device) -> list[str]:
    """ONNX Runtime's execution providers for ``device``, best first: TensorRT and CUDA where installed."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    wanted = ["CPUExecutionProvider"]
    if device.type == "cuda":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", *wanted]
    return [p for p in wanted if p in available]


class OnnxBackend:
    """An ONNX Runtime session over a graph file. Its threads do not spin after a run, so that they leave the
    cores to the request handling (bench/networks.py: spinning took the cores from whatever ran next)."""

    def __init__(self, path: Path, device: torch.device) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise BackendError(
                "REID_BACKEND=onnxruntime but onnxruntime is not installed (pip install onnxruntime)"
            ) from exc
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = onnx_providers(device)
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
            raise BackendError(f"ONNX graph {path} cannot be loaded: {exc}") from exc
        self.path = path
        self.input = self.session.get_inputs()[0].name
        self.name = f"onnxruntime {self.session.get_providers()[0]}"

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        out = self.session.run(None, {self.input: x.detach().cpu().numpy()})[0]
        return np.ascontiguousarray(out, dtype=np.float32)


# -- choosing, and the parity check ---------------------------------------------------------------------------


def parity_batch(config: ModelConfig) -> torch.Tensor:
    """The fixed batch every backend is checked on: seeded normal noise at the network's input size (what the
    preprocessing gives: ImageNet-normalised pixels are roughly standard normal)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(PARITY_BATCH, 3, config.input_height, config.input_width, generator=generator)


def cosines(reference: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per-sample cosine similarity of two (B, ...) outputs, each sample flattened."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = got.reshape(len(got), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(1)
    # Two all-zero outputs agree; one zero and one not do not.
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    return np.where(both_zero, 1.0, dots / np.maximum(norms, 1e-30))


@dataclass(frozen=True)
class Parity:
    backend: str
    cosines: tuple[float, ...]  # per template of the parity batch
    max_abs_difference: float

    @property
    def ok(self) -> bool:
        return min(self.cosines) >= MIN_COSINE

    def describe(self) -> str:
        return (
            f"{self.backend}: cosine with fp32 PyTorch min {min(self.cosines):.6f} over {len(self.cosines)} "
            f"templates (need >= {MIN_COSINE}), max |difference| {self.max_abs_difference:.3g}"
        )


def check_parity(reference: nn.Module, backend: Backend, config: ModelConfig) -> Parity:
    """``backend`` against fp32 PyTorch (``reference``, on its own device) on the fixed batch."""
    x = parity_batch(config)
    device = next(reference.parameters()).device
    with torch.inference_mode():
        expected = reference(x.to(device)).float().cpu().numpy()
    got = backend(x)
    if got.shape != expected.shape:
        return Parity(backend.name, (float("-inf"),) * len(x), float("inf"))
    return Parity(backend.name, tuple(float(c) for c in cosines(expected, got)), float(np.abs(got - expected).max()))


def resolve_backend(kind: str, device: torch.device) -> str:
    """``auto`` -> ``onnxruntime`` on a CPU where it is installed, else ``torch``."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose {', '.join(BACKENDS)}")
    if kind != "auto":
        return kind
    if device.type == "cuda":
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        logger.warning("onnxruntime is not installed: serving with PyTorch eager, the slower CPU path")
        return "torch"
    return "onnxruntime"


def _cached_onnx(module: nn.Module, role: str, config: ModelConfig, path: Path, device: torch.device) -> OnnxBackend:
    """The cached graph at ``path``; exported when absent, and again when the file cannot be loaded."""
    if path.exists():
        try:
            return OnnxBackend(path, device)
        except BackendError as exc:
            logger.warning("%s; exporting it again", exc)
    logger.info("exporting the %s to ONNX: %s (once for these weights)", role, path)
    try:
        export_onnx(module, path, config, "features" if role == "extractor" else "mask")
    except Exception as exc:  # a read-only data folder, an operator the exporter lacks, ...
        raise BackendError(f"exporting the {role} to ONNX at {path} failed: {exc}") from exc
    return OnnxBackend(path, device)


def load_backend(
    kind: str,
    module: nn.Module,
    role: str,
    config: ModelConfig,
    fingerprint: str,
    cache_dir: Path,
    *,
    dtype: str = "auto",
    graph_batches: Sequence[int] = (),
) -> Backend:
    """The backend of ``kind`` for ``module`` (``role``: extractor or mask_generator), checked for parity.

    ONNX graphs are cached as ``cache_dir/<role>-<fingerprint>.onnx``: the same weights reuse their graph,
    other weights get their own. ``auto`` falls back to the fp32 PyTorch reference (with a warning) when its
    choice is refused; an explicitly named backend that is refused raises BackendError with the figures."""
    device = next(module.parameters()).device
    chosen = resolve_backend(kind, device)
    try:
        backend: Backend
        if chosen == "onnxruntime":
            backend = _cached_onnx(module, role, config, cache_dir / f"{role}-{fingerprint}.onnx", device)
        else:
            cast = autocast_dtype(dtype, device)
            backend = TorchBackend(
                module, device, cast, channels_last=device.type == "cuda", graph_batches=graph_batches
            )
            if device.type != "cuda":
                return backend  # the fp32 reference itself: nothing to check
        parity = check_parity(module, backend, config)
        if not parity.ok:
            raise BackendError(f"the {role}'s backend is refused, it drifts from fp32 PyTorch: {parity.describe()}")
        logger.info("%s backend %s", role, parity.describe())
        return backend
    except BackendError as exc:
        if kind != "auto":
            raise
        logger.warning("%s; serving the %s with fp32 PyTorch instead", exc, role)
        return TorchBackend(module, device)
