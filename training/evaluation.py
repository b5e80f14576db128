"""Re-ID evaluation: CMC, mAP and mINP, with and without the standard same-camera removal.

``evaluate_rank`` follows torchreid's ``eval_market1501`` (same signature, same results): for each
query, gallery images with the same pid AND the same camid are removed; a query left with no true
match is skipped (not counted); CMC is averaged over the valid queries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.clustering import jaccard_from_encodings, k_reciprocal_encoding
from models.clustering import k_reciprocal_neighbors as k_reciprocal_neighbors  # re-exported: its old home
from training.data.base import Batch

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
    rerank: bool = False,
) -> dict[str, float]:
    """Both protocols, in percent: keys mAP, rank1, rank5, rank10, mINP (standard) and the same with an
    ``all_`` prefix (no same-camera removal; the query image itself is never in the gallery); with ``rerank``
    also the standard protocol after k-reciprocal re-ranking, with a ``rerank_`` prefix."""
    distmat = euclidean_distmat(q_feats, g_feats).cpu().numpy()
    standard = rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, remove_junk=True)
    loose = rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, same_camera_removal=False, remove_junk=True)
    figures = {**standard.figures(), **loose.figures("all_")}
    if rerank:
        reranked = k_reciprocal_rerank(q_feats, g_feats)
        figures.update(rank_metrics(reranked, q_pids, g_pids, q_camids, g_camids, remove_junk=True).figures("rerank_"))
    return figures


def _blocked_knn(feats: torch.Tensor, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(initial_rank (N, k) of each row's k nearest, nearest first, itself included; each row's largest squared
    distance (N,)), one block of rows at a time: memory O(block * N)."""
    n = len(feats)
    ranks, row_max = np.empty((n, k), dtype=np.int64), np.empty(n, dtype=np.float64)
    for start in range(0, n, block):
        d = euclidean_distmat(feats[start : start + block], feats)  # (b, N)
        d[torch.arange(len(d)), torch.arange(start, start + len(d))] = 0.0  # exact zero to itself
        row_max[start : start + len(d)] = d.max(1).values.double().numpy()
        _, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
        ranks[start : start + len(d)] = idx.numpy()
    return ranks, row_max


def k_reciprocal_rerank(
    q_feats: torch.Tensor,
    g_feats: torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    block: int = 512,
) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding",
    CVPR 2017; the authors' defaults k1 = 20, k2 = 6, lambda = 0.3): (Q, G) distances
    ``(1 - lambda) * d_Jaccard + lambda * d``, d the squared Euclidean distance divided by its query's largest.

    The authors' code holds (Q+G)^2 matrices; here the distances are computed a block of rows at a time (only
    each row's k1 + 1 nearest are kept) and the encodings V are sparse (a row's non-zeros are its expanded
    k-reciprocal set), so memory grows as (Q+G) * k1 plus the (Q, G) float32 result and a few (block, G) arrays.
    The encodings and their Jaccard distance are ``models.clustering``'s, which pseudo-labelling shares.
    """
    if not 0.0 <= lambda_value <= 1.0 or k1 < 1 or not 1 <= k2 <= k1 + 1:
        raise ValueError(f"re-ranking needs 1 <= k2 <= k1 + 1 and lambda in [0, 1], got {k1}, {k2}, {lambda_value}")
    feats = torch.cat([q_feats, g_feats]).float().cpu()  # (N, D)
    num_q, n = len(q_feats), len(q_feats) + len(g_feats)
    k1 = min(k1, n - 1)
    initial_rank, row_max = _blocked_knn(feats, k1 + 1, block)

    def scaled_distances(i: int, members: np.ndarray) -> np.ndarray:  # squared L2 over the row's largest
        return euclidean_distmat(feats[i : i + 1], feats[members])[0].double().numpy() / max(row_max[i], 1e-12)

    v = k_reciprocal_encoding(initial_rank, k1, k2, scaled_distances)
    v_gallery = v[num_q:].tocsc()  # columns = encoding dimensions, rows = gallery images
    final = np.empty((num_q, n - num_q), dtype=np.float32)
    for start in range(0, num_q, block):
        q = slice(start, min(start + block, num_q))
        d = euclidean_distmat(feats[q], feats[num_q:]).double().numpy() / np.maximum(row_max[q, None], 1e-12)
        jaccard = jaccard_from_encodings(v[q], v_gallery)
        final[q] = (1.0 - lambda_value) * jaccard + lambda_value * d
    return final


def pair_distances(
    q_feats: torch.Tensor,
    g_feats: torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) Euclidean distances between query and gallery templates taken by different cameras
    (same pid / different pids); junk (pid < 0) is left out."""
    d = euclidean_distmat(q_feats, g_feats).sqrt().cpu().numpy()
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    cross = np.asarray(q_camids)[:, None] != np.asarray(g_camids)[None, :]
    valid = cross & (q_pids[:, None] >= 0) & (g_pids[None, :] >= 0)
    same = q_pids[:, None] == g_pids[None, :]
    return d[valid & same], d[valid & ~same]


