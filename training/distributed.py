"""Several processes (torchrun): DistributedDataParallel with SyncBatchNorm, and the batch-hard triplet loss
over the whole global batch.

torch's ``SyncBatchNorm`` runs on GPUs only (its statistics kernels have no CPU version). On the CPU (gloo) the
converted layers compute the same global statistics with one differentiable all_reduce of the per-channel sums,
so a CPU run with N ranks trains like one process with the global batch (``tests/training/test_distributed.py``).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

logger = logging.getLogger(__name__)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` that also synchronises CPU tensors (see the module's docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.device.type != "cpu" or not self.training or world_size() == 1 or self.momentum is None:
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        count = torch.tensor([input.numel() / channels], dtype=input.dtype)
        stats = dist_nn.all_reduce(torch.cat([input.sum(dims), (input * input).sum(dims), count]))  # summed
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels : 2 * channels] / n - mean * mean).clamp_min(0)  # biased, for normalising
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)  # unbiased, as BatchNorm keeps
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer of ``module`` as a ``SyncBatchNorm`` (in place; parameters and buffers kept)."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = SyncBatchNorm  # same state, a forward that also works on the CPU
    return module


def gather_batch(features: torch.Tensor, pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (B, D) features and (B,) pids concatenated in rank order, so batch-hard mining sees the
    global P x K batch as one process would. The features keep their gradient: the backward sums each rank's
    gradient for this rank's slice (each rank computes the same loss; DDP then averages over the ranks)."""
    if world_size() == 1:
        return features, pids
    all_features = torch.cat(dist_nn.all_gather(features.contiguous()))
    gathered = [torch.empty_like(pids) for _ in range(world_size())]
    dist.all_gather(gathered, pids.contiguous())
    return all_features, torch.cat(gathered)


def mean_over_ranks(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The detached losses averaged over the ranks, in one all_reduce (the logged figures are the global ones)."""
    if world_size() == 1 or not losses:
        return losses
    stacked = torch.stack([v.detach().float() for v in losses.values()])
    dist.all_reduce(stacked)
    return dict(zip(losses, stacked / world_size(), strict=True))
