"""Choosing a backend: build the kind asked for (or, under ``auto``, every candidate), check its parity with fp32
PyTorch, and under ``auto`` time the ones that pass at batch 1 and serve the fastest.

Caches, in ``cache_dir`` (the data folder's ``onnx/``), one set per weights fingerprint:
``<role>-<fingerprint>.onnx`` (fp32, also what OpenVINO fp32 / bf16 compile), ``<role>-<fingerprint>-int8.onnx``
(ONNX Runtime INT8) and ``<role>-<fingerprint>-openvino-int8.onnx`` (NNCF INT8)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from app.backends import onnx, openvino
from app.backends.base import INT8_KINDS, KINDS, Backend, BackendError, is_reduced_precision
from app.backends.crops import MASK_CHECK_CROPS, ReferenceCrops
from app.backends.parity import (
    MIN_COSINE,
    MIN_COSINE_REDUCED,
    MIN_NN_AGREEMENT,
    Parity,
    check_parity,
    parity_batch,
    reference_outputs,
)
from app.backends.pytorch import TorchBackend, autocast_dtype
from models import ModelConfig

logger = logging.getLogger(__name__)

TIMING_CALLS = 10  # auto's start-up timing: at most this many batch-1 calls per candidate ...
TIMING_BUDGET_S = 1.0  # ... or this long, whichever ends first (after two untimed calls)
# A later candidate displaces an earlier one only when this much faster: two runtimes within the timing's noise
# would otherwise trade places from one start to the next, and the served templates with them.
AUTO_MARGIN = 0.10


@dataclass
class Selection:
    """What serves one network, and why: its parity figures, and under ``auto`` every candidate's batch-1 time
    and the reason each refused one was refused."""

    backend: Backend
    kind: str
    parity: Parity | None = None  # None: the fp32 PyTorch reference itself
    timings_ms: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.backend.name,
            "kind": self.kind,
            "parity": None if self.parity is None else self.parity.as_dict(),
            "auto_timings_ms": {k: round(v, 2) for k, v in self.timings_ms.items()},
            "refused": self.refused,
        }


def resolve_backend(kind: str, device: torch.device) -> str:
    """Validate ``kind``; ``auto`` stays ``auto`` on a CPU and means ``torch`` on CUDA."""
    if kind not in ("auto", *KINDS):
        raise ValueError(f"unknown backend {kind!r}; choose auto, {', '.join(KINDS)}")
    if kind == "auto" and device.type == "cuda":
        return "torch"
    return kind


def _graph_path(cache_dir: Path, role: str, fingerprint: str, suffix: str = ".onnx") -> Path:
    return cache_dir / f"{role}-{fingerprint}{suffix}"


def build(
    kind: str,
    module: nn.Module,
    role: str,
    config: ModelConfig,
    fingerprint: str,
    cache_dir: Path,
    crops: ReferenceCrops | None,
    *,
    dtype: str = "auto",
    graph_batches: Sequence[int] = (),
) -> Backend:
    """The backend of ``kind`` (not yet checked); its graphs exported or quantised into ``cache_dir`` when absent."""
    device = next(module.parameters()).device
    size = (config.input_height, config.input_width)
    fp32_path = _graph_path(cache_dir, role, fingerprint)
    if kind == "torch":
        cast = autocast_dtype(dtype, device)
        return TorchBackend(module, device, cast, channels_last=device.type == "cuda", graph_batches=graph_batches)
    if kind == "onnxruntime":
        return onnx.cached_fp32(module, role, size, fp32_path, device)
    if kind in ("openvino", "openvino-bf16"):
        precision = "f32" if kind == "openvino" else "bf16"
        graph = onnx.fp32_graph(module, role, size, fp32_path)
        return openvino.OpenVinoBackend(graph, precision, precision.replace("f32", "fp32"))
    if kind in INT8_KINDS:
        if crops is None:
            raise BackendError(
                "INT8 needs real crops to calibrate on: set REID_CALIBRATION_DIR to a folder of crops, or enrol some "
                "and restart (the gallery's stored crops are read at start-up)"
            )
        suffix, _, load = INT8[kind]
        path = _graph_path(cache_dir, role, fingerprint, suffix)
        if path.exists():
            try:
                return load(path, device)
            except BackendError as exc:  # a cached graph that no longer loads: quantised again
                logger.warning("%s; quantising it again", exc)
                path.unlink()
        _quantise(kind, onnx.fp32_graph(module, role, size, fp32_path), path, crops, role)
        return load(path, device)
    raise ValueError(f"unknown backend {kind!r}")


# INT8 kind -> (cached graph's suffix, the quantiser, what serves the graph)
INT8: dict[str, tuple[str, Callable[..., Path], Callable[[Path, torch.device], Backend]]] = {
    "onnxruntime-int8": (
        "-int8.onnx",
        onnx.quantize_int8,
        lambda path, device: onnx.OnnxBackend(path, device, "int8 (static QDQ, per-channel)"),
    ),
    "openvino-int8": (
        "-openvino-int8.onnx",
        openvino.quantize_int8,
        lambda path, device: openvino.OpenVinoBackend(path, "f32", "int8 (NNCF)"),
    ),
}


def _quantise(kind: str, fp32: Path, path: Path, crops: ReferenceCrops, role: str) -> None:
    """``kind``'s INT8 graph of ``fp32`` at ``path``, calibrated on ``crops`` (once per weights: it is cached)."""
    try:
        INT8[kind][1](fp32, path, crops.calibration, role)
    except BackendError:
        raise
    except Exception as exc:  # the quantisers raise their own types; the start-up log must say which failed
        raise BackendError(f"{kind} quantisation of the {role} failed: {type(exc).__name__}: {exc}") from exc


