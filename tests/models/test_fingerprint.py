"""The fingerprint tells template spaces apart: same weights, same print; any tensor or setting changed, another."""

from __future__ import annotations

import torch

from models import FeatureExtractor, ModelConfig, extractor_fingerprint

CONFIG = ModelConfig(backbone="resnet18", feat_dim=16, input_height=64, input_width=32, unet_base_width=4)


def test_same_weights_same_fingerprint_in_any_order():
    torch.manual_seed(0)
    state = FeatureExtractor(CONFIG).state_dict()
    reordered = dict(reversed(list(state.items())))
    first = extractor_fingerprint(CONFIG, state)
    assert len(first) == 64
    assert first == extractor_fingerprint(CONFIG, reordered)
    assert first == extractor_fingerprint(CONFIG, {k: v.clone() for k, v in state.items()})


def test_a_changed_tensor_buffer_or_setting_changes_it():
    torch.manual_seed(0)
    state = FeatureExtractor(CONFIG).state_dict()
    base = extractor_fingerprint(CONFIG, state)
    weight = next(k for k in state if k.endswith("weight"))
    nudged = dict(state, **{weight: state[weight] + 1e-6})
    buffer = next(k for k in state if k.endswith("running_mean"))
    moved = dict(state, **{buffer: state[buffer] + 1.0})
    other_config = ModelConfig(**{**CONFIG.to_dict(), "mask_ratio": 0.2})
    prints = {base, extractor_fingerprint(CONFIG, nudged), extractor_fingerprint(CONFIG, moved)}
    prints.add(extractor_fingerprint(other_config, state))
    assert len(prints) == 4
