from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models import (
    ModelConfig,
    WeightsError,
    build_extractor,
    build_mask_generator,
    extractor_fingerprint,
    load_weights,
    read_metadata,
    save_weights,
)
from models.files import atomic_path

SMALL = ModelConfig(backbone="resnet18", feat_dim=32, unet_base_width=4, input_height=64, input_width=32)


def _trained_like(module: torch.nn.Module) -> torch.nn.Module:
    """Perturb every tensor, buffers included, so a round trip cannot pass on initial values."""
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor))
            else:
                tensor.add_(7)
    return module


def _read_raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (not a dict)


def as_format(path: Path, version: int) -> Path:
    """Rewrite a weights file as written by a release of format ``version``: its tensors and config unchanged."""
    tensors, metadata = _read_raw(path)
    save_file(tensors, str(path), metadata={**metadata, "format_version": str(version)})
    return path


def test_weights_round_trip_bit_exactly_with_config_and_provenance(tmp_path: Path):
    extractor = _trained_like(build_extractor(SMALL))
    generator = _trained_like(build_mask_generator(SMALL))
    path = save_weights(tmp_path / "w.safetensors", extractor, generator, {"dataset": "market1501", "mAP": 0.5})
    loaded = load_weights(path)
    assert loaded.config == SMALL
    assert loaded.provenance["dataset"] == "market1501" and loaded.provenance["mAP"] == 0.5
    assert "created_at" in loaded.provenance
    for original, restored in ((extractor, loaded.extractor), (generator, loaded.mask_generator)):
        a, b = original.state_dict(), restored.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert not loaded.extractor.training and not loaded.mask_generator.training


def test_mask_generator_is_optional(tmp_path: Path):
    path = save_weights(tmp_path / "w.safetensors", build_extractor(SMALL))
    assert load_weights(path).mask_generator is None
    config, _, has_mask = read_metadata(path)
    assert config == SMALL and not has_mask


def test_truncated_file_is_refused_with_a_clear_message(tmp_path: Path):
    path = save_weights(tmp_path / "w.safetensors", build_extractor(SMALL))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"w\.safetensors is corrupt or truncated"):
        load_weights(path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, b"not a weights file at all"])
def test_garbage_file_is_refused(tmp_path: Path, content: bytes):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=r"garbage\.safetensors is corrupt or truncated"):
        load_weights(path)


def test_pickle_file_is_refused_without_being_executed(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    torch.save({"extractor.x": torch.zeros(1), "payload": print}, path)
    with pytest.raises(WeightsError, match="corrupt or truncated, or not safetensors"):
        load_weights(path)


def test_plain_safetensors_without_our_metadata_is_refused(tmp_path: Path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(WeightsError, match="is not a reid-gam-weights file"):
        load_weights(path)


def test_tensors_that_do_not_fit_the_declared_config_are_refused(tmp_path: Path):
    path = save_weights(tmp_path / "w.safetensors", build_extractor(SMALL))
    tensors, metadata = _read_raw(path)
    metadata["config"] = json.dumps({**SMALL.to_dict(), "feat_dim": 64})
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(WeightsError, match="does not fit the extractor its config describes"):
        load_weights(path)


def test_newer_format_version_and_unknown_settings_are_refused(tmp_path: Path):
    path = save_weights(tmp_path / "w.safetensors", build_extractor(SMALL))
    tensors, metadata = _read_raw(path)
    save_file(tensors, str(path), metadata={**metadata, "format_version": "99"})
    with pytest.raises(WeightsError, match="format version 99"):
        load_weights(path)
    save_file(tensors, str(path), metadata={**metadata, "config": json.dumps({"backbone": "resnet18", "depth": 3})})
    with pytest.raises(WeightsError, match=r"unknown model settings \['depth'\]"):
        load_weights(path)


def test_mobilenet_weights_of_format_1_keep_the_last_stride_they_were_computed_with(tmp_path: Path):
    """Format 1 built MobileNetV2 with its last stride 2 even where the config said 1 (the strong recipe's)."""
    config = ModelConfig(backbone="mobilenet_v2", feat_dim=32, unet_base_width=4, last_stride=1)
    path = save_weights(tmp_path / "w.safetensors", build_extractor(config))
    assert load_weights(path).config.last_stride == 1
    old = load_weights(as_format(path, 1))
    assert old.config.last_stride == 2 and read_metadata(path)[0].last_stride == 2
    # Its fingerprint is still the one a gallery enrolled under it recorded: over the config as the file writes it.
    assert old.fingerprint == extractor_fingerprint(config, old.extractor.state_dict())
    assert old.fingerprint != extractor_fingerprint(old.config, old.extractor.state_dict())
    with torch.no_grad():
        assert old.extractor.forward_features(torch.randn(1, 3, 64, 32)).shape[-2:] == (2, 1)
    resnet = save_weights(tmp_path / "r.safetensors", build_extractor(dataclasses.replace(SMALL, last_stride=1)))
    assert load_weights(as_format(resnet, 1)).config.last_stride == 1  # ResNets always honoured it


def test_missing_weights_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors does not exist"):
        load_weights(tmp_path / "nope.safetensors")


def test_atomic_path_without_overwrite_keeps_the_first_file(tmp_path: Path):
    path = tmp_path / "first.bin"
    with atomic_path(path, overwrite=False) as tmp:
        tmp.write_bytes(b"first")
    with pytest.raises(FileExistsError), atomic_path(path, overwrite=False) as tmp:
        tmp.write_bytes(b"second")
    assert path.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["first.bin"]
    with atomic_path(path) as tmp:  # the default replaces
        tmp.write_bytes(b"third")
    assert path.read_bytes() == b"third"


def test_durable_atomic_path_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path: Path, monkeypatch):
    import os

    import models.files

    path = tmp_path / "index.bin"
    synced: list[tuple[str, bool]] = []  # (what was synced, did `path` exist then)

    def fsync_path(target) -> None:
        synced.append((Path(target).name, path.exists()))

    monkeypatch.setattr(models.files, "fsync_path", fsync_path)
    with atomic_path(path, durable=True) as tmp:
        tmp.write_bytes(b"data")
    assert synced == [(tmp.name, False), (tmp_path.name, True)]
    assert path.read_bytes() == b"data" and not tmp.exists()
    with pytest.raises(RuntimeError), atomic_path(path, durable=True) as tmp:  # a failed write: nothing replaced
        tmp.write_bytes(b"half")
        raise RuntimeError("writer died")
    assert path.read_bytes() == b"data" and sorted(os.listdir(tmp_path)) == ["index.bin"]


def test_resolve_device_refuses_cuda_where_there_is_none(monkeypatch):
    import torch

    from models.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:1")
