"""Offline training of the paper's three stages, evaluation and export."""

from training.config import TrainConfig
from training.engine import evaluate, fit, run_stage, train_one_epoch
from training.evaluation import evaluate_rank, rank_metrics
from training.export import export_onnx, export_weights
from training.losses import contiguity_loss, identity_loss, mask_loss, sparsity_loss, triplet_loss

__all__ = [
    "TrainConfig",
    "contiguity_loss",
    "evaluate",
    "evaluate_rank",
    "export_onnx",
    "export_weights",
    "fit",
    "identity_loss",
    "mask_loss",
    "rank_metrics",
    "run_stage",
    "sparsity_loss",
    "train_one_epoch",
    "triplet_loss",
]
