"""Inference backends: one network (the extractor or the mask generator) behind one call, ``backend(x)`` with
``x`` a preprocessed (B, 3, H, W) float32 batch on the CPU and a float32 NumPy answer.

- ``torch`` (``pytorch``): PyTorch on the service's device; on CUDA bf16/fp16 autocast and CUDA graphs.
- ``onnxruntime`` / ``onnxruntime-int8`` (``onnx``): the graph exported at first start, and its static INT8
  quantisation calibrated on real crops.
- ``openvino`` / ``openvino-bf16`` / ``openvino-int8`` (``openvino``): OpenVINO's CPU plugin on that graph in
  fp32 or bf16, and NNCF's INT8 model.
- ``auto`` (``select``): on a CPU, every kind that passes the parity check (``parity``) is timed at start-up and
  the fastest serves; on CUDA, PyTorch.

Real crops (``crops``: REID_CALIBRATION_DIR, or the gallery's stored crops) give the parity check its fixed set
and INT8 its calibration.
"""

from app.backends.base import BACKENDS, INT8_KINDS, KINDS, REDUCED_KINDS, Backend, BackendError
from app.backends.crops import ReferenceCrops, reference_crops
from app.backends.onnx import OnnxBackend
from app.backends.parity import (
    MIN_COSINE,
    MIN_COSINE_REDUCED,
    MIN_NN_AGREEMENT,
    Parity,
    check_parity,
    cosines,
    nearest_neighbour_agreement,
)
from app.backends.pytorch import TorchBackend, autocast_dtype, bucket_for
from app.backends.select import Selection, load_backend, resolve_backend, select_backend

__all__ = [
    "BACKENDS",
    "INT8_KINDS",
    "KINDS",
    "MIN_COSINE",
    "MIN_COSINE_REDUCED",
    "MIN_NN_AGREEMENT",
    "REDUCED_KINDS",
    "Backend",
    "BackendError",
    "OnnxBackend",
    "Parity",
    "ReferenceCrops",
    "Selection",
    "TorchBackend",
    "autocast_dtype",
    "bucket_for",
    "check_parity",
    "cosines",
    "load_backend",
    "nearest_neighbour_agreement",
    "reference_crops",
    "resolve_backend",
    "select_backend",
]
