"""Which linkage re-groups sightings best: the service's re-grouping (``app.regroup.link``: connected components of
the kNN pairs within a k-reciprocal Jaccard eps and under the join threshold) against DBSCAN on the same pairs,
HDBSCAN and average linkage on the same Jaccard distances, each over a sweep of its one setting; and the service's
with other query expansions (the Jaccard distance's k2).

    python -m bench.linkage --weights runs/strong/model.safetensors
    python -m bench.linkage --weights runs/strong/model.safetensors --root ../shared/data/cuhk01-site

The val crops are embedded once by the service's own embedder (fp32 PyTorch, as served) and grouped offline:
every crop alone (``crops``), and each person's shots from one camera as one unit, its template the mean of its
crops' (``tracklets``). Scored as bench.sightings scores the service (pairwise and BCubed; people found against
the true number). Each camera's mean is taken out first, as the service does. For tracklets, the service's
components also run with each mean's averaged-out spread added back before the threshold (as the service now
does), and so do the other query expansions' rows; DBSCAN, average linkage and HDBSCAN take the means as they are.

HDBSCAN and average linkage need every pair's distance: here the dense Jaccard matrix of up to a few thousand
units (``models.clustering.jaccard_distance``), which the service could not hold at 1e5 sightings.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from PIL import Image

from app.config import Settings
from app.embedder import Embedder
from app.regroup import CENTRING_MIN_UNITS, JACCARD_K2, NEIGHBOURS, Linkage, knn_graph, link
from app.search import weights_threshold
from app.sightings import averaged_out
from bench.common import Table, add_common_args, report, require_weights_and_manifest, setup
from bench.sightings import SHARED_CUHK03, scores, val_rows
from models.clustering import camera_centred, jaccard_distance, jaccard_pairs, noise_alone, pair_distances

logger = logging.getLogger("bench.linkage")

EPS_SWEEP = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
HDBSCAN_MIN_SAMPLES = (1, 2, 3)
# The Jaccard distance's k2 tried against the service's JACCARD_K2 (2): none, 3, and Zhong et al.'s 6
QUERY_EXPANSION_PROBES = (1, 3, 6)
EMBED_BATCH = 64


def embed(weights: Path, rows: list[tuple[Path, int, int]]) -> tuple[np.ndarray, float | None]:
    """The crops' templates as the service stores them, and the weights' calibrated join threshold (None: none)."""
    with tempfile.TemporaryDirectory(prefix="bench-linkage-") as data_dir:
        settings = Settings(
            data_dir=Path(data_dir), weights=weights, device="cpu", backend="torch", allow_unauthenticated=True
        )  # no routes are served: nothing to authenticate
        embedder = Embedder.from_settings(settings)
        calibrated = weights_threshold(embedder.provenance, settings.threshold_fmr)
        out = []
        for start in range(0, len(rows), EMBED_BATCH):
            images = [Image.open(p).convert("RGB") for p, _, _ in rows[start : start + EMBED_BATCH]]
            out.append(embedder.embed_sync(images))
    return np.concatenate(out).astype(np.float32), None if calibrated is None else calibrated[0]


def units_of(rows: list[tuple[Path, int, int]], templates: np.ndarray, mode: str) -> tuple[np.ndarray, list, list]:
    """(unit templates, unit cameras, each unit's crop rows)."""
    if mode == "crops":
        members = [[i] for i in range(len(rows))]
    else:
        by_track: dict[tuple[int, int], list[int]] = {}
        for i, (_, pid, camid) in enumerate(rows):
            by_track.setdefault((pid, camid), []).append(i)
        members = [by_track[key] for key in sorted(by_track)]
    unit_templates = np.stack([templates[m].mean(axis=0) for m in members]).astype(np.float32)
    return unit_templates, [f"c{rows[m[0]][2]}" for m in members], members


def _dense_jaccard(templates: np.ndarray, cameras: list, threshold: float) -> np.ndarray:
    """Every pair's Jaccard distance, 1 where the pair lies over the join threshold (as ``link`` keeps it out)."""
    x = camera_centred(templates, np.array(cameras), min_rows=CENTRING_MIN_UNITS)
    d = np.asarray(jaccard_distance(x, NEIGHBOURS, JACCARD_K2, dense_limit=len(x)), dtype=np.float64)
    sq = (templates.astype(np.float64) ** 2).sum(axis=1)
    l2 = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * templates.astype(np.float64) @ templates.T, 0.0))
    d[l2 > threshold] = 1.0
    d = np.minimum(d, d.T)  # k-reciprocal encodings are not quite symmetric after query expansion
    np.fill_diagonal(d, 0.0)
    return d


