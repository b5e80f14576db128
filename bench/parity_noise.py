"""How strict is the parity check's nearest-neighbour bar on a check set? The fp32 templates of the service's check
set (``app.backends.crops.shuffled_files``: the same crops) with isotropic noise added at a given cosine, as a
backend that drifts that far in no preferred direction would: the share of crops whose nearest neighbour stays
the same, over several draws. A bar of 99% that noise at the fp32 bar's cosine (0.999) already misses says the
check set's neighbours are near ties.

    python -m bench.parity_noise --weights runs/strong/model.safetensors --crops ../shared/data/cuhk03-detected/train

The check set's structure is reported too: how many crops have another crop of their person in the set (the
person read from the file name by ``--person-pattern``) and how close each crop's two nearest neighbours are."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app.backends.crops import CHECK_CROPS, MIN_CROPS, shuffled_files
from app.backends.parity import nearest_neighbours
from bench.common import Table, add_common_args, report, setup
from models import load_weights, preprocess_batch

COSINES = (0.9999, 0.9998, 0.999, 0.998, 0.995, 0.99)


def with_noise(templates: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """``templates`` each moved to exactly ``cosine`` with itself, in a random direction orthogonal to it."""
    t = templates.astype(np.float64)
    noise = rng.standard_normal(t.shape)
    noise -= (noise * t).sum(1, keepdims=True) / (t * t).sum(1, keepdims=True) * t
    scale = np.linalg.norm(t, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True)
    return t + noise * scale * np.tan(np.arccos(cosine))


def noise_agreement(templates: np.ndarray, cosine: float, draws: int, seed: int = 0) -> list[float]:
    """Per draw, the share of templates whose nearest neighbour is unchanged by noise at ``cosine``."""
    rng = np.random.default_rng(seed)
    reference = nearest_neighbours(templates)
    return [float((nearest_neighbours(with_noise(templates, cosine, rng)) == reference).mean()) for _ in range(draws)]


def neighbour_margins(templates: np.ndarray) -> np.ndarray:
    """Per template, how much farther its second nearest neighbour is than its first (d2 / d1 - 1)."""
    t = templates.astype(np.float64)
    squared = (t * t).sum(1)
    d = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * t @ t.T, 0))
    np.fill_diagonal(d, np.inf)
    two = np.sort(d, axis=1)[:, :2]
    return two[:, 1] / np.maximum(two[:, 0], 1e-12) - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True, help="weights file (safetensors)")
    parser.add_argument("--crops", type=Path, required=True, help="folder of crops, as REID_CALIBRATION_DIR")
    parser.add_argument("--cosines", default=",".join(map(str, COSINES)), help="noise levels, comma-separated")
    parser.add_argument("--draws", type=int, default=20, help="noise draws per level")
    parser.add_argument(
        "--person-pattern", default=r"^([^_]+)_", help="regex whose first group is the person in a file name"
    )
    add_common_args(parser)
    args = parser.parse_args(argv)
    results = setup(args)
    started = time.time()
    try:
        cosines = [float(c) for c in args.cosines.split(",")]
    except ValueError:
        sys.exit(f"error: --cosines must be numbers separated by commas, got {args.cosines!r}")
    if not all(0 < c <= 1 for c in cosines) or args.draws < 1:
        sys.exit("error: each cosine must be in (0, 1] and --draws at least 1")
    files = shuffled_files(args.crops)
    if len(files) < MIN_CROPS:
        sys.exit(f"error: {args.crops} holds {len(files)} images; the service needs {MIN_CROPS} for a check set")
    check = files[:CHECK_CROPS]
    model = load_weights(args.weights)
    images = [Image.open(p).convert("RGB") for p in check]
    with torch.no_grad():
        templates = model.extractor(preprocess_batch(images, model.config)).numpy()

    pattern = re.compile(args.person_pattern)
    people = np.array([(m.group(1) if (m := pattern.search(p.name)) else p.name) for p in check])
    nearest = nearest_neighbours(templates)
    margins = neighbour_margins(templates)
    table = Table(
        "The parity check's nearest-neighbour bar under isotropic noise (bench.parity_noise)",
        ["noise: cosine with fp32", "same nearest neighbour, mean", "min", "max", "draws"],
    )
    for cosine in cosines:
        shares = noise_agreement(templates, cosine, args.draws)
        mean, least, most = (f"{100 * v:.1f}%" for v in (np.mean(shares), min(shares), max(shares)))
        table.add(f"{cosine:g}", mean, least, most, args.draws)
    with_mate = int(sum((people == p).sum() > 1 for p in people))
    table.notes += [
        f"Check set: the service's, {len(check)} crops of {args.crops} (seeded shuffle, as app.backends.crops); "
        f"templates of {args.weights} in fp32 PyTorch.",
        f"Its structure: {with_mate} of {len(check)} crops have another crop of their person in the set; "
        f"{int((people[nearest] == people).sum())} nearest neighbours are the same person. Margin of the second "
        f"nearest over the first (d2 / d1 - 1): median {np.median(margins):.3f}; under 1%: "
        f"{int((margins < 0.01).sum())} crops, under 2%: {int((margins < 0.02).sum())}.",
        "Noise: per template, a random direction orthogonal to it, scaled to the cosine given; the nearest neighbour "
        "is searched among the noisy templates, as a gallery embedded by that backend would be.",
    ]
    report("Parity bar under noise", "bench.parity_noise", [table], started, results, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
