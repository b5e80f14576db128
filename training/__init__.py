"""Offline training (the paper's three stages, or the field's strong recipe), evaluation and export."""

from training.config import RECIPES, TrainConfig, recipe_config
from training.engine import fit, run_stage, train_one_epoch
from training.evaluation import calibrate_thresholds, evaluate, evaluate_rank, k_reciprocal_rerank, rank_metrics
from training.export import export_onnx, export_weights
from training.losses import contiguity_loss, id_loss, identity_loss, mask_loss, sparsity_loss, triplet_loss

__all__ = [
    "RECIPES",
    "TrainConfig",
    "calibrate_thresholds",
    "contiguity_loss",
    "evaluate",
    "evaluate_rank",
    "export_onnx",
    "export_weights",
    "fit",
    "id_loss",
    "identity_loss",
    "k_reciprocal_rerank",
    "mask_loss",
    "rank_metrics",
    "recipe_config",
    "run_stage",
    "sparsity_loss",
    "train_one_epoch",
    "triplet_loss",
]
