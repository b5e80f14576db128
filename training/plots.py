"""PNG pictures of a run: the loss and figure curves, a grid like the paper's figure 1 (crops, their generated
masks, and the crops with the top 30% of the mask hidden), and the genuine and impostor distance histograms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import ModelConfig, denormalize, hide_top


def plot_curves(history: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_keys = sorted({k for row in history for k in row if k.startswith("loss")})
    fig_keys = [k for k in ("mAP", "rank1", "mINP", "all_mAP", "all_rank1") if any(k in r for r in history)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    x_all = list(range(1, len(history) + 1))
    for key in loss_keys:
        pts = [(x, r[key]) for x, r in zip(x_all, history, strict=True) if key in r]
        ax1.plot(*zip(*pts, strict=True), label=key)
    for key in fig_keys:
        pts = [(x, r[key]) for x, r in zip(x_all, history, strict=True) if key in r]
        ax2.plot(*zip(*pts, strict=True), marker="o", label=key)
    ax1.set(xlabel="epoch (all stages)", ylabel="loss", title="losses")
    ax2.set(xlabel="epoch (all stages)", ylabel="%", title="evaluation")
    for ax in (ax1, ax2):
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def mask_grid(mask_generator: torch.nn.Module, images: torch.Tensor, config: ModelConfig, path: Path) -> Path:
    """Three rows like figure 1: the crops, their masks (white = important), the crops with the top
    ``mask_ratio`` of the mask hidden."""
    from torchvision.utils import save_image

    was_training = mask_generator.training
    mask_generator.eval()
    mask = mask_generator(images).float()  # (N, 1, H, W)
    mask_generator.train(was_training)
    crops = denormalize(images.float(), config)
    hidden = denormalize(hide_top(images.float(), mask, config.mask_ratio), config)
    grid = torch.cat([crops, mask.expand(-1, 3, -1, -1), hidden])
    save_image(grid.cpu(), path, nrow=len(images), padding=2)
    return path


def distance_histograms(
    genuine: np.ndarray, impostor: np.ndarray, thresholds: list[dict[str, float]], path: Path
) -> Path:
    """The Euclidean distances of genuine and impostor pairs (each normalised to its own count), with a
    vertical line at each calibrated threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    bins = np.linspace(0.0, float(max(genuine.max(), impostor.max())) * 1.02, 80)
    ax.hist(impostor, bins=bins, density=True, alpha=0.5, label=f"impostor pairs ({len(impostor)})")
    ax.hist(genuine, bins=bins, density=True, alpha=0.5, label=f"genuine pairs ({len(genuine)})")
    for t in thresholds:
        ax.axvline(t["distance"], color="k", linestyle="--", linewidth=1)
        ax.text(t["distance"], ax.get_ylim()[1] * 0.9, f" FMR {t['fmr']:g}\n TMR {t['tmr']:.2f}", fontsize=7)
    ax.set(xlabel="Euclidean distance between templates", ylabel="density", title="cross-camera pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
