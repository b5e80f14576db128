"""The loaders a run reads: the training split through the P x K sampler with the training augmentation, and the
query and gallery splits with the served pre-processing."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import ModelConfig, build_eval_transform
from training.config import TrainConfig
from training.data import build_dataset
from training.data.base import Batch, ImageDataset
from training.samplers import RandomIdentitySampler
from training.transforms import build_train_transform, split_train_transform


@dataclass
class Loaders:
    train: Iterable[Batch]
    query: Iterable[Batch]
    gallery: Iterable[Batch]
    sampler: Any = None  # has set_epoch(epoch) when it is the P x K sampler
    figure_images: torch.Tensor | None = None  # (N, 3, H, W) normalised crops for the figure-1 grid
    train_pids: list[int] | None = None  # the training identities, for the ID loss's classifier



def val_loaders(config: TrainConfig, model_config: ModelConfig | None = None, workers: int = 0) -> tuple[Any, Any]:
    """Query and gallery loaders of ``config``'s data set with the served pre-processing."""
    if not Path(config.root).exists():
        raise FileNotFoundError(f"data set root {config.root} does not exist")
    dataset = build_dataset(config.dataset, config.root, **config.dataset_kwargs)
    transform = build_eval_transform(model_config or config.model_config())
    kw = dict(batch_size=128, shuffle=False, num_workers=workers)
    return (
        torch.utils.data.DataLoader(ImageDataset(dataset.query, transform), **kw),
        torch.utils.data.DataLoader(ImageDataset(dataset.gallery, transform), **kw),
    )



def build_loaders(config: TrainConfig, rank: int = 0, world_size: int = 1) -> Loaders:
    """Train (P x K sampler), query and gallery loaders from the data package."""
    if not Path(config.root).exists():
        raise FileNotFoundError(f"data set root {config.root} does not exist")
    dataset = build_dataset(config.dataset, config.root, **config.dataset_kwargs)
    if not dataset.train:
        raise ValueError(f"{config.root} has no train images: fit needs some (evaluate does not)")
    model_config = config.model_config()
    sampler = RandomIdentitySampler(
        dataset.train,
        num_pids=config.p,
        num_instances=config.k,
        seed=config.seed,
        rank=rank,
        world_size=world_size,
        max_batches=config.epoch_batches,
    )
    augmentation = {"erasing_p": config.random_erasing, "jitter_p": config.color_jitter}
    if config.cache_images:
        prepare, augment = split_train_transform(model_config, **augmentation)
        train_set = ImageDataset(dataset.train, augment, prepare)
    else:
        train_set = ImageDataset(dataset.train, build_train_transform(model_config, **augmentation))
    train = torch.utils.data.DataLoader(
        train_set,
        batch_size=config.p * config.k,
        sampler=sampler,
        drop_last=True,
        num_workers=config.workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=config.workers > 0,
    )
    query, gallery = val_loaders(config, workers=config.workers)
    figure = torch.stack([query.dataset[i][0] for i in range(min(8, len(query.dataset)))])
    return Loaders(train, query, gallery, sampler, figure, sorted({s.pid for s in dataset.train}))
