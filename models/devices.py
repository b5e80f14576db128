"""One reading of a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:1``) for the service, training and benches."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one; a CUDA device asked for where CUDA is missing is an error, not a
    silent fallback to the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use auto or cpu")
    return torch.device(name)
