from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from models import ModelConfig, build_extractor
from tests.conftest import MOBILENET_WEIGHTS, require_shared


def test_resnet50_full_size_gives_512d_templates():
    extractor = build_extractor(ModelConfig()).eval()
    with torch.no_grad():
        out = extractor(torch.randn(2, 3, 224, 112))
    assert out.shape == (2, 512)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out >= 0).all()  # ReLU after BN, as in the paper


def test_resnet50_trunk_map_is_2048_channels_and_pools_to_1x1():
    extractor = build_extractor(ModelConfig()).eval()
    with torch.no_grad():
        fmap = extractor.forward_features(torch.randn(1, 3, 224, 112))
    assert fmap.shape == (1, 2048, 7, 4)
    assert extractor.pool(fmap).shape == (1, 2048, 1, 1)
    conv, bn, _ = extractor.head
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (2048, 512, (1, 1), (1, 1))
    assert bn.num_features == 512


def test_trunk_keys_are_torchvisions_resnet50_without_fc():
    ours = set(build_extractor(ModelConfig()).trunk.state_dict())
    theirs = {k for k in torchvision.models.resnet50().state_dict() if not k.startswith("fc.")}
    assert ours == theirs


def test_trunk_loads_a_state_dict_saved_from_torchvision_resnet50(tmp_path: Path):
    reference = torchvision.models.resnet50()
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(reference.state_dict(), path)
    extractor = build_extractor(ModelConfig(), pretrained=path)
    for name, tensor in extractor.trunk.state_dict().items():
        assert torch.equal(tensor, reference.state_dict()[name]), name


def test_trunk_loads_a_nested_module_prefixed_checkpoint(tmp_path: Path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    extractor = build_extractor(ModelConfig(backbone="resnet18"), pretrained=path)
    assert torch.equal(extractor.trunk.conv1.weight, reference.conv1.weight)


def test_missing_imagenet_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"does-not-exist\.pth does not exist"):
        build_extractor(ModelConfig(backbone="resnet18"), pretrained=tmp_path / "does-not-exist.pth")


def test_imagenet_file_of_another_architecture_is_refused(tmp_path: Path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="do not fit a resnet50 trunk"):
        build_extractor(ModelConfig(backbone="resnet50"), pretrained=path)


def test_imagenet_file_with_pickled_code_is_refused(tmp_path: Path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "hook": print}, path)
    with pytest.raises(ValueError, match="cannot read weights file"):
        build_extractor(ModelConfig(backbone="resnet18"), pretrained=path)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="unknown backbone 'resnet5'; choose resnet50, resnet18, mobilenet_v2"):
        ModelConfig(backbone="resnet5")


def test_mobilenet_v2_loads_the_real_imagenet_weights():
    path = require_shared(MOBILENET_WEIGHTS)
    extractor = build_extractor(ModelConfig(backbone="mobilenet_v2"), pretrained=path).eval()
    reference = torchvision.models.mobilenet_v2().features
    reference.load_state_dict({k.removeprefix("features."): v for k, v in load_file(str(path)).items()})
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        assert torch.equal(extractor.forward_features(x), reference.eval()(x))
        assert extractor(x).shape == (2, 512)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_small_backbones_give_feat_dim_and_every_parameter_learns(backbone: str):
    extractor = build_extractor(ModelConfig(backbone=backbone, feat_dim=64, input_height=64, input_width=32))
    out = extractor(torch.randn(4, 3, 64, 32))
    assert out.shape == (4, 64)
    out.pow(2).sum().backward()
    no_grad = [n for n, p in extractor.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_last_stride_1_doubles_the_last_feature_map(backbone: str):
    x = torch.randn(1, 3, 64, 32)
    default = build_extractor(ModelConfig(backbone=backbone)).eval()
    stride1 = build_extractor(ModelConfig(backbone=backbone, last_stride=1)).eval()
    assert default.state_dict().keys() == stride1.state_dict().keys()  # the same weights, computed otherwise
    with torch.no_grad():
        assert default.forward_features(x).shape[-2:] == (2, 1)
        assert stride1.forward_features(x).shape[-2:] == (4, 2)


SMALL = ModelConfig(backbone="resnet18", feat_dim=16, input_height=64, input_width=32)


def test_bnneck_serves_the_feature_the_config_names_with_the_papers_as_default():
    x = torch.randn(6, 3, 64, 32)
    torch.manual_seed(0)
    paper = build_extractor(SMALL).eval()
    assert paper.neck is None and not any("neck" in k for k in paper.state_dict())  # old weights still fit
    for neck_feat, normalize in (("before", False), ("after", False), ("before", True), ("after", True)):
        config = dataclasses.replace(SMALL, bnneck=True, neck_feat=neck_feat, normalize=normalize)
        torch.manual_seed(0)
        extractor = build_extractor(config)
        extractor.train()
        with torch.no_grad():
            extractor(torch.randn(8, 3, 64, 32) * 2 + 1)  # BN statistics away from their defaults
        extractor.eval()
        assert extractor.neck.num_features == 16 and not extractor.neck.bias.requires_grad  # no shift
        with torch.no_grad():
            before, after = extractor.forward_neck(x)
            served = extractor(x)
        assert before.shape == after.shape == served.shape == (6, 16)
        assert (before >= 0).all()  # the head's ReLU output
        expected = after if neck_feat == "after" else before
        expected = torch.nn.functional.normalize(expected, dim=1) if normalize else expected
        torch.testing.assert_close(served, expected)
        n = extractor.neck
        torch.testing.assert_close(after, (before - n.running_mean) / (n.running_var + n.eps).sqrt() * n.weight)
        if normalize:
            torch.testing.assert_close(served.norm(dim=1), torch.ones(6))


def test_flip_average_serves_the_mean_of_the_image_and_its_mirror():
    config = dataclasses.replace(SMALL, bnneck=True, neck_feat="after", flip_average=True)
    extractor = build_extractor(config).eval()
    plain = build_extractor(dataclasses.replace(config, flip_average=False)).eval()
    plain.load_state_dict(extractor.state_dict())
    x = torch.randn(3, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(extractor(x), (plain(x) + plain(x.flip(-1))) / 2)
        torch.testing.assert_close(extractor(x), extractor(x.flip(-1)), atol=1e-5, rtol=1e-5)  # mirror-invariant


def test_served_feature_settings_are_checked_and_travel_with_the_config():
    with pytest.raises(ValueError, match="needs bnneck=True"):
        ModelConfig(neck_feat="after")
    with pytest.raises(ValueError, match="unknown neck_feat 'middle'; choose before, after"):
        ModelConfig(bnneck=True, neck_feat="middle")
    strong = ModelConfig(bnneck=True, neck_feat="after", normalize=True, flip_average=True, last_stride=1)
    assert ModelConfig.from_dict(strong.to_dict()) == strong
    # the paper's config serialises as before these settings existed (so its fingerprint is unchanged)
    assert set(ModelConfig().to_dict()) == {f.name for f in dataclasses.fields(ModelConfig)} - {
        "bnneck",
        "neck_feat",
        "normalize",
        "flip_average",
        "ibn",
    }
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()
