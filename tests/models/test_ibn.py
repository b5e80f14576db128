"""IBN-a (models.ibn): half the channels instance-normalised, half batch-normalised, under BatchNorm2d's names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import ModelConfig, build_extractor
from models.ibn import InstanceBatchNorm2d
from tests.conftest import MOBILENET_WEIGHTS, require_shared


def _pair(channels: int = 6) -> tuple[nn.BatchNorm2d, InstanceBatchNorm2d]:
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm, InstanceBatchNorm2d.replacing(norm)


def test_the_instance_half_ignores_each_images_contrast_and_brightness():
    _, ibn = _pair()
    x = torch.randn(4, 6, 8, 4)
    scaled = x.clone()
    scaled[0] = scaled[0] * 3.0 + 2.0  # one image brighter and of more contrast, channel by channel alike
    ibn.eval()
    out, out_scaled = ibn(x), ibn(scaled)
    assert torch.allclose(out[0, :3], out_scaled[0, :3], atol=1e-4)  # instance-normalised: unchanged
    assert not torch.allclose(out[0, 3:], out_scaled[0, 3:], atol=1e-2)  # batch-normalised: changed
    assert torch.equal(out[1:], out_scaled[1:])  # in eval mode no image sees another


def test_the_batch_half_is_batchnorm2d_in_training_and_eval_running_statistics_included():
    norm, ibn = _pair()
    for _ in range(3):
        x = torch.randn(5, 6, 8, 4) * 2 + 1
        norm.train(), ibn.train()
        assert torch.allclose(ibn(x)[:, 3:], norm(x)[:, 3:], atol=1e-5)
    assert torch.allclose(ibn.running_mean[3:], norm.running_mean[3:])
    assert torch.allclose(ibn.running_var[3:], norm.running_var[3:])
    assert int(ibn.num_batches_tracked) == 3
    norm.eval(), ibn.eval()
    assert torch.allclose(ibn(x)[:, 3:], norm(x)[:, 3:], atol=1e-5)


def test_the_instance_half_starts_from_the_batch_norms_affine_and_learns_it():
    norm, ibn = _pair()
    assert ibn.state_dict().keys() == norm.state_dict().keys()
    x = torch.randn(2, 6, 8, 4)
    ibn.train()
    ibn(x).pow(2).sum().backward()
    assert ibn.weight.grad is not None and bool((ibn.weight.grad[:3] != 0).all())
    mean, std = x[:, :3].mean((2, 3), keepdim=True), x[:, :3].var((2, 3), unbiased=False, keepdim=True)
    expected = (x[:, :3] - mean) / (std + ibn.eps).sqrt() * norm.weight[:3, None, None] + norm.bias[:3, None, None]
    assert torch.allclose(ibn(x)[:, :3], expected, atol=1e-4)


@pytest.mark.parametrize(("backbone", "layers"), [("mobilenet_v2", 13), ("resnet18", 6)])
def test_ibn_trunks_put_it_in_every_block_but_the_last_stages(backbone: str, layers: int):
    plain = build_extractor(ModelConfig(backbone=backbone, feat_dim=16, input_height=64, input_width=32))
    ibn = build_extractor(ModelConfig(backbone=backbone, feat_dim=16, input_height=64, input_width=32, ibn=True))
    assert sum(isinstance(m, InstanceBatchNorm2d) for m in ibn.modules()) == layers
    assert ibn.state_dict().keys() == plain.state_dict().keys()
    last = ibn.trunk_blocks()[-1]
    assert not any(isinstance(m, InstanceBatchNorm2d) for m in last.modules())
    out = ibn(torch.randn(3, 3, 64, 32))
    out.pow(2).sum().backward()
    assert not [n for n, p in ibn.named_parameters() if p.grad is None]


def test_the_real_imagenet_weights_load_into_an_ibn_trunk():
    path = require_shared(MOBILENET_WEIGHTS)
    extractor = build_extractor(ModelConfig(backbone="mobilenet_v2", ibn=True), pretrained=path)
    plain = build_extractor(ModelConfig(backbone="mobilenet_v2"), pretrained=path)
    first = extractor.trunk.features[3].conv[0][1]
    assert isinstance(first, InstanceBatchNorm2d)
    assert torch.equal(first.weight, plain.trunk.features[3].conv[0][1].weight)


def test_ibn_is_left_out_of_the_written_config_while_off():
    """Weights written before IBN keep their config, and so their fingerprint."""
    assert "ibn" not in ModelConfig().to_dict()
    assert ModelConfig(ibn=True).to_dict()["ibn"] is True
    assert ModelConfig.from_dict(ModelConfig(ibn=True).to_dict()).ibn


def test_channels_of_little_variance_far_from_zero_are_normalised_as_torch_does():
    """A one-pass E[x^2] - E[x]^2 loses such a channel to rounding; torch's own norms (and ONNX's) do not."""
    norm, ibn = _pair()
    torch.manual_seed(1)
    x = torch.randn(4, 6, 8, 4) * 0.01 + 30.0
    x[:, 1] = 7.0  # a constant channel: its gradient must not be NaN
    x.requires_grad_(True)
    ibn.train()
    out = ibn(x)
    expected = torch.nn.functional.instance_norm(x[:, :3], weight=norm.weight[:3], bias=norm.bias[:3])
    assert torch.allclose(out[:, :3], expected, atol=1e-3)
    assert torch.allclose(out[:, 3:], norm.train()(x)[:, 3:], atol=1e-3)
    out.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
