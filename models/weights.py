"""The weights format that training writes and the service reads.

One ``.safetensors`` file: tensors named ``extractor.<param>`` and, optionally,
``mask_generator.<param>``; string metadata ``format``, ``format_version``, ``config`` (the
``ModelConfig`` as JSON: architecture, input size, mean/std, feature dimension) and
``provenance`` (JSON: dataset, epochs, evaluation figures, creation time, ...).
safetensors holds no code, so loading a hostile file cannot execute anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from models.config import ModelConfig, as_written
from models.extractor import FeatureExtractor
from models.files import atomic_path
from models.fingerprint import extractor_fingerprint
from models.unet import MaskGenerator

FORMAT_NAME = "reid-gam-weights"
FORMAT_VERSION = 2  # 2: MobileNetV2 honours last_stride (models.config.as_written reads 1)
_EXTRACTOR = "extractor."
_MASK = "mask_generator."


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file and what is wrong."""


@dataclass
class ReidModel:
    """What a weights file holds, built into networks (in eval mode)."""

    config: ModelConfig
    extractor: FeatureExtractor
    mask_generator: MaskGenerator | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    written_config: ModelConfig | None = None  # the file's own words, where an older format's differ from ``config``

    @property
    def fingerprint(self) -> str:
        """The template space's identity (``models.extractor_fingerprint``), over the config as the file writes it:
        a file of an older format keeps the fingerprint its gallery was enrolled under."""
        return extractor_fingerprint(self.written_config or self.config, self.extractor.state_dict())


def save_weights(
    path: str | Path,
    extractor: FeatureExtractor,
    mask_generator: MaskGenerator | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write the networks to ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    tensors = {_EXTRACTOR + k: v for k, v in extractor.state_dict().items()}
    if mask_generator is not None:
        tensors.update({_MASK + k: v for k, v in mask_generator.state_dict().items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    provenance = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"), **(provenance or {})}
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(extractor.config.to_dict()),
        "provenance": json.dumps(provenance, default=str),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_metadata(path: str | Path) -> tuple[ModelConfig, dict[str, Any], bool]:
    """(config, provenance, has_mask_generator) without loading any tensor."""
    path = Path(path)
    _, written, version, provenance, has_mask = _open(path, tensors=False)
    return as_written(written, version), provenance, has_mask


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> ReidModel:
    """Build the networks a weights file describes and load its tensors, strictly."""
    path = Path(path)
    tensors, written, version, provenance, has_mask = _open(path, tensors=True)
    config = as_written(written, version)
    extractor = FeatureExtractor(config)
    _load_into(path, extractor, "extractor", _strip(tensors, _EXTRACTOR))
    mask_generator = None
    if has_mask:
        mask_generator = MaskGenerator(config)
        _load_into(path, mask_generator, "mask generator", _strip(tensors, _MASK))
    leftover = sorted(k for k in tensors if not k.startswith((_EXTRACTOR, _MASK)))
    if leftover:
        raise WeightsError(f"weights file {path} holds tensors of no known network: {leftover[:3]}")
    extractor.to(device).eval()
    if mask_generator is not None:
        mask_generator.to(device).eval()
    return ReidModel(config, extractor, mask_generator, provenance, written if written != config else None)


def _open(path: Path, tensors: bool) -> tuple[dict[str, torch.Tensor], ModelConfig, int, dict[str, Any], bool]:
    """(tensors, the config as written, the format version, provenance, has_mask_generator)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
        state = load_file(str(path)) if tensors else {}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise WeightsError(f"weights file {path} is corrupt or truncated, or not safetensors: {exc}") from exc
    if metadata.get("format") != FORMAT_NAME:
        raise WeightsError(f"weights file {path} is not a {FORMAT_NAME} file (its 'format' metadata is missing)")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise WeightsError(f"weights file {path} has no valid format_version") from None
    if version > FORMAT_VERSION:
        raise WeightsError(
            f"weights file {path} has format version {version}; this release reads up to {FORMAT_VERSION}"
        )
    try:
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
        provenance = json.loads(metadata.get("provenance", "{}"))
    except (KeyError, TypeError, json.JSONDecodeError, ValueError) as exc:
        raise WeightsError(f"weights file {path} has an invalid model config: {exc}") from exc
    if not any(k.startswith(_EXTRACTOR) for k in keys):
        raise WeightsError(f"weights file {path} holds no extractor tensors")
    return state, config, version, provenance, any(k.startswith(_MASK) for k in keys)


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def _load_into(path: Path, module: torch.nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise WeightsError(
            f"weights file {path} does not fit the {name} its config describes: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
        )
    module.load_state_dict(state)
