"""Export for the app (the last checkpoint by default, re-load gives identical features, thresholds calibrated in
the served space), checkpoints refused unless weights_only can read them, and ONNX parity with PyTorch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models import ModelConfig, build_extractor, build_mask_generator, load_weights, read_metadata
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.data.loaders import val_loaders
from training.evaluation import calibrate_thresholds, extract_features, pair_distances
from training.export import export_onnx, export_weights, fmr_curve, onnx_max_difference

SMALL = ModelConfig(backbone="resnet18", input_height=64, input_width=32, feat_dim=64, unet_base_width=4, unet_levels=3)


def _trained_like(config: ModelConfig):
    extractor, generator = build_extractor(config), build_mask_generator(config)
    extractor.train()
    with torch.no_grad():  # move the BN statistics away from their defaults
        extractor(torch.randn(8, 3, config.input_height, config.input_width) * 3 + 1)
    return extractor.eval(), generator.eval()


def _save_run(run, train_config: TrainConfig, stage: int, name: str, extractor, generator, history=()) -> None:
    save_checkpoint(
        run / name,
        {
            "config": train_config.to_dict(),
            "stage": stage,
            "epoch": 2,
            "history": list(history),
            "extractor": extractor.state_dict(),
            "mask_generator": generator.state_dict(),
        },
    )


def test_export_takes_the_last_checkpoint_and_calibrates_thresholds_in_the_served_space(
    tmp_path, manifest_root
) -> None:
    model = dataclasses.replace(SMALL, bnneck=True, neck_feat="after", normalize=True)
    kwargs = {"query_camid": 0}
    train_config = TrainConfig(model=model, dataset="folder", root=str(manifest_root.root), dataset_kwargs=kwargs)
    run = tmp_path / "run"
    best_ext, best_gen = _trained_like(model)
    last_ext, last_gen = _trained_like(model)
    _save_run(run, train_config, 1, "best.pt", best_ext, best_gen, [{"stage": 1, "epoch": 2, "mAP": 90.0}])
    history = [{"stage": 3, "epoch": 2, "mAP": 55.5, "rank1": 70.0}]
    _save_run(run, train_config, 3, "last.pt", last_ext, last_gen, history)

    path = export_weights(run, tmp_path / "model.safetensors")
    loaded = load_weights(path)
    images = torch.randn(4, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(loaded.extractor(images), last_ext(images))
        assert torch.equal(loaded.mask_generator(images), last_gen(images))
    _, provenance, has_mask = read_metadata(path)
    assert has_mask and provenance["checkpoint"] == "last.pt" and provenance["evaluation"]["mAP"] == 55.5
    assert provenance["threshold_split"] == "val" and [t["fmr"] for t in provenance["thresholds"]] == [0.01, 0.001]
    # The thresholds are distances between the templates the service computes (the loaded weights' forward).
    query, gallery = val_loaders(train_config)
    qf, q_pids, q_camids = extract_features(loaded.extractor, query, torch.device("cpu"))
    gf, g_pids, g_camids = extract_features(loaded.extractor, gallery, torch.device("cpu"))
    genuine, impostor = pair_distances(qf, gf, q_pids, g_pids, q_camids, g_camids)
    assert provenance["thresholds"] == calibrate_thresholds(genuine, impostor, (0.01, 0.001))
    assert provenance["threshold_pairs"] == {"genuine": len(genuine), "impostor": len(impostor)} and len(genuine)
    # The false-match curve the service scores with: each point's rate is its share of impostor pairs.
    curve = provenance["fmr_curve"]
    assert curve == fmr_curve(impostor) and len(curve) >= 2
    for distance, fmr in curve:
        assert fmr == pytest.approx(float(np.mean(impostor <= distance)), abs=1.0 / len(impostor))

    best = export_weights(run, tmp_path / "best.safetensors", which="best", calibrate=False)
    _, provenance, has_mask = read_metadata(best)
    assert provenance["checkpoint"] == "best.pt" and not has_mask and "thresholds" not in provenance


def test_export_without_the_data_set_says_how_to_go_on(tmp_path) -> None:
    extractor, generator = _trained_like(SMALL)
    _save_run(tmp_path, TrainConfig(model=SMALL, root=str(tmp_path / "gone")), 3, "last.pt", extractor, generator)
    with pytest.raises(FileNotFoundError, match="--root, or export without thresholds"):
        export_weights(tmp_path, tmp_path / "model.safetensors")


def test_a_checkpoint_that_needs_pickled_code_is_refused(tmp_path) -> None:
    torch.save({"config": {}, "extractor": {}, "trap": _Pickled()}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(tmp_path / "last.pt")


class _Pickled:
    """Any class: torch.load(weights_only=True) must refuse to build it."""


def test_export_from_networks(tmp_path) -> None:
    extractor, _ = _trained_like(SMALL)
    path = export_weights((extractor, None), tmp_path / "w.safetensors", {"evaluation": {"mAP": 1.0}})
    assert read_metadata(path)[1]["evaluation"] == {"mAP": 1.0}


STRONG = dataclasses.replace(SMALL, bnneck=True, neck_feat="after", normalize=True, flip_average=True)
IBN = dataclasses.replace(STRONG, backbone="mobilenet_v2", ibn=True)


@pytest.mark.parametrize("config", [SMALL, STRONG, IBN], ids=["paper", "strong", "ibn"])
def test_onnx_export_matches_pytorch_with_a_dynamic_batch(tmp_path, config: ModelConfig) -> None:
    """The strong recipe's served template (after the BNNeck, normalised, flip-averaged) exports too."""
    pytest.importorskip("onnxruntime")
    extractor, _ = _trained_like(config)
    path = export_onnx(extractor, tmp_path / "extractor.onnx")  # checks a batch of 3 to 1e-4
    for batch in (1, 5):  # exported with a batch of 2
        assert onnx_max_difference(extractor, path, config, batch=batch) < 1e-4


