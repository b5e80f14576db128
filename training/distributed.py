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

from models.ibn import InstanceBatchNorm2d

logger = logging.getLogger(__name__)


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (which keeps it in ``.module``), or ``module``."""
    return getattr(module, "module", module)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GlobalStatistics:
    """A BatchNorm forward over the statistics of every rank's batch (see the module's docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1 or self.momentum is None:
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        # One all_reduce of (sum, sum of squares, count), in float64: E[x^2] - E[x]^2 loses too much in float32.
        x = input.double()
        count = torch.tensor([input.numel() / channels], dtype=x.dtype)
        stats = dist_nn.all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))  # summed over the ranks
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels : 2 * channels] / n - mean * mean).clamp_min(0)  # biased, for normalising
        if self.track_running_stats:  # kept in the buffers' dtype (fp32), also when autocast feeds bf16 inputs
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                unbiased = var.detach() * float(n / (n - 1))  # as BatchNorm keeps it
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        mean, var = mean.to(input.dtype), var.to(input.dtype)
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


class CpuSyncBatchNorm1d(_GlobalStatistics, nn.BatchNorm1d):
    pass


class CpuSyncBatchNorm2d(_GlobalStatistics, nn.BatchNorm2d):
    pass


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``module`` synchronised across the ranks, in place (parameters and buffers
    kept): torch's ``SyncBatchNorm`` on GPUs; on the CPU, where DDP refuses it, the same layers with a forward
    over the global statistics."""
    if any(isinstance(m, InstanceBatchNorm2d) for m in module.modules()):
        # torch's conversion takes every BatchNorm subclass and would drop the instance-normalised half.
        raise ValueError("IBN networks train in one process: their layers have no synchronised form")
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = CpuSyncBatchNorm1d
        elif type(m) is nn.BatchNorm2d:
            m.__class__ = CpuSyncBatchNorm2d
    return module


def gather_batch(features: torch.Tensor, pids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (B, D) features and (B,) pids concatenated in rank order, so batch-hard mining sees the
    global P x K batch as one process would. The features keep their gradient: the backward sums each rank's
    gradient for this rank's slice (each rank computes the same loss; DDP then averages over the ranks)."""
    if world_size() == 1:
        return features, pids
    # In fp32: the loss is computed in fp32 anyway, and gloo need not know autocast's bf16.
    all_features = torch.cat(dist_nn.all_gather(features.float().contiguous()))
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
