"""What every backend is: one network behind one call, and the names of the kinds the service can serve with."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

# REID_BACKEND's values. `auto` times the CPU kinds that pass the parity check and serves the fastest (PyTorch
# on CUDA); the others pin one kind.
FP32_KINDS = ("torch", "onnxruntime", "openvino")
REDUCED_KINDS = ("openvino-bf16", "onnxruntime-int8", "openvino-int8")
INT8_KINDS = ("onnxruntime-int8", "openvino-int8")
KINDS = (*FP32_KINDS, *REDUCED_KINDS)
BACKENDS = ("auto", *KINDS)


class BackendError(ValueError):
    """A backend that cannot serve: not installed, not buildable, or refused by the parity check (the message
    has the figures)."""


class Backend(Protocol):
    name: str  # e.g. "onnxruntime CPUExecutionProvider", "openvino CPU int8 (NNCF)"

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) float32 on the CPU -> the network's output as float32 NumPy, B first."""
        ...


def is_reduced_precision(kind: str) -> bool:
    return kind in REDUCED_KINDS
