"""Offline training of the paper's three stages, evaluation and export."""

from training.evaluation import evaluate_rank, rank_metrics
from training.losses import contiguity_loss, identity_loss, mask_loss, sparsity_loss, triplet_loss

__all__ = [
    "contiguity_loss",
    "evaluate_rank",
    "identity_loss",
    "mask_loss",
    "rank_metrics",
    "sparsity_loss",
    "triplet_loss",
]
