"""The training loops of section 3.3, along their seams:

- ``networks``: the extractor with the ID loss's classifier, the mask generator, optimisers, each stage's modes;
- ``precision``: mixed precision and its per-layer check;
- ``schedule``: the extractor's learning rate;
- ``steps``: one optimisation step of each stage, and an epoch of them;
- ``loop``: ``run_stage`` and ``fit`` (all stages, checkpoints, CSV log, plots).

Evaluation (``extract_features``, ``evaluate``) is ``training.evaluation``'s, and a run's checkpoints
(``checkpoint_state``, ``restore``) ``training.checkpoint``'s.
"""

from training.engine.loop import Loaders, fit, run_stage
from training.engine.networks import Networks, ReidTrainModel, build_networks, running_stats_kept, set_stage_modes
from training.engine.precision import autocast, check_mixed_precision
from training.engine.schedule import extractor_epochs, lr_factor
from training.engine.steps import NonFiniteLossError, train_one_epoch, training_step

__all__ = [
    "Loaders",
    "Networks",
    "NonFiniteLossError",
    "ReidTrainModel",
    "autocast",
    "build_networks",
    "check_mixed_precision",
    "extractor_epochs",
    "fit",
    "lr_factor",
    "run_stage",
    "running_stats_kept",
    "set_stage_modes",
    "train_one_epoch",
    "training_step",
]
