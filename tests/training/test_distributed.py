"""DistributedDataParallel with SyncBatchNorm: 2 gloo ranks on the CPU, each with half of a global batch, end
with the weights one process reaches on the whole batch (the strong recipe, stages 1 and 3)."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.test_engine import SMALL, BlobIds
from training.config import TrainConfig
from training.engine import build_networks, set_stage_modes, training_step

P, K = 4, 3  # per rank; the global batch is 2 x P x K


def _config(**overrides) -> TrainConfig:
    return TrainConfig(**{**SMALL, "p": P, "k": K, **overrides}, id_loss_weight=1.0, label_smoothing=0.1)


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """2P identities x K images; rank r takes the r-th half (whole identities)."""
    ds = BlobIds(2 * P, K, seed=5)
    return torch.stack([ds[i][0] for i in range(len(ds))]), torch.tensor([ds[i][1] for i in range(len(ds))])


def _step(stage: int, rank: int, world_size: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Fresh networks (same seed everywhere), one step of ``stage`` on this rank's share; the weights after it.

    One step from the same weights: batch-hard mining on untrained, nearly alike features has near-ties, and
    after a step the float noise between two equal computations can flip one of them. SGD, as Adam's first
    step is sign-like (lr * g / |g|) and turns float noise in near-zero gradients into moves of +-lr."""
    torch.manual_seed(0)
    config = _config()
    nets = build_networks(config, torch.device("cpu"), train_pids=list(range(2 * P)))
    assert nets.world_size == world_size
    nets.train_model.to(dtype)
    nets.mask_generator.to(dtype)
    nets.opt_extractor = torch.optim.SGD(nets.train_model.parameters(), lr=0.01)
    nets.opt_mask = torch.optim.SGD(nets.mask_generator.parameters(), lr=0.01)
    images, pids = _global_batch()
    share = slice(rank * len(pids) // world_size, (rank + 1) * len(pids) // world_size)
    set_stage_modes(stage, nets)
    training_step(stage, images[share].to(dtype), pids[share], nets, config, torch.device("cpu"))
    state = {f"model.{k}": v for k, v in nets.train_model.state_dict().items()}
    state.update({f"mask.{k}": v for k, v in nets.mask_generator.state_dict().items()})
    return {k: v.detach().clone().float() for k, v in state.items()}


def _train(rank: int, world_size: int, dtype: torch.dtype = torch.float32) -> dict[int, dict[str, torch.Tensor]]:
    return {stage: _step(stage, rank, world_size, dtype) for stage in (1, 3)}


def _worker(rank: int, world_size: int, port: int, out_dir: str, train: Callable[[int, int], Any]) -> None:
    """One gloo rank: ``train(rank, world_size)``'s result saved as ``out_dir/rank{rank}.pt``."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        torch.save(train(rank, world_size), f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _two_ranks(train: Callable[[int, int], Any], tmp_path: Path) -> tuple[Any, Any]:
    """``train`` run on 2 gloo ranks (processes); what rank 0 and rank 1 returned."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(2, port, str(tmp_path), train), nprocs=2, join=True)
    return torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")


@pytest.mark.slow
def test_two_gloo_ranks_train_like_one_process_with_the_global_batch(tmp_path) -> None:
    rank0, rank1 = _two_ranks(_train, tmp_path)
    # The reference is one float64 process. Measured on a 2-core Xeon with AMX: one float32 process lands up to 1%
    # away from it in the stem's and layer1's updates, while the 2 ranks, whose synchronised statistics are
    # computed in float64, stay within 1e-4 of it. On a CPU without AVX-512 (an AMD EPYC here) float32's own
    # rounding moves the stem 1.8% from float64, in one process as in two: the bar is then what one float32
    # process reaches, with room to spare, never less than 1e-3.
    single = _train(0, 1, torch.float64)
    single32 = _train(0, 1, torch.float32)
    torch.manual_seed(0)
    initial = build_networks(_config(), torch.device("cpu"), train_pids=list(range(2 * P)))
    start = {f"model.{k}": v.float() for k, v in initial.train_model.state_dict().items()}
    start.update({f"mask.{k}": v.float() for k, v in initial.mask_generator.state_dict().items()})
    for stage in (1, 3):
        moved_any = False
        for name, value in single[stage].items():
            assert torch.equal(rank0[stage][name], rank1[stage][name]), name  # the ranks stay in step
            if name == "model.extractor.head.0.bias":
                continue  # a conv bias right before a BatchNorm: its gradient is 0 up to rounding
            moved, expected = rank0[stage][name] - start[name], value - start[name]
            # The extractor's gradients agree to about 1e-5; the mask generator's (tiny, from cancelling terms
            # through the extractor) to about 1e-2 of their size.
            scale = expected.norm().clamp_min(1e-12)
            float32_error = float(((single32[stage][name] - start[name]) - expected).norm() / scale)
            rtol = 2e-2 if name.startswith("mask.") else max(1e-3, 2 * float32_error)
            error = (moved - expected).norm() / scale
            assert error < rtol or expected.norm() < 1e-7, (stage, name, float(error))
            moved_any |= name.startswith("model.extractor") and bool(expected.abs().max() > 1e-5)
        assert moved_any, stage


def _train_bf16(rank: int, world_size: int) -> dict[str, Any]:
    """Stages 1 and 3 in bf16 autocast on this rank's share: the synchronised BatchNorm and the gathered features
    meet bf16 activations (128x64: at 64x32 oneDNN's bf16 fault is refused). The losses and the weights after."""
    torch.manual_seed(0)
    model = dataclasses.replace(SMALL["model"], input_height=128, input_width=64)
    config = _config(amp="bf16", channels_last=True, model=model)
    nets = build_networks(config, torch.device("cpu"), train_pids=list(range(2 * P)))
    images, pids = _global_batch()
    images = torch.nn.functional.interpolate(images, size=(128, 64)).contiguous(memory_format=torch.channels_last)
    share = slice(rank * len(pids) // world_size, (rank + 1) * len(pids) // world_size)
    losses = {}
    for stage in (1, 3):
        set_stage_modes(stage, nets)
        losses[stage] = training_step(stage, images[share], pids[share], nets, config, torch.device("cpu"))
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in nets.train_model.state_dict().items()}}


@pytest.mark.slow
def test_two_gloo_ranks_train_in_step_in_bf16(tmp_path) -> None:
    rank0, rank1 = _two_ranks(_train_bf16, tmp_path)
    for stage in (1, 3):
        assert rank0["losses"][stage].keys() == rank1["losses"][stage].keys()
        for name, value in rank0["losses"][stage].items():
            assert torch.isfinite(value) and torch.equal(value, rank1["losses"][stage][name]), (stage, name)
    for name, value in rank0["state"].items():
        assert value.dtype == rank1["state"][name].dtype and torch.equal(value, rank1["state"][name]), name
        if "running" in name:
            assert value.dtype == torch.float32, name  # the synchronised statistics stay fp32


def test_ibn_networks_are_refused_a_synchronised_form_with_a_sentence() -> None:
    """torch's SyncBatchNorm conversion would turn IBN's layers into plain batch norms."""
    from models import ModelConfig, build_extractor
    from training.distributed import convert_sync_batchnorm

    extractor = build_extractor(ModelConfig(backbone="resnet18", feat_dim=16, ibn=True))
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="IBN networks train in one process"):
            convert_sync_batchnorm(extractor, torch.device(device))
