"""Export for the app (re-load gives identical features) and ONNX parity with PyTorch."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_extractor, build_mask_generator, load_weights, read_metadata
from training.checkpoint import save_checkpoint
from training.config import TrainConfig
from training.export import export_onnx, export_weights, onnx_max_difference

SMALL = ModelConfig(backbone="resnet18", input_height=64, input_width=32, feat_dim=64, unet_base_width=4, unet_levels=3)


def _trained_like(config: ModelConfig):
    extractor, generator = build_extractor(config), build_mask_generator(config)
    extractor.train()
    with torch.no_grad():  # move the BN statistics away from their defaults
        extractor(torch.randn(8, 3, config.input_height, config.input_width) * 3 + 1)
    return extractor.eval(), generator.eval()


def test_export_from_a_run_reloads_to_identical_features(tmp_path) -> None:
    train_config = TrainConfig(
        backbone="resnet18",
        input_height=64,
        input_width=32,
        feat_dim=64,
        unet_base_width=4,
        unet_levels=3,
        dataset="synthetic",
    )
    extractor, generator = _trained_like(train_config.model_config())
    history = [{"stage": 3, "epoch": 2, "mAP": 55.5, "rank1": 70.0, "all_mAP": 60.0}]
    save_checkpoint(
        tmp_path / "best.pt",
        {
            "config": train_config.to_dict(),
            "stage": 3,
            "epoch": 2,
            "history": history,
            "extractor": extractor.state_dict(),
            "mask_generator": generator.state_dict(),
        },
    )
    path = export_weights(tmp_path, tmp_path / "model.safetensors")
    model = load_weights(path)
    images = torch.randn(4, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(model.extractor(images), extractor(images))
        assert torch.equal(model.mask_generator(images), generator(images))
    _, provenance, has_mask = read_metadata(path)
    assert has_mask and provenance["evaluation"]["mAP"] == 55.5 and provenance["dataset"] == "synthetic"


def test_export_from_networks(tmp_path) -> None:
    extractor, _ = _trained_like(SMALL)
    path = export_weights((extractor, None), tmp_path / "w.safetensors", {"evaluation": {"mAP": 1.0}})
    assert read_metadata(path)[1]["evaluation"] == {"mAP": 1.0}


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    extractor, _ = _trained_like(SMALL)
    path = export_onnx(extractor, tmp_path / "extractor.onnx")  # checks a batch of 3 to 1e-4
    for batch in (1, 5):  # exported with a batch of 2
        assert onnx_max_difference(extractor, path, SMALL, batch=batch) < 1e-4


def test_a_run_stopped_after_stage_1_exports_no_mask_generator(tmp_path) -> None:
    """Its mask generator was never trained: the weights must not pretend otherwise."""
    train_config = TrainConfig(backbone="resnet18", input_height=64, input_width=32, feat_dim=64, unet_base_width=4)
    extractor, generator = _trained_like(train_config.model_config())
    state = {"config": train_config.to_dict(), "history": [], "extractor": extractor.state_dict()}
    save_checkpoint(tmp_path / "last.pt", {**state, "stage": 1, "epoch": 4, "mask_generator": generator.state_dict()})
    _, _, has_mask = read_metadata(export_weights(tmp_path, tmp_path / "model.safetensors"))
    assert not has_mask
