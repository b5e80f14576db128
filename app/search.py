"""The search behind ``POST /query``: one batched FAISS search per request (filters applied inside FAISS), one
read of the few columns an answer shows, track queries, and the default threshold the weights carry."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from app.gallery import EntryFilter, Gallery
from app.schemas import IdentityMatch, Match

logger = logging.getLogger(__name__)

Track = Literal["none", "mean", "min"]
TRACKS: tuple[Track, ...] = ("none", "mean", "min")


INVERSE_DISTANCE = "1 / (1 + distance): not calibrated (the weights carry no false-match curve)"
ONE_MINUS_FMR = (
    "1 - the false-match rate at this distance: the share of pairs of different people, on the weights' "
    "calibration split, that lie farther apart (0.999: one stranger in a thousand comes this close)"
)


@dataclass(frozen=True)
class ScoreCurve:
    """The weights' false-match rate as a function of distance (training's ``fmr_curve``), read from the weights'
    provenance. A score an operator can read: 1/(1+d) puts a true match and a stranger both near 0.03 when every
    distance that matters lies between 25 and 35."""

    distances: np.ndarray  # ascending
    log_fmrs: np.ndarray  # log10 of the false-match rate at each distance
    split: str

    @classmethod
    def from_provenance(cls, provenance: dict[str, Any]) -> ScoreCurve | None:
        curve = provenance.get("fmr_curve")
        if not isinstance(curve, list) or len(curve) < 2:
            return None
        try:
            points = np.array([[float(d), float(f)] for d, f in curve], dtype=np.float64)
        except (TypeError, ValueError):
            return None
        if not np.isfinite(points).all() or (points[:, 1] <= 0).any() or (np.diff(points[:, 0]) < 0).any():
            return None
        split = provenance.get("threshold_split")
        return cls(points[:, 0], np.log10(points[:, 1]), split if isinstance(split, str) else "")

    def false_match_rate(self, distance: float) -> float:
        """Interpolated in log space; under the curve's smallest distance, the rate there (an upper bound: the
        split had too few pairs to say less); past its largest, 1."""
        if distance >= self.distances[-1]:
            return 1.0
        return float(10 ** np.interp(distance, self.distances, self.log_fmrs))

    def similarity(self, distance: float) -> float:
        return 1.0 - self.false_match_rate(distance)

    def distance_at(self, fmr: float) -> float | None:
        """The distance at which the false-match rate is ``fmr``, interpolated in log space as above; None outside
        the rates the curve resolves."""
        rate = math.log10(fmr)
        if not self.log_fmrs[0] <= rate <= self.log_fmrs[-1]:
            return None
        return float(np.interp(rate, self.log_fmrs, self.distances))


def similarity(distance: float, curve: ScoreCurve | None = None) -> float:
    """The calibrated score (ONE_MINUS_FMR) where the weights carry a curve, else INVERSE_DISTANCE."""
    return curve.similarity(distance) if curve is not None else 1.0 / (1.0 + distance)


def search(
    gallery: Gallery,
    vectors: np.ndarray,
    top_k: int,
    where: EntryFilter | None = None,
    track: Track = "none",
    curve: ScoreCurve | None = None,
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
                    similarity=similarity(distance, curve),
                    false_match_rate=curve.false_match_rate(distance) if curve is not None else None,
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
                false_match_rate=m.false_match_rate,
                hits=0,
                match=threshold is None or m.distance <= threshold,
            )
        best[m.identity].hits += 1
    return sorted(best.values(), key=lambda i: i.distance)


def calibrated_thresholds(provenance: dict[str, Any]) -> list[tuple[float, float]]:
    """The weights' well-formed calibrated thresholds as ``(fmr, distance)``, ascending by rate."""
    thresholds = provenance.get("thresholds")
    out: list[tuple[float, float]] = []
    for item in thresholds if isinstance(thresholds, list) else []:
        if not isinstance(item, dict):
            continue
        try:
            rate, distance = float(item["fmr"]), float(item["distance"])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(distance) and distance >= 0:
            out.append((rate, distance))
    return sorted(out)


def weights_threshold(provenance: dict[str, Any], fmr: float) -> tuple[float, str] | None:
    """The calibrated L2 threshold at false-match rate ``fmr`` from the weights' provenance, and its source
    (e.g. ``"weights (FMR 0.01, val)"``): a calibrated threshold at that rate, else the distance the weights'
    false-match curve gives it (training's resolves 1e-4 to 1); None when the weights carry neither.

    Training writes ``"thresholds": [{"fmr": 0.01, "distance": ..., "tmr": ...}, ...]``, ``"fmr_curve"`` and
    ``"threshold_split"``.
    """
    split = provenance.get("threshold_split")
    where = f", {split}" if isinstance(split, str) and split else ""
    for rate, distance in calibrated_thresholds(provenance):
        if math.isclose(rate, fmr, rel_tol=1e-6):
            return distance, f"weights (FMR {rate:g}{where})"
    curve = ScoreCurve.from_provenance(provenance)
    distance = curve.distance_at(fmr) if curve is not None else None
    return (distance, f"weights (FMR {fmr:g}{where}, from its false-match curve)") if distance is not None else None
