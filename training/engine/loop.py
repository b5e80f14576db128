"""A run: the epochs of each stage, evaluated every ``eval_every`` epochs and at the end, with ``last.pt`` each
epoch and ``best.pt`` at the best mAP, a CSV log and the plots."""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.devices import resolve_device
from training.checkpoint import RunState, checkpoint_state, restore, save_checkpoint
from training.config import TrainConfig
from training.data.loaders import Loaders
from training.engine.networks import Networks, build_networks
from training.engine.steps import train_one_epoch
from training.evaluation import evaluate

logger = logging.getLogger(__name__)


def _write_log(out: Path, history: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with open(out / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def run_stage(
    stage: int,
    nets: Networks,
    loaders: Loaders,
    config: TrainConfig,
    state: RunState,
    out: Path | None,
    device: torch.device,
    progress: Callable[[Iterable], Iterable] | None = None,
    is_main: bool = True,
) -> RunState:
    """The epochs of one stage from ``state.epoch``; evaluates every ``eval_every`` epochs and at the end,
    writes last.pt each epoch and best.pt at the best standard mAP."""
    total = config.epochs[stage - 1]
    while state.epoch < total:
        epoch = state.epoch
        if loaders.sampler is not None and hasattr(loaders.sampler, "set_epoch"):
            loaders.sampler.set_epoch(sum(config.epochs[: stage - 1]) + epoch)
        started = time.perf_counter()
        losses = train_one_epoch(stage, loaders.train, nets, config, device, progress, epoch)
        state.epoch += 1
        row: dict[str, Any] = {"stage": stage, "epoch": state.epoch, **losses}
        row["epoch_seconds"] = time.perf_counter() - started  # training only, evaluation excluded
        due = config.eval_every > 0 and state.epoch % config.eval_every == 0
        if (due or state.epoch == total) and is_main:
            row.update(evaluate(nets.extractor, loaders.query, loaders.gallery, device, config.rerank))
        logger.info(
            "stage %d epoch %d/%d %s",
            stage,
            state.epoch,
            total,
            " ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float)),
        )
        state.history.append(row)
        if out is not None and is_main:
            if "mAP" in row and row["mAP"] > state.best_map:
                state.best_map = row["mAP"]
                save_checkpoint(out / "best.pt", checkpoint_state(nets, config, state))
            save_checkpoint(out / "last.pt", checkpoint_state(nets, config, state))
            _write_log(out, state.history)
    return state


def fit(
    config: TrainConfig,
    loaders: Loaders,
    out: Path | None = None,
    resume: bool = False,
    nets: Networks | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    is_main: bool = True,
) -> tuple[Networks, RunState]:
    """Run ``config.stages`` in order (resuming from ``out/last.pt`` when asked)."""
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    nets = nets or build_networks(config, device, loaders.train_pids)
    state = RunState(stage=config.stages[0])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            if not (out / "last.pt").is_file():
                raise FileNotFoundError(f"cannot resume: {out / 'last.pt'} does not exist")
            state = restore(out / "last.pt", nets)
            logger.info("resumed at stage %d after epoch %d", state.stage, state.epoch)
        if is_main:  # after a refused resume the run's config.json still describes its checkpoints
            (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    for stage in config.stages:
        if stage < state.stage:
            continue
        if stage > state.stage:
            state.stage, state.epoch = stage, 0
        state = run_stage(stage, nets, loaders, config, state, out, device, progress, is_main)
        if out is not None and is_main:
            _stage_plots(out, state, nets, loaders, config, stage, device)
    return nets, state


def _stage_plots(
    out: Path, state: RunState, nets: Networks, loaders: Loaders, config: TrainConfig, stage: int, device: torch.device
) -> None:
    from training import plots

    try:
        plots.plot_curves(state.history, out / "curves.png")
        if stage in (2, 3) and loaders.figure_images is not None:
            plots.mask_grid(
                nets.mask_generator,
                loaders.figure_images.to(device),
                config.model_config(),
                out / f"masks_stage{stage}.png",
            )
    except Exception:  # a plot must never cost a training run
        logger.exception("could not write the plots of stage %d", stage)