def spread_lost(templates: np.ndarray, members: list[list[int]]) -> np.ndarray:
    """Per unit, the squared distance its mean lost to averaging: the service's ``averaged_out`` for a mean."""
    return np.array([averaged_out(templates[m].astype(np.float64), (), "mean") for m in members])


def groupings(
    templates: np.ndarray, cameras: list, threshold: float, lost: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Labels per unit for every method and setting; with ``lost`` (tracklets), the service's components again
    with each unit's averaged-out spread added back before the threshold."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform
    from sklearn.cluster import DBSCAN, HDBSCAN

    out: dict[str, np.ndarray] = {}
    x = camera_centred(templates, np.array(cameras), min_rows=CENTRING_MIN_UNITS)
    pairs, jaccard = jaccard_pairs(x, knn_graph(x, NEIGHBOURS + 1), NEIGHBOURS, JACCARD_K2)
    l2 = pair_distances(templates, pairs)
    n = len(templates)
    dense = _dense_jaccard(templates, cameras, threshold)
    tree = linkage(squareform(dense, checks=False), method="average")
    for eps in EPS_SWEEP:
        out[f"components (the service), eps {eps}"] = link(templates, cameras, threshold, Linkage.one_eps(eps))
        if lost is not None and lost.any():
            out[f"components, spread added back, eps {eps}"] = link(
                templates, cameras, threshold, Linkage.one_eps(eps), averaged_out=lost
            )
        for k2 in QUERY_EXPANSION_PROBES:
            out[f"components, query expansion {k2}, eps {eps}"] = link(
                templates, cameras, threshold, Linkage.one_eps(eps, k2=k2), averaged_out=lost
            )
        keep = (jaccard <= eps) & (l2 <= threshold)
        p = pairs[keep]
        # Sparse precomputed DBSCAN counts only stored entries as neighbours: a Jaccard of 0 is stored as 1e-9.
        values = np.maximum(jaccard[keep].astype(np.float64), 1e-9)
        rows, cols = np.concatenate([p[:, 0], p[:, 1]]), np.concatenate([p[:, 1], p[:, 0]])
        graph = sp.csr_matrix((np.concatenate([values, values]), (rows, cols)), shape=(n, n))
        for min_samples in (3, 4):
            labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(graph)
            out[f"DBSCAN min_samples {min_samples}, eps {eps}"] = noise_alone(labels)
        out[f"average linkage, cut at {eps}"] = fcluster(tree, t=eps, criterion="distance")
    for min_samples in HDBSCAN_MIN_SAMPLES:
        for selection in ("eom", "leaf"):
            labels = HDBSCAN(
                min_cluster_size=2,
                min_samples=min_samples,
                cluster_selection_method=selection,
                metric="precomputed",
                copy=True,
            ).fit_predict(dense)
            out[f"HDBSCAN min_samples {min_samples}, {selection}"] = noise_alone(labels)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.linkage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="the weights file served")
    parser.add_argument("--root", type=Path, default=SHARED_CUHK03, help="a data set with manifest.csv (val split)")
    parser.add_argument("--modes", default="crops,tracklets", help="crops, tracklets or both (comma)")
    parser.add_argument(
        "--threshold", type=float, default=None, help="the join threshold (default: the weights' calibrated one)"
    )
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    require_weights_and_manifest(parser, args)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in ("crops", "tracklets") for m in modes):
        parser.error(f"--modes takes crops and/or tracklets, got {args.modes!r}")
    results = setup(args)
    started = time.time()
    rows = val_rows(args.root)
    if not rows:
        parser.exit(2, f"{parser.prog}: {args.root}/manifest.csv has no val rows\n")
    templates, calibrated = embed(args.weights, rows)
    threshold = args.threshold if args.threshold is not None else calibrated
    if threshold is None:
        parser.exit(2, f"{parser.prog}: {args.weights} carries no calibrated threshold: give --threshold\n")
    logger.info("embedded %d crops; join threshold %.2f", len(rows), threshold)
    table = Table(
        f"Re-grouping {args.root.name}'s val crops by linkage (join threshold {threshold:.2f})",
        ["sent as", "method", "pair precision", "pair recall", "BCubed F", "people found (true)"],
    )
    for mode in modes:
        unit_templates, cameras, members = units_of(rows, templates, mode)
        lost = spread_lost(templates, members)
        for name, labels in groupings(unit_templates, cameras, threshold, lost).items():
            per_crop = np.empty(len(rows), np.int64)
            for u, m in enumerate(members):
                per_crop[m] = labels[u]
            s = scores([str(v) for v in per_crop.tolist()], [r[1] for r in rows])
            table.add(
                mode, name, s["pair_precision"], s["pair_recall"], s["bcubed_f"], f"{s['people']} ({s['true_people']})"
            )
    report("Linkage for re-grouping", "bench.linkage", [table], started, results, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
