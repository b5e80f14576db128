"""The extractor's learning-rate schedule over stage 1 then stage 3."""

from __future__ import annotations

import math

from training.config import TrainConfig


def extractor_epochs(config: TrainConfig) -> int:
    """The epochs the extractor trains, stage 1's and stage 3's, over which its lr schedule runs. All three
    stage lengths count whatever ``stages`` this invocation runs, so a run continued after stage 1 keeps its curve."""
    return config.epochs[0] + config.epochs[2]


def lr_factor(config: TrainConfig, stage: int, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The extractor's lr multiplier at ``step`` of ``epoch`` (0-based, counted in ``stage``): a linear warm-up
    from 0.1 to 1 over its first ``warmup_epochs`` epochs (per step, as fast-reid and torchreid warm up), then
    constant (the paper), cosine to 0 or divided by 10 at each of ``lr_steps``, over stage 1 then stage 3."""
    if stage == 2:
        return 1.0
    done = epoch + (config.epochs[0] if stage == 3 else 0)  # extractor epochs before this one
    t = done + step / max(steps_per_epoch, 1)
    if t < config.warmup_epochs:
        return 0.1 + 0.9 * t / config.warmup_epochs
    if config.lr_schedule == "cosine":
        span = max(extractor_epochs(config) - config.warmup_epochs, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min((t - config.warmup_epochs) / span, 1.0)))
    if config.lr_schedule == "step":
        return 0.1 ** sum(done >= s for s in config.lr_steps)
    return 1.0
