"""Checkpoints: ``last.pt`` after every epoch and ``best.pt`` at the best mAP, written atomically, holding only
tensors, numbers, strings, lists, tuples and dicts, and read with ``torch.load(weights_only=True)``: a file that
needs anything else (pickled code) is refused. ``checkpoint_state`` and ``restore`` go from a run's networks to
such a file and back."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.config import as_written
from models.files import atomic_path
from models.weights import FORMAT_VERSION
from training.config import TrainConfig
from training.distributed import unwrap

if TYPE_CHECKING:
    from training.engine.networks import Networks


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


@dataclass
class RunState:
    stage: int = 1
    epoch: int = 0  # epochs of ``stage`` completed
    best_map: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)


def checkpoint_state(nets: Networks, config: TrainConfig, state: RunState) -> dict[str, Any]:
    """Tensors, numbers, strings, lists and dicts only, so ``torch.load(weights_only=True)`` reads it."""
    head = {k: v for k, v in nets.train_model.state_dict().items() if not k.startswith("extractor.")}
    return {
        "format_version": FORMAT_VERSION,  # of the networks' meaning, as in a weights file
        "config": config.to_dict(),
        "stage": state.stage,
        "epoch": state.epoch,
        "best_map": state.best_map,
        "history": state.history,
        "extractor": unwrap(nets.extractor).state_dict(),
        "classifier": head,
        "mask_generator": unwrap(nets.mask_generator).state_dict(),
        "opt_extractor": nets.opt_extractor.state_dict(),
        "opt_mask": nets.opt_mask.state_dict(),
        "scaler": nets.scaler.state_dict() if nets.scaler else None,
        "rng": rng_state(),
    }


# ModelConfig settings that change only what is served or how stage 3 hides pixels, not what the weights compute:
# a resumed run may change them.
SERVING_ONLY = frozenset({"neck_feat", "normalize", "flip_average", "mask_ratio"})


def restore(path: Path, nets: Networks) -> RunState:
    """Load a ``last.pt`` into the networks and optimisers; returns where the run stood. A checkpoint whose networks
    were built otherwise (another input size, or a MobileNetV2 written before it honoured ``last_stride``) is
    refused: its weights would load and compute something else."""
    ckpt = load_checkpoint(path)
    written, wanted = checkpoint_config(ckpt).model, unwrap(nets.extractor).config
    differ = {
        f.name: (getattr(written, f.name), getattr(wanted, f.name))
        for f in dataclasses.fields(wanted)
        if f.name not in SERVING_ONLY and getattr(written, f.name) != getattr(wanted, f.name)
    }
    if differ:
        raise ValueError(
            f"cannot resume from {path}: its networks were built with other settings (checkpoint, this run): {differ}; "
            "resume with the checkpoint's settings (a MobileNetV2 checkpoint from before weights format 2 computed "
            "last stride 2, whatever its config.json says)"
        )
    nets.extractor.load_state_dict(ckpt["extractor"])
    head = nets.train_model.state_dict()
    head.update({k: v for k, v in ckpt.get("classifier", {}).items()})
    head.update({f"extractor.{k}": v for k, v in ckpt["extractor"].items()})
    nets.train_model.load_state_dict(head)
    nets.mask_generator.load_state_dict(ckpt["mask_generator"])
    nets.opt_extractor.load_state_dict(ckpt["opt_extractor"])
    nets.opt_mask.load_state_dict(ckpt["opt_mask"])
    if nets.scaler and ckpt.get("scaler"):
        nets.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return RunState(ckpt["stage"], ckpt["epoch"], ckpt["best_map"], ckpt["history"])
