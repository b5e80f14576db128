"""Checkpoints: ``last.pt`` after every epoch and ``best.pt`` at the best mAP, written atomically, holding only
tensors, numbers, strings, lists, tuples and dicts, and read with ``torch.load(weights_only=True)``: a file that
needs anything else (pickled code) is refused."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.config import as_written
from models.files import atomic_path
from models.weights import FORMAT_VERSION
from training.config import TrainConfig


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}
    numpy_state.update(has_gauss=int(has_gauss), cached_gaussian=float(cached))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (a dict of tensors, numbers and state_dicts) so a reader never sees half a file."""
    path = Path(path)
    with atomic_path(path, durable=True) as tmp:  # a resume after a power cut finds the last whole checkpoint
        torch.save(state, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint this package wrote, read with ``weights_only=True``; anything else is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for code, zip or EOF errors for a damaged file
        raise ValueError(
            f"refusing checkpoint {path}: it cannot be read with weights_only=True (only tensors, numbers, "
            f"strings and containers are allowed; it may come from an older release or hold code): {exc}"
        ) from exc
    if not isinstance(state, dict) or "config" not in state or "extractor" not in state:
        raise ValueError(f"checkpoint {path} is not a training checkpoint (no config or extractor)")
    return state


def checkpoint_config(ckpt: dict[str, Any]) -> TrainConfig:
    """A checkpoint's TrainConfig, its model as the checkpoint's networks computed it (checkpoints carry the weights
    format's version from version 2 on; one without it is older)."""
    version = int(ckpt.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise ValueError(f"checkpoint of format version {version}; this release reads up to {FORMAT_VERSION}")
    config = TrainConfig.from_dict(ckpt["config"])
    config.model = as_written(config.model, version)
    return config
