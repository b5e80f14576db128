"""The identity of a template space: which weights made an embedding.

Two extractors give comparable templates only when their config and every tensor agree, so the fingerprint
hashes exactly those. The gallery records it beside its embeddings, and the service caches derived graphs
(ONNX) under it."""

from __future__ import annotations

import hashlib
import json

import torch

from models.config import ModelConfig


def extractor_fingerprint(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 (hex, 64 characters) of the config as sorted JSON and each tensor's name, dtype, shape and bytes.

    Buffers count (BN running statistics change the templates); the order of ``state_dict`` does not."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d buffers too
    return digest.hexdigest()
