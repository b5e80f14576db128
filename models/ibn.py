"""Instance-batch normalisation, IBN-a (Pan et al., "Two at Once: Enhancing Learning and Generalization Capacities
via IBN-Net", ECCV 2018), the layer the re-ID field credits with models that travel between sites (fast-reid's
``WITH_IBN``).

Instance normalisation takes each image's own contrast and colour statistics out of a feature map; batch
normalisation keeps what tells people apart. IBN-a instance-normalises half the channels of the first norm layer
of every block in all stages but the last, and batch-normalises the other half.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InstanceBatchNorm2d(nn.BatchNorm2d):
    """The first ``instance_channels`` channels instance-normalised, the rest batch-normalised; one affine over
    all of them. It keeps BatchNorm2d's parameter and buffer names (the instance half's running statistics are
    kept but never read), so torchvision's ImageNet weights load unchanged and the instance half starts from the
    batch norm's affine."""

    def __init__(self, num_features: int, instance_channels: int | None = None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.instance_channels = num_features // 2 if instance_channels is None else instance_channels
        if not 0 < self.instance_channels < num_features:
            raise ValueError(f"instance_channels must be in (0, {num_features}), got {self.instance_channels}")

    @classmethod
    def replacing(cls, norm: nn.BatchNorm2d) -> InstanceBatchNorm2d:
        """A layer for ``norm``'s place with its settings, parameters and statistics."""
        ibn = cls(norm.num_features, eps=norm.eps, momentum=norm.momentum)
        ibn.load_state_dict(norm.state_dict())
        return ibn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Over all channels at once (slicing the halves and concatenating them again took 1.7x the step time of the
        # strong recipe at 256x128), in two passes: each image's channel means, then the second moments about
        # them (E[x^2] - E[x]^2 in one pass lost a channel of little variance to rounding, 1e-2 off ONNX's).
        if torch.onnx.is_in_onnx_export():
            return self._exportable(x)
        h, n = self.instance_channels, x.shape[0]
        use_batch = self.training or self.running_mean is None
        mean = x.float().mean((2, 3))  # (N, C)
        batch_mean = mean[:, h:].mean(0) if use_batch else self.running_mean[h:]
        centred = x - torch.cat([mean[:, :h], batch_mean.expand(n, -1)], dim=1)[:, :, None, None]
        # A norm rather than var_mean, whose reduction took 5x BatchNorm2d's whole forward on channels-last maps.
        moment = torch.linalg.vector_norm(centred, dim=(2, 3)).square() / (x.shape[2] * x.shape[3])
        if use_batch:
            batch_var = moment[:, h:].mean(0)  # the batch's variance: every image's moment about the batch mean
            if self.training and self.track_running_stats:
                self._track(batch_mean.detach(), batch_var.detach(), count=x.numel() // x.shape[1])
        else:
            batch_var = self.running_var[h:]
        var = torch.cat([moment[:, :h], batch_var.expand(n, -1)], dim=1)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return centred * scale[:, :, None, None] + self.bias[:, None, None]

    def _exportable(self, x: torch.Tensor) -> torch.Tensor:
        """The same in ONNX's own InstanceNormalization and BatchNormalization (the exporter loses parameters of
        equal values used in plain arithmetic, as an untrained network's are)."""
        h = self.instance_channels
        instance = F.instance_norm(x[:, :h], weight=self.weight[:h], bias=self.bias[:h], eps=self.eps)
        batch = F.batch_norm(
            x[:, h:], self.running_mean[h:], self.running_var[h:], self.weight[h:], self.bias[h:], eps=self.eps
        )
        return torch.cat([instance, batch], dim=1)

    @torch.no_grad()
    def _track(self, batch_mean: torch.Tensor, batch_var: torch.Tensor, count: int) -> None:
        """BatchNorm2d's running statistics for the batch-normalised half (the variance unbiased, as it keeps it)."""
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        h = self.instance_channels
        self.running_mean[h:].lerp_(batch_mean, momentum)
        self.running_var[h:].lerp_(batch_var * (count / max(count - 1, 1)), momentum)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, instance_channels={self.instance_channels}"


def mobilenet_v2_ibn(trunk: nn.Module, last_stage_block: int) -> None:
    """IBN-a in torchvision's MobileNetV2, in place: the first norm of every inverted-residual block before
    ``last_stage_block`` (the 160- and 320-channel blocks, at the last stride, stay batch-normalised, as IBN-a
    leaves ResNet's layer4)."""
    for block in list(trunk.features)[1:last_stage_block]:
        first = block.conv[0]  # Conv2dNormActivation: conv, norm, ReLU6
        first[1] = InstanceBatchNorm2d.replacing(first[1])


def resnet_ibn(trunk: nn.Module) -> None:
    """IBN-a in torchvision's ResNet, in place: ``bn1`` of every block in layer1 to layer3."""
    for layer in (trunk.layer1, trunk.layer2, trunk.layer3):
        for block in layer:
            block.bn1 = InstanceBatchNorm2d.replacing(block.bn1)
