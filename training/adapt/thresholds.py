"""The threshold adapted weights serve by default. A site has no labels to calibrate one on: the candidates are
the source's own calibration and one estimated from the last round's pseudo-identities; ``--eval`` measures the
false-match rate each really gives on the site (docs/TRAINING.md, "The threshold")."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from training.evaluation import calibrate_thresholds, pair_distances, rates_at
from training.export import THRESHOLD_FMRS, fmr_curve


def pseudo_calibration(features: torch.Tensor, labels: np.ndarray, camids: np.ndarray) -> dict[str, Any]:
    """The open-set threshold estimated from pseudo-identities: cross-camera pairs in one cluster as genuine,
    pairs in two as impostors (the left-out crops in none). A site has no labels; how far this estimate is from
    the true false-match rate is measured in docs/TRAINING.md."""
    genuine, impostor = pair_distances(features, features, labels, labels, camids, camids)
    # The genuine pairs are those the clustering found, the close ones, so their true-match rate is not kept: on
    # cuhk01-site it read 0.97 at the FMR 1e-2 threshold where the site's names give 0.76 (seed 0, 256x128 source).
    thresholds = [
        {k: v for k, v in t.items() if k != "tmr"} for t in calibrate_thresholds(genuine, impostor, THRESHOLD_FMRS)
    ]
    return {
        "thresholds": thresholds,
        "fmr_curve": fmr_curve(impostor),
        "threshold_split": "site pseudo-identities (adaptation)",
        "threshold_pairs": {"genuine": len(genuine) // 2, "impostor": len(impostor) // 2},
    }


CALIBRATION_KEYS = ("thresholds", "fmr_curve", "threshold_split", "threshold_pairs")


def default_calibration(source: dict[str, Any], pseudo: dict[str, Any], prefer: str) -> dict[str, Any]:
    """The threshold and score curve the adapted weights serve by default. ``pseudo``: the pseudo-identities'
    estimate; on cuhk01-site its FMR 1e-2 threshold gave a false-match rate of 0.0101 there, the source's 0.0022
    (docs/TRAINING.md). ``source``: the source's own, calibrated on its labelled split, where it has one.
    """
    if prefer == "source" and source.get("thresholds"):
        kept = {k: source[k] for k in CALIBRATION_KEYS if k in source}
        kept["threshold_split"] = f"{source.get('threshold_split', '?')} (the source weights', kept by adaptation)"
        return kept
    return pseudo


def threshold_check(
    source_provenance: dict[str, Any],
    pseudo: dict[str, Any],
    features: torch.Tensor,
    pids: list[int],
    camids: np.ndarray,
) -> list[dict[str, Any]]:
    """--eval: the false-match rate each candidate default threshold really gives on the site."""
    genuine, impostor = pair_distances(features, features, np.asarray(pids), np.asarray(pids), camids, camids)
    candidates = [("pseudo-identities", pseudo["thresholds"])]
    candidates.append(
        (f"source ({source_provenance.get('threshold_split', '?')})", source_provenance.get("thresholds", []))
    )
    return [
        {"candidate": name, "target_fmr": entry["fmr"], "distance": entry["distance"],
         "site_fmr": rates_at(genuine, impostor, entry["distance"])["fmr"]}
        for name, thresholds in candidates
        for entry in thresholds
    ]  # fmt: skip
