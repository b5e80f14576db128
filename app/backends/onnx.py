"""ONNX Runtime: the fp32 graph exported from the weights, and its static INT8 quantisation (QDQ, per-channel
weights) calibrated on real crops. Both are cached in the data folder under the weights' fingerprint."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from app.backends.base import BackendError
from app.backends.int8_scope import fp32_nodes
from models.files import atomic_path
from models.onnx_export import INPUT_NAME, export_onnx

logger = logging.getLogger(__name__)


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

    def __init__(self, path: Path, device: torch.device, label: str = "", providers: list[str] | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise BackendError("onnxruntime is not installed (pip install onnxruntime)") from exc
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=providers or onnx_providers(device)
            )
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph types
            raise BackendError(f"ONNX graph {path} cannot be loaded: {exc}") from exc
        self.path = path
        self.input = self.session.get_inputs()[0].name
        self.name = f"onnxruntime {self.session.get_providers()[0]}" + (f" {label}" if label else "")

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        out = self.session.run(None, {self.input: x.detach().cpu().numpy()})[0]
        return np.ascontiguousarray(out, dtype=np.float32)


def fp32_graph(module: nn.Module, role: str, input_size: tuple[int, int], path: Path) -> Path:
    """The fp32 graph at ``path``, exported when absent (once per weights: the name holds their fingerprint)."""
    if path.exists():
        return path
    logger.info("exporting the %s to ONNX: %s (once for these weights)", role, path)
    try:
        return export_onnx(module, path, input_size, "features" if role == "extractor" else "mask")
    except Exception as exc:  # a read-only data folder, an operator the exporter lacks, ...
        raise BackendError(f"exporting the {role} to ONNX at {path} failed: {exc}") from exc


def cached_fp32(
    module: nn.Module, role: str, input_size: tuple[int, int], path: Path, device: torch.device
) -> OnnxBackend:
    """ONNX Runtime on the cached fp32 graph; exported again when the file cannot be loaded."""
    if path.exists():
        try:
            return OnnxBackend(path, device)
        except BackendError as exc:
            logger.warning("%s; exporting it again", exc)
            path.unlink()
    return OnnxBackend(fp32_graph(module, role, input_size, path), device)


class _Batches:
    """onnxruntime.quantization's CalibrationDataReader over preprocessed crops, a few at a time."""

    def __init__(self, images: torch.Tensor, batch: int = 8) -> None:
        self._batches = iter(images.split(batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch.numpy()}


def quantize_int8(fp32: Path, path: Path, calibration: torch.Tensor, role: str) -> Path:
    """Static INT8 quantisation of the graph ``fp32`` into ``path``: QDQ format, per-channel symmetric int8
    weights, uint8 activations with MinMax ranges from ``calibration`` (preprocessed real crops), the head and
    the first stage left in fp32 (``int8_scope``). The graph is first shape-inferred and fused, as ONNX
    Runtime's quantisation guide asks."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logger.info("calibrating %s as INT8 on %d crops (once for these weights): %s", fp32.name, len(calibration), path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # an optimisation it cannot do is not a reason to give up
            logger.warning("ONNX Runtime's pre-processing failed (%s); quantising the graph as exported", exc)
            prepared = fp32
        with atomic_path(path) as out:
            quantize_static(
                str(prepared),
                str(out),
                _Batches(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=fp32_nodes(prepared, role),
            )
    return path
