"""The feature extractor of section 2.1: an ImageNet trunk, its classifier removed, then a
1x1 conv to ``feat_dim`` filters + BatchNorm + ReLU, giving one ``feat_dim`` template per image.

With ``ModelConfig.bnneck`` a BatchNorm1d without shift follows the head (Luo et al., "Bag of Tricks and a
Strong Baseline for Deep Person Re-identification", CVPR-W 2019): the triplet loss reads the feature before
it, the ID loss's classifier (a training-only layer, see ``training.engine``) the feature after it. Which of
the two is served, raw or L2-normalised, is ``neck_feat`` and ``normalize``: ``forward`` in eval mode is the
served template, the one the service, offline evaluation and the ONNX export all compute (with
``flip_average`` it is the mean over the image and its mirror, so the service gets the flip-averaged
evaluation's answers too).

The trunk is torchvision's own module with its classifier deleted, so ``extractor.trunk``'s
parameter names are exactly torchvision's and ImageNet weights load from a local file unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models.config import ModelConfig
from models.ibn import mobilenet_v2_ibn, resnet_ibn

logger = logging.getLogger(__name__)

TRUNK_CHANNELS = {"resnet50": 2048, "resnet18": 512, "mobilenet_v2": 1280}
# Keys of torchvision's classifiers; dropped when loading a full ImageNet checkpoint.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.")
MOBILENET_LAST_STRIDE_BLOCK = 14


def _build_trunk(backbone: str, last_stride: int, ibn: bool = False) -> nn.Module:
    if backbone in ("resnet50", "resnet18"):
        trunk = getattr(torchvision.models, backbone)(weights=None)
        del trunk.fc
        if last_stride == 1:
            # The field's re-ID trick (Luo et al., "Bag of Tricks"): doubles the last map's size.
            block = trunk.layer4[0]
            (block.conv2 if backbone == "resnet50" else block.conv1).stride = (1, 1)
            block.downsample[0].stride = (1, 1)
        if ibn:
            resnet_ibn(trunk)
        return trunk
    if backbone == "mobilenet_v2":
        trunk = torchvision.models.mobilenet_v2(weights=None)
        del trunk.classifier
        if last_stride == 1:
            # The same trick for MobileNetV2: its last stride-2 layer is the depthwise conv of block 14 (the first
            # of the 160-channel stage), so the map ends at 1/16 of the input instead of 1/32.
            trunk.features[MOBILENET_LAST_STRIDE_BLOCK].conv[1][0].stride = (1, 1)
        if ibn:
            mobilenet_v2_ibn(trunk, MOBILENET_LAST_STRIDE_BLOCK)
        return trunk
    raise ValueError(f"unknown backbone {backbone!r}; choose resnet50, resnet18 or mobilenet_v2")


class FeatureExtractor(nn.Module):
    """Image (B, 3, H, W), ImageNet-normalised -> template (B, feat_dim); non-negative with the paper's
    settings (the head ends in a ReLU)."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        self.trunk = _build_trunk(self.config.backbone, self.config.last_stride, self.config.ibn)
        self.pool = nn.AdaptiveAvgPool2d(1)  # the trunk's own average pool: 2048x1x1 for ResNet-50
        self.head = nn.Sequential(
            nn.Conv2d(TRUNK_CHANNELS[self.config.backbone], self.config.feat_dim, 1, stride=1),
            nn.BatchNorm2d(self.config.feat_dim),
            nn.ReLU(inplace=True),
        )
        self.neck: nn.BatchNorm1d | None = None
        if self.config.bnneck:
            self.neck = nn.BatchNorm1d(self.config.feat_dim)
            # No shift (fast-reid's bias_freeze): the ID loss's hyperplanes then pass through the origin.
            self.neck.bias.requires_grad_(False)

    @property
    def feat_dim(self) -> int:
        return self.config.feat_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the trunk's last feature map (B, C, H/32, W/32)."""
        t = self.trunk
        if self.config.backbone == "mobilenet_v2":
            return t.features(x)
        x = t.maxpool(t.relu(t.bn1(t.conv1(x))))
        return t.layer4(t.layer3(t.layer2(t.layer1(x))))

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, feat_dim)."""
        return self.head(self.pool(feature_map)).flatten(1)

    def forward_neck(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (feature before the BNNeck, feature after it), each (B, feat_dim); the two are the
        same tensor without a BNNeck. Training's losses read these; ``forward`` serves one of them."""
        feat = self.forward_head(self.forward_features(x))
        return feat, (self.neck(feat) if self.neck is not None else feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the served template (B, feat_dim)."""
        if self.config.flip_average:  # one pass over the images and their mirrors, (2B, D) each
            n = x.shape[0]
            before, after = (f[:n] / 2 + f[n:] / 2 for f in self.forward_neck(torch.cat([x, x.flip(-1)])))
        else:
            before, after = self.forward_neck(x)
        feat = after if self.config.neck_feat == "after" else before
        return F.normalize(feat, dim=1) if self.config.normalize else feat

    def trunk_blocks(self) -> list[nn.Module]:
        """The trunk's blocks in input order: for ResNets the stem (conv1 + bn1) then layer1..layer4,
        for MobileNetV2 its 19 ``features`` blocks. Training may freeze a leading run of them."""
        t = self.trunk
        if self.config.backbone == "mobilenet_v2":
            return list(t.features)
        return [nn.ModuleList([t.conv1, t.bn1]), t.layer1, t.layer2, t.layer3, t.layer4]

    def load_imagenet(self, source: str | Path) -> None:
        """Load ImageNet weights into the trunk from a local file, or from torchvision's hub
        when ``source == "download"`` (the only way this package ever downloads anything).

        Accepts torchvision's ``*.pth`` files, a ``state_dict`` saved by ``torch.save`` (also
        nested under ``state_dict`` or ``model``), or ``.safetensors``; keys may carry a
        ``module.`` prefix and the classifier's keys are ignored.
        """
        if str(source) == "download":
            weights = {
                "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
                "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
                "mobilenet_v2": torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,
            }[self.config.backbone]
            state = weights.get_state_dict(progress=True)
        else:
            state = read_state_dict(Path(source))
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
        if self.config.backbone == "mobilenet_v2" and not any(k.startswith("features.") for k in state):
            # torchvision.models.mobilenet_v2().features.state_dict() has no "features." prefix.
            state = {f"features.{k}": v for k, v in state.items()}
        expected = self.trunk.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        if missing or unexpected or mismatched:
            raise ValueError(
                f"ImageNet weights in {source} do not fit a {self.config.backbone} trunk: "
                f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys "
                f"{unexpected[:3]}, {len(mismatched)} keys of the wrong shape {mismatched[:3]}"
            )
        self.trunk.load_state_dict(state)
        logger.info("loaded ImageNet %s trunk weights from %s", self.config.backbone, source)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a ``torch.save`` file, never executing pickled code."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors all mean the same to a user
        raise ValueError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} holds no state_dict of tensors")
    return state


def build_extractor(config: ModelConfig | None = None, pretrained: str | Path | None = None) -> FeatureExtractor:
    """The extractor; ``pretrained`` is a local ImageNet weights file, ``"download"``, or None."""
    extractor = FeatureExtractor(config)
    if pretrained is not None:
        extractor.load_imagenet(pretrained)
    return extractor
