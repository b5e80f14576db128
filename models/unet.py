"""The mask generator of section 2.1: a U-Net (Ronneberger et al. 2015) with padded 3x3 convs.

Encoder: ``levels`` resolution levels of two 3x3 conv + BN + ReLU each (widths base * 2**level,
32..512 in the paper), 2x2 max-pool stride 2 between them; the paper counts 9 encoder convs
because the last level's two convs are the bottleneck shared with the decoder. Decoder: at each
level a 2x2 transposed conv stride 2 (256..32 filters), concatenation with the encoder's skip,
two 3x3 conv + BN + ReLU. A final 1x1 conv with one filter and a sigmoid gives the mask.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig


class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class MaskGenerator(nn.Module):
    """Image (B, 3, H, W), ImageNet-normalised -> mask (B, 1, H, W) in [0, 1].

    H and W must be divisible by 2**(levels-1) (16 for the paper's 5 levels).
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        widths = [self.config.unet_base_width * 2**i for i in range(self.config.unet_levels)]
        self.widths = widths
        self.down = nn.ModuleList()
        in_channels = 3
        for width in widths:
            self.down.append(DoubleConv(in_channels, width))
            in_channels = width
        self.pool = nn.MaxPool2d(2, stride=2)
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(width * 2, width, 2, stride=2))
            self.up_conv.append(DoubleConv(width * 2, width))
        self.out = nn.Conv2d(widths[0], 1, 1, stride=1)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pre-sigmoid mask (B, 1, H, W)."""
        multiple = 2 ** (len(self.widths) - 1)
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f"mask generator input sides must be divisible by {multiple}, got {tuple(x.shape[-2:])}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()  # the bottleneck
        for up, conv in zip(self.up, self.up_conv, strict=True):
            x = conv(torch.cat([skips.pop(), up(x)], dim=1))
        return self.out(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward_logits(x))


def build_mask_generator(config: ModelConfig | None = None) -> MaskGenerator:
    return MaskGenerator(config)
