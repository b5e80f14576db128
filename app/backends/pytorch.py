"""The PyTorch backend: the fp32 reference on the CPU; on CUDA, bf16 (or fp16) autocast, channels_last and one
CUDA graph per batch-size bucket (a batch is padded up to its bucket)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)


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
