"""Real crops for the backends: a fixed check set for the parity check and a calibration set for INT8, both read
from a folder (REID_CALIBRATION_DIR, or the gallery's own stored crops)."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from models import ModelConfig, build_eval_transform

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CHECK_CROPS = 128  # the parity check's set: 1 nearest neighbour of 128 may differ at the 99% bar
CALIBRATION_CROPS = 300  # NNCF's default subset size; ONNX Runtime's calibration reads as many
MIN_CROPS = 16  # fewer real crops than this make no check set (the noise batch is used, and INT8 is refused)
MASK_CHECK_CROPS = 32  # the mask generator is checked on fewer: it costs ~2x the extractor per crop


@dataclass(frozen=True)
class ReferenceCrops:
    source: str  # e.g. "128 crops of data/crops"
    check: torch.Tensor  # (n, 3, H, W) preprocessed: the parity check's fixed set
    calibration: torch.Tensor  # (m, 3, H, W) preprocessed: INT8 calibration; disjoint from check when there are enough


def image_files(folder: Path) -> list[Path]:
    """Every image under ``folder``, sorted by path (the same folder always gives the same list)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def shuffled_files(folder: Path | None) -> list[Path]:
    """Every image under ``folder`` in the fixed order the sets are drawn from: shuffled with a fixed seed, so that
    a folder sorted by person still gives many people to each set (the check set is the first ``CHECK_CROPS``)."""
    files = image_files(folder) if folder is not None else []
    random.Random(0).shuffle(files)
    return files


def _load(paths: list[Path], config: ModelConfig) -> list[torch.Tensor]:
    transform = build_eval_transform(config)
    tensors = []
    for path in paths:
        try:
            with Image.open(path) as image:
                tensors.append(transform(image.convert("RGB")))
        except (OSError, UnidentifiedImageError, ValueError) as exc:  # a truncated or foreign file: skip it
            logger.warning("skipping %s for the backend check and calibration: %s", path, exc)
    return tensors


def reference_crops(
    folder: Path | None,
    config: ModelConfig,
    check_size: int = CHECK_CROPS,
    calibration_size: int = CALIBRATION_CROPS,
) -> ReferenceCrops | None:
    """The check and calibration sets from ``folder``, or None when it holds fewer than ``MIN_CROPS`` images.

    The files are drawn in ``shuffled_files``' order: the check set is the first ``check_size``, calibration the
    next ``calibration_size``. With too few files for two sets (fewer than check_size + MIN_CROPS), calibration
    reuses the check set's crops."""
    files = shuffled_files(folder)
    if len(files) < MIN_CROPS:
        return None
    check_files = files[:check_size]
    rest = files[check_size : check_size + calibration_size]
    disjoint = len(rest) >= MIN_CROPS
    check = _load(check_files, config)
    calibration = _load(rest if disjoint else files[:calibration_size], config)
    if len(check) < MIN_CROPS or len(calibration) < MIN_CROPS:
        return None
    shared = "" if disjoint else ", calibration reusing them"
    return ReferenceCrops(f"{len(check)} crops of {folder}{shared}", torch.stack(check), torch.stack(calibration))