def test_a_run_stopped_after_stage_1_exports_no_mask_generator(tmp_path) -> None:
    """Its mask generator was never trained: the weights must not pretend otherwise."""
    train_config = TrainConfig(model=SMALL)
    extractor, generator = _trained_like(train_config.model_config())
    state = {"config": train_config.to_dict(), "history": [], "extractor": extractor.state_dict()}
    save_checkpoint(tmp_path / "last.pt", {**state, "stage": 1, "epoch": 4, "mask_generator": generator.state_dict()})
    _, _, has_mask = read_metadata(export_weights(tmp_path, tmp_path / "model.safetensors", calibrate=False))
    assert not has_mask


def test_a_mobilenet_checkpoint_from_before_format_2_exports_with_the_stride_it_trained_with(tmp_path) -> None:
    """Before format 2 MobileNetV2 kept its last stride 2 whatever the config said (the strong recipe wrote 1);
    such a checkpoint carries no format_version."""
    written = dataclasses.replace(SMALL, backbone="mobilenet_v2", last_stride=1)
    trained = dataclasses.replace(written, last_stride=2)
    extractor, generator = _trained_like(trained)
    state = {"config": TrainConfig(model=written).to_dict(), "history": [], "extractor": extractor.state_dict()}
    save_checkpoint(tmp_path / "last.pt", {**state, "stage": 3, "epoch": 1, "mask_generator": generator.state_dict()})
    loaded = load_weights(export_weights(tmp_path, tmp_path / "model.safetensors", calibrate=False))
    assert loaded.config == trained
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.extractor(images), extractor(images), atol=1e-6)


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path) -> None:
    extractor, _ = _trained_like(SMALL)
    state = {"config": TrainConfig(model=SMALL).to_dict(), "history": [], "extractor": extractor.state_dict()}
    save_checkpoint(tmp_path / "last.pt", {**state, "format_version": 99, "stage": 1, "epoch": 1})
    with pytest.raises(ValueError, match="format version 99"):
        export_weights(tmp_path, tmp_path / "model.safetensors", calibrate=False)