def calibrate_thresholds(
    genuine: np.ndarray, impostor: np.ndarray, fmrs: tuple[float, ...] = (1e-2, 1e-3)
) -> list[dict[str, float]]:
    """For each target false-match rate, the largest distance threshold t (a pair matches when its distance is
    <= t) whose share of impostor pairs matching is at most the target, and the true-match rate there:
    ``[{"fmr": target, "distance": t, "tmr": share of genuine pairs <= t}, ...]``."""
    genuine, impostor = np.sort(np.asarray(genuine, dtype=np.float64)), np.sort(np.asarray(impostor, dtype=np.float64))
    if not len(genuine) or not len(impostor):
        raise ValueError(
            f"threshold calibration needs genuine and impostor pairs, got {len(genuine)} and {len(impostor)}"
        )
    out = []
    for fmr in fmrs:
        if not 0.0 < fmr < 1.0:
            raise ValueError(f"target false-match rates must be in (0, 1), got {fmr}")
        allowed = int(np.floor(fmr * len(impostor)))  # impostor pairs that may match
        # Just below the first impostor that must not match: exactly ``allowed`` match (fewer on ties).
        threshold = float(np.nextafter(impostor[allowed], -np.inf))
        tmr = float(np.searchsorted(genuine, threshold, side="right") / len(genuine))
        out.append({"fmr": fmr, "distance": threshold, "tmr": tmr})
        if allowed == 0:
            logger.warning(
                "only %d impostor pairs: FMR %g is below one pair, the threshold is the smallest impostor distance",
                len(impostor),
                fmr,
            )
    return out


def rates_at(genuine: np.ndarray, impostor: np.ndarray, distance: float) -> dict[str, float]:
    """What a threshold chosen elsewhere really gives on these pairs: the share of impostor pairs (false-match
    rate) and of genuine pairs (true-match rate) at distance <= ``distance``."""
    genuine, impostor = np.asarray(genuine), np.asarray(impostor)
    return {
        "fmr": float((impostor <= distance).mean()) if len(impostor) else float("nan"),
        "tmr": float((genuine <= distance).mean()) if len(genuine) else float("nan"),
    }


@torch.no_grad()
def extract_features(
    extractor: nn.Module, loader: Iterable[Batch], device: torch.device
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Served templates (the extractor's eval forward): (N, feat_dim), pids (N,), camids (N,)."""
    was_training = extractor.training
    extractor.eval()
    feats, pids, camids = [], [], []
    for images, pid, camid, _index in loader:
        feats.append(extractor(images.to(device)).float().cpu())
        pids.append(torch.as_tensor(pid))
        camids.append(torch.as_tensor(camid))
    extractor.train(was_training)
    return torch.cat(feats), torch.cat(pids).numpy(), torch.cat(camids).numpy()


def evaluate(
    extractor: nn.Module,
    query_loader: Iterable[Batch],
    gallery_loader: Iterable[Batch],
    device: torch.device,
    rerank: bool = False,
) -> dict[str, float]:
    """mAP, rank-1/5/10 and mINP in percent, both protocols (see ``evaluate_features``); with ``rerank`` also
    the standard protocol's figures after k-reciprocal re-ranking, prefixed ``rerank_``."""
    qf, q_pids, q_camids = extract_features(extractor, query_loader, device)
    gf, g_pids, g_camids = extract_features(extractor, gallery_loader, device)
    return evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, rerank=rerank)
