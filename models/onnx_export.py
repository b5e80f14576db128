"""The networks as ONNX graphs: one export for training's `export --onnx` and the service's backends."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from models.files import atomic_path

ONNX_OPSET = 17
INPUT_NAME = "images"


def export_onnx(module: nn.Module, path: str | Path, input_size: tuple[int, int], output_name: str) -> Path:
    """``module`` (put in eval mode) as an ONNX graph with input ``images`` (N, 3, H, W) and one output
    ``output_name``, N dynamic; written atomically to ``path``."""
    path = Path(path)
    module = module.eval()
    device = next(module.parameters()).device
    example = torch.randn(2, 3, *input_size, device=device)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python-side shape checks
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    return path
