"""The search behind ``POST /query``: one batched FAISS search per request (filters applied inside FAISS), one
read of the few columns an answer shows, track queries, and the default threshold the weights carry."""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import numpy as np

from app.gallery import EntryFilter, Gallery
from app.schemas import IdentityMatch, Match

logger = logging.getLogger(__name__)

Track = Literal["none", "mean", "min"]
TRACKS: tuple[Track, ...] = ("none", "mean", "min")


def similarity(distance: float) -> float:
    """1 / (1 + d) for the Euclidean distance d: 1 for identical templates, towards 0 far away."""
    return 1.0 / (1.0 + distance)


def search(
    gallery: Gallery, vectors: np.ndarray, top_k: int, where: EntryFilter | None = None, track: Track = "none"
) -> list[list[Match]]:
    """The ``top_k`` nearest entries, nearest first: per query vector (``track="none"``), or one ranking for all
    the vectors as crops of one tracklet: from their mean template (``"mean"``) or by each entry's best distance
    to any of them (``"min"``).

    ``"min"`` is exact from each vector's own top-k: an entry in the joint top-k is nearest to some vector v, and
    every entry nearer to v than it ranks before it jointly, so fewer than k of them exist and it is in v's top-k.
    """
    if track not in TRACKS:
        raise ValueError(f"unknown track {track!r}; choose {', '.join(TRACKS)}")
    queries = vectors.mean(axis=0, keepdims=True) if track == "mean" else vectors
    squared, ids = gallery.search(queries, top_k, where)  # one batched search: (n, k) each
    rows: list[list[tuple[int, float]]]
    if track == "min":
        best: dict[int, float] = {}
        for i, d in zip(ids.ravel().tolist(), squared.ravel().tolist(), strict=True):
            if i >= 0 and d < best.get(i, math.inf):
                best[i] = d
        rows = [sorted(best.items(), key=lambda item: (item[1], item[0]))[:top_k]]
    else:
        rows = [
            [(i, d) for i, d in zip(row_ids.tolist(), row_d.tolist(), strict=True) if i >= 0]
            for row_ids, row_d in zip(ids, squared, strict=True)
        ]
    summaries = gallery.summaries(sorted({i for row in rows for i, _ in row}))  # one read, no embeddings
    results = []
    for row in rows:
        matches = []
        for entry_id, d2 in row:
            summary = summaries.get(entry_id)
            if summary is None:
                continue  # deleted between the search and the read
            distance = float(np.sqrt(max(d2, 0.0)))
            matches.append(
                Match(
                    id=entry_id,
                    identity=summary.identity,
                    camera=summary.camera,
                    captured_at=summary.captured_at,
                    distance=distance,
                    similarity=similarity(distance),
                )
            )
        results.append(matches)
    return results


def identities(matches: list[Match], threshold: float | None) -> list[IdentityMatch]:
    """Identities by their best distance among ``matches``, with how many of the matches each has."""
    best: dict[str, IdentityMatch] = {}
    for m in matches:
        if m.identity not in best:
            best[m.identity] = IdentityMatch(
                identity=m.identity,
                distance=m.distance,
                similarity=m.similarity,
                hits=0,
                match=threshold is None or m.distance <= threshold,
            )
        best[m.identity].hits += 1
    return sorted(best.values(), key=lambda i: i.distance)


def weights_threshold(provenance: dict[str, Any], fmr: float) -> tuple[float, str] | None:
    """The calibrated L2 threshold at false-match rate ``fmr`` from the weights' provenance, and its source
    (e.g. ``"weights (FMR 0.01, val)"``); None when the weights carry none at that rate.

    Training writes ``"thresholds": [{"fmr": 0.01, "distance": ..., "tmr": ...}, ...]`` and ``"threshold_split"``.
    """
    thresholds = provenance.get("thresholds")
    if not isinstance(thresholds, list):
        return None
    split = provenance.get("threshold_split")
    for item in thresholds:
        if not isinstance(item, dict):
            continue
        try:
            rate, distance = float(item["fmr"]), float(item["distance"])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isclose(rate, fmr, rel_tol=1e-6) and math.isfinite(distance) and distance >= 0:
            where = f", {split}" if isinstance(split, str) and split else ""
            return distance, f"weights (FMR {rate:g}{where})"
    return None