def _reduced(kind: str, device: torch.device, dtype: str) -> bool:
    if kind == "torch":
        return autocast_dtype(dtype, device) is not None
    return is_reduced_precision(kind)


def batch1_ms(backend: Backend, x: torch.Tensor) -> float:
    """Median milliseconds of one batch-1 call, after two untimed calls (arenas, kernel choice)."""
    backend(x)
    backend(x)
    times: list[float] = []
    deadline = time.perf_counter() + TIMING_BUDGET_S
    while len(times) < TIMING_CALLS and (not times or time.perf_counter() < deadline):
        start = time.perf_counter()
        backend(x)
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def fastest(timings_ms: dict[str, float], margin: float = AUTO_MARGIN) -> str:
    """The candidate ``auto`` serves: in the candidates' order, each displaces the one chosen so far only when it
    is faster by more than ``margin`` (a share of the chosen one's time)."""
    names = iter(timings_ms)
    best = next(names)
    for name in names:
        if timings_ms[name] < (1 - margin) * timings_ms[best]:
            best = name
    return best


def select_backend(
    kind: str,
    module: nn.Module,
    role: str,
    config: ModelConfig,
    fingerprint: str,
    cache_dir: Path,
    *,
    crops: ReferenceCrops | None = None,
    candidates: Sequence[str] = KINDS,
    dtype: str = "auto",
    graph_batches: Sequence[int] = (),
    min_cosine_reduced: float = MIN_COSINE_REDUCED,
    min_nn_agreement: float = MIN_NN_AGREEMENT,
) -> Selection:
    """The backend of ``kind`` for ``module`` (``role``: extractor or mask_generator), checked for parity.

    A named kind that is refused raises BackendError with the figures. ``auto`` on a CPU builds and checks each of
    ``candidates``, times the ones that pass at batch 1 and serves the fastest (``fastest``); it falls back to the
    fp32 PyTorch reference (with a warning) when none passes. Reduced-precision kinds are only checked on real
    crops."""
    device = next(module.parameters()).device
    chosen = resolve_backend(kind, device)
    templates = role == "extractor"
    if crops is not None:
        inputs = crops.check if templates else crops.check[:MASK_CHECK_CROPS]
        check_set = crops.source if templates else f"{len(inputs)} of the {crops.source}"
    else:
        inputs, check_set = parity_batch(config), None
    expected: np.ndarray | None = None

    def checked(name: str) -> tuple[Backend, Parity]:
        nonlocal expected
        reduced = _reduced(name, device, dtype)
        if reduced and crops is None and device.type != "cuda":
            raise BackendError(
                f"{name} is reduced precision and is only served once checked on real crops: set "
                "REID_CALIBRATION_DIR, or enrol crops and restart"
            )
        backend = build(
            name, module, role, config, fingerprint, cache_dir, crops, dtype=dtype, graph_batches=graph_batches
        )
        if expected is None:
            expected = reference_outputs(module, inputs)
        parity = check_parity(
            expected,
            backend,
            inputs,
            min_cosine=min_cosine_reduced if reduced else MIN_COSINE,
            min_nn_agreement=min_nn_agreement,
            templates=templates,
            check_set=check_set,
        )
        if not parity.ok:
            raise BackendError(f"the {role}'s backend is refused, it drifts from fp32 PyTorch: {parity.describe()}")
        logger.info("%s backend %s", role, parity.describe())
        return backend, parity

    if chosen != "auto":
        if chosen == "torch" and device.type != "cuda":
            return Selection(TorchBackend(module, device), "torch")  # the fp32 reference itself: nothing to check
        try:
            backend, parity = checked(chosen)
        except BackendError as exc:
            if kind != "auto":
                raise
            logger.warning("%s; serving the %s with fp32 PyTorch instead", exc, role)
            return Selection(TorchBackend(module, device), "torch", refused={chosen: str(exc)})
        return Selection(backend, chosen, parity)

    passed: dict[str, tuple[Backend, Parity]] = {}
    selection = Selection(TorchBackend(module, device), "torch")
    x1 = inputs[:1]
    for name in candidates:
        if name == "torch":
            continue  # the fallback below, not a candidate: the CPU reference is never the fastest measured
        try:
            passed[name] = checked(name)
            selection.timings_ms[name] = batch1_ms(passed[name][0], x1)
        except BackendError as exc:
            selection.refused[name] = str(exc)
            logger.warning("auto: %s for the %s is not a candidate: %s", name, role, exc)
    if not passed:
        logger.warning("auto: no backend passed for the %s; serving it with fp32 PyTorch", role)
        return selection
    best = fastest(selection.timings_ms)
    selection.backend, selection.parity = passed[best]
    selection.kind = best
    timings = ", ".join(
        f"{name} {ms:.2f} ms" for name, ms in sorted(selection.timings_ms.items(), key=lambda kv: kv[1])
    )
    logger.info("auto: serving the %s with %s (batch 1: %s)", role, selection.backend.name, timings)
    return selection


def load_backend(
    kind: str,
    module: nn.Module,
    role: str,
    config: ModelConfig,
    fingerprint: str,
    cache_dir: Path,
    **kwargs: Any,
) -> Backend:
    """``select_backend(...).backend``: the serving backend alone."""
    return select_backend(kind, module, role, config, fingerprint, cache_dir, **kwargs).backend
