"""Is a run's loss from stage 3 in its BatchNorm running statistics? Evaluates each run's final weights as they
are, then with the running statistics of its trained (unfrozen) BatchNorm layers re-estimated on clean training
crops (served pre-processing, train-mode forward, cumulative average, no weights changed).

    python bench/bn_statistics.py runs/cuhk03-table/seed0/strong_masks runs/cuhk03-table/seed0/strong

A stage-3 run trained while the hidden view also fed the running statistics (``--hidden-bn-stats both``) gains
back what that mix cost; a run whose statistics already come from clean crops only should barely move.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import build_eval_transform  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import ImageDataset, build_dataset  # noqa: E402
from training.data.loaders import val_loaders  # noqa: E402
from training.evaluation import evaluate  # noqa: E402
from training.export import networks_from_run  # noqa: E402


@torch.no_grad()
def reestimate_bn(extractor: torch.nn.Module, config: TrainConfig, images: int, seed: int = 0) -> None:
    """Running statistics of the unfrozen BatchNorm layers from ``images`` random clean training crops."""
    dataset = build_dataset(config.dataset, config.root, **config.dataset_kwargs)
    picked = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    loader = torch.utils.data.DataLoader(
        ImageDataset([dataset.train[i] for i in picked], build_eval_transform(config.model)), batch_size=60
    )
    frozen_blocks = extractor.trunk_blocks()[: config.freeze_blocks]
    frozen = {id(m) for block in frozen_blocks for m in block.modules()}
    norms = [
        m for m in extractor.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and id(m) not in frozen
    ]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    extractor.train()
    for block in frozen_blocks:
        block.eval()
    for batch, *_ in loader:
        extractor.forward_neck(batch)
    extractor.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (config.json, last.pt)")
    parser.add_argument("--images", type=int, default=1800, help="clean training crops for the re-estimate")
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    for run in args.runs:
        if not (run / "config.json").is_file():
            sys.exit(f"error: {run} holds no config.json: not a run folder")
        config = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
        query, gallery = val_loaders(config)
        extractor, _, _ = networks_from_run(run, "last")
        before = evaluate(extractor, query, gallery, device)
        reestimate_bn(extractor, config, args.images)
        after = evaluate(extractor, query, gallery, device)
        print(
            f"{run}: as trained mAP {before['mAP']:.1f} rank-1 {before['rank1']:.1f}; "
            f"BN statistics from clean crops mAP {after['mAP']:.1f} rank-1 {after['rank1']:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
