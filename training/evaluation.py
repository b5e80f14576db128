"""Re-ID evaluation: CMC, mAP and mINP, with and without the standard same-camera removal.

``evaluate_rank`` follows torchreid's ``eval_market1501`` (same signature, same results): for each
query, gallery images with the same pid AND the same camid are removed; a query left with no true
match is skipped (not counted); CMC is averaged over the valid queries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class RankResult:
    cmc: np.ndarray  # (max_rank,) share of valid queries with a true match within the first r
    mAP: float
    mINP: float
    num_valid_queries: int

    def figures(self, prefix: str = "") -> dict[str, float]:
        """mAP, rank-1/5/10 and mINP in percent."""
        out = {"mAP": 100 * self.mAP, "mINP": 100 * self.mINP}
        for r in (1, 5, 10):
            out[f"rank{r}"] = 100 * float(self.cmc[min(r, len(self.cmc)) - 1])
        return {prefix + k: v for k, v in out.items()}


def rank_metrics(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
    same_camera_removal: bool = True,
    remove_junk: bool = False,
) -> RankResult:
    """CMC, mAP and mINP for a (num_query, num_gallery) distance matrix.

    ``same_camera_removal=False`` keeps the gallery images of the query's own camera (a looser
    protocol). ``remove_junk`` also drops gallery images with pid < 0 (Market-1501's junk).
    """
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    num_q, num_g = distmat.shape
    if num_g < max_rank:
        max_rank = num_g
        logger.info("note: number of gallery samples is quite small, got %d", num_g)
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for q_idx in range(num_q):
        order = indices[q_idx]
        remove = np.zeros(num_g, dtype=bool)
        if same_camera_removal:
            remove |= (g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])
        if remove_junk:
            remove |= g_pids[order] < 0
        raw_cmc = matches[q_idx][~remove]
        if not np.any(raw_cmc):
            continue  # this query has no true match in the gallery: skipped, as torchreid does
        cmc = raw_cmc.cumsum()
        last_pos = int(np.where(raw_cmc == 1)[0].max())
        all_inp.append(cmc[last_pos] / (last_pos + 1.0))
        cmc[cmc > 1] = 1
        padded = np.ones(max_rank, dtype=np.int32)  # a shorter kept gallery: found for every later rank
        padded[: min(max_rank, len(cmc))] = cmc[:max_rank]
        all_cmc.append(padded)
        num_rel = raw_cmc.sum()
        precision = raw_cmc.cumsum() / (np.arange(len(raw_cmc)) + 1.0)
        all_ap.append(float((precision * raw_cmc).sum() / num_rel))
    if not all_cmc:
        raise ValueError("no query has a true match in the gallery; cannot evaluate")
    cmc_mean = np.asarray(all_cmc).astype(np.float32).sum(0) / len(all_cmc)
    return RankResult(cmc_mean, float(np.mean(all_ap)), float(np.mean(all_inp)), len(all_cmc))


def evaluate_rank(
    distmat: np.ndarray | torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    max_rank: int = 50,
) -> tuple[np.ndarray, float]:
    """torchreid's ``evaluate_rank`` for Market-1501-style data: (cmc of length max_rank, mAP)."""
    if isinstance(distmat, torch.Tensor):
        distmat = distmat.detach().cpu().numpy()
    result = rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank)
    return result.cmc, result.mAP


def euclidean_distmat(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """(Q, D), (G, D) -> (Q, G) squared Euclidean distances (the ranking of Euclidean ones)."""
    q, g = query.float(), gallery.float()
    return (q.pow(2).sum(1, keepdim=True) + g.pow(2).sum(1)[None, :] - 2 * q @ g.t()).clamp_min(0)


def evaluate_features(
    q_feats: torch.Tensor,
    g_feats: torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
) -> dict[str, float]:
    """Both protocols, in percent: keys mAP, rank1, rank5, rank10, mINP (standard) and the same with an
    ``all_`` prefix (no same-camera removal; the query image itself is never in the gallery)."""
    distmat = euclidean_distmat(q_feats, g_feats).cpu().numpy()
    standard = rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, remove_junk=True)
    loose = rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, same_camera_removal=False, remove_junk=True)
    return {**standard.figures(), **loose.figures("all_")}
