"""The parity check: a backend serves only when what users see stays the same as with fp32 PyTorch.

On the fixed check set of real crops (``app.backends.crops``) every template must keep a cosine of at least
``MIN_COSINE`` (fp32 backends) or ``MIN_COSINE_REDUCED`` (bf16, INT8) with fp32 PyTorch's, **and** each crop's
nearest neighbour among the others must be the same one for at least ``MIN_NN_AGREEMENT`` of them: a cosine
bar alone lets a backend through that reorders close matches. Without real crops only fp32 backends can be
checked, on a seeded noise batch and by cosine alone. Masks are compared by cosine (flattened)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from app.backends.base import Backend
from models import ModelConfig

MIN_COSINE = 0.999  # fp32 backends, per template (per mask, flattened)
MIN_COSINE_REDUCED = 0.99  # bf16 and INT8 backends
MIN_NN_AGREEMENT = 0.99  # share of check crops whose nearest neighbour is unchanged
PARITY_BATCH = 4  # the noise batch's size, where no real crops are available
FORWARD_BATCH = 32  # the check set goes through each network this many crops at a time


def parity_batch(config: ModelConfig) -> torch.Tensor:
    """The noise batch: seeded normal noise at the network's input size (ImageNet-normalised pixels are roughly
    standard normal)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(PARITY_BATCH, 3, config.input_height, config.input_width, generator=generator)


def cosines(reference: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per-sample cosine similarity of two (B, ...) outputs, each sample flattened."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = got.reshape(len(got), -1).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(1)
    # Two all-zero outputs agree; one zero and one not do not.
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    return np.where(both_zero, 1.0, dots / np.maximum(norms, 1e-30))


def nearest_neighbours(templates: np.ndarray) -> np.ndarray:
    """Each template's nearest other template by L2 distance (the gallery's metric)."""
    t = templates.astype(np.float64)
    squared = (t * t).sum(1)
    distances = squared[:, None] + squared[None, :] - 2 * t @ t.T
    np.fill_diagonal(distances, np.inf)
    return distances.argmin(1)


def nearest_neighbour_agreement(reference: np.ndarray, got: np.ndarray) -> float:
    """Share of templates whose nearest neighbour among the others is the same with ``got`` as with
    ``reference`` (each searched in its own templates, as a gallery embedded by that backend would be)."""
    return float((nearest_neighbours(reference) == nearest_neighbours(got)).mean())


@dataclass(frozen=True)
class Parity:
    backend: str
    cosines: tuple[float, ...]  # per check input
    max_abs_difference: float
    min_cosine: float = MIN_COSINE  # the bar this backend must clear
    nn_agreement: float | None = None  # None: not measured (noise inputs, or masks)
    check_set: str = f"{PARITY_BATCH} seeded noise inputs"
    min_nn_agreement: float = MIN_NN_AGREEMENT

    @property
    def ok(self) -> bool:
        return min(self.cosines) >= self.min_cosine and (
            self.nn_agreement is None or self.nn_agreement >= self.min_nn_agreement
        )

    def describe(self) -> str:
        text = (
            f"{self.backend}: cosine with fp32 PyTorch min {min(self.cosines):.6f} over {len(self.cosines)} "
            f"templates (need >= {self.min_cosine})"
        )
        if self.nn_agreement is not None:
            share, bar = 100 * self.nn_agreement, 100 * self.min_nn_agreement
            text += f", same nearest neighbour for {share:.1f}% (need >= {bar:g}%)"
        return f"{text}, max |difference| {self.max_abs_difference:.3g}; check set: {self.check_set}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "min_cosine": round(min(self.cosines), 6),
            "required_cosine": self.min_cosine,
            "nn_agreement": None if self.nn_agreement is None else round(self.nn_agreement, 4),
            "required_nn_agreement": None if self.nn_agreement is None else self.min_nn_agreement,
            "check_set": self.check_set,
        }


def run_batched(call: Any, inputs: torch.Tensor) -> np.ndarray:
    """``call`` over ``inputs`` ``FORWARD_BATCH`` at a time, concatenated."""
    return np.concatenate([np.asarray(call(chunk)) for chunk in inputs.split(FORWARD_BATCH)])


def reference_outputs(reference: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    """fp32 PyTorch's outputs on ``inputs`` (on the module's own device), float32 NumPy."""
    device = next(reference.parameters()).device
    with torch.inference_mode():
        return run_batched(lambda x: reference(x.to(device)).float().cpu().numpy(), inputs)


def check_parity(
    reference: nn.Module | np.ndarray,
    backend: Backend,
    inputs: torch.Tensor | ModelConfig,
    *,
    min_cosine: float = MIN_COSINE,
    min_nn_agreement: float = MIN_NN_AGREEMENT,
    templates: bool = True,
    check_set: str | None = None,
) -> Parity:
    """``backend`` against fp32 PyTorch on ``inputs`` (a ModelConfig: the noise batch). ``reference`` is the fp32
    module or its outputs on ``inputs``, computed once for several backends. With ``templates`` and real crops
    (``check_set`` named), the nearest-neighbour agreement is measured too."""
    if isinstance(inputs, ModelConfig):
        inputs, check_set = parity_batch(inputs), None
    expected = reference if isinstance(reference, np.ndarray) else reference_outputs(reference, inputs)
    got = run_batched(backend, inputs)
    label = check_set or f"{len(inputs)} seeded noise inputs"
    if got.shape != expected.shape:
        return Parity(
            backend.name, (float("-inf"),) * len(inputs), float("inf"), min_cosine, None, label, min_nn_agreement
        )
    agreement = nearest_neighbour_agreement(expected, got) if templates and check_set else None
    return Parity(
        backend.name,
        tuple(float(c) for c in cosines(expected, got)),
        float(np.abs(got - expected).max()),
        min_cosine,
        agreement,
        label,
        min_nn_agreement,
    )
