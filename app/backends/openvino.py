"""OpenVINO on the CPU: the cached fp32 ONNX graph compiled in fp32 or bf16, and an INT8 graph quantised by
NNCF (post-training, calibrated on real crops; its ONNX backend, so that the fp32 scope is named as for ONNX
Runtime) and cached beside it."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch

from app.backends.base import BackendError
from app.backends.int8_scope import fp32_nodes
from models.files import atomic_path
from models.onnx_export import INPUT_NAME

logger = logging.getLogger(__name__)


def _core():
    try:
        import openvino
    except ImportError as exc:
        raise BackendError("openvino is not installed (pip install openvino nncf)") from exc
    return openvino.Core()


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes in bf16 natively here (AVX-512 BF16 or AMX)."""
    try:
        return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except BackendError:
        return False


class OpenVinoBackend:
    """One compiled model on the CPU, called through one infer request (a lock keeps calls apart).

    ``precision`` is the plugin's inference precision for what is not INT8: ``f32``, or ``bf16``. It is always set,
    because on CPUs with AMX or AVX-512 BF16 the plugin's default is bf16, which would make "fp32" a lie."""

    def __init__(self, path: Path, precision: str, label: str) -> None:
        core = _core()
        if precision == "bf16" and not cpu_has_bf16():
            raise BackendError("this CPU has no native bf16 (AVX-512 BF16 or AMX): OpenVINO bf16 would be emulated")
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",  # one stream: the micro-batcher sends one batch at a time
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            # Unpinned: the service's own threads, replicas and other processes share these cores (pinned, two
            # processes bind to the same cores and each runs at half speed).
            "ENABLE_CPU_PINNING": False,
        }
        try:
            compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with the reason
            raise BackendError(f"OpenVINO cannot compile {path}: {exc}") from exc
        self.path = path
        self.request = compiled.create_infer_request()
        self._lock = threading.Lock()
        self.name = f"openvino CPU {label}"

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        with self._lock:
            self.request.infer({0: x.detach().cpu().numpy()})
            out = self.request.get_output_tensor(0).data
            return np.array(out, dtype=np.float32, copy=True)  # the request's buffer is reused by the next call


def quantize_int8(fp32: Path, path: Path, calibration: torch.Tensor, role: str) -> Path:
    """NNCF's post-training INT8 quantisation of the ONNX graph ``fp32`` into the QDQ graph ``path``, which
    OpenVINO compiles to INT8 kernels. NNCF's defaults (symmetric per-channel weights, activation ranges from
    ``calibration``, fast bias correction), with the head and the first stage left in fp32 (``int8_scope``)."""
    try:
        import nncf
        import onnx
    except ImportError as exc:
        raise BackendError("OpenVINO INT8 needs NNCF (pip install nncf)") from exc
    logger.info("quantising %s with NNCF on %d crops (once for these weights): %s", fp32.name, len(calibration), path)
    model = onnx.load(str(fp32))
    dataset = nncf.Dataset([{INPUT_NAME: image[None].numpy()} for image in calibration])
    ignored = nncf.IgnoredScope(names=fp32_nodes(fp32, role), validate=False)
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration), ignored_scope=ignored)
    with atomic_path(path) as tmp:
        onnx.save(quantized, str(tmp))
    return path
