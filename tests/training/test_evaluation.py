"""evaluate_rank on hand-made cases and against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from training import evaluate_rank
from training.evaluation import rank_metrics


def _reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """A plain-Python reading of the protocol: rank the gallery, drop same pid + same camera, AP and CMC."""
    cmcs, aps = [], []
    for i in range(len(q_pids)):
        ranked = sorted(range(len(g_pids)), key=lambda j: (distmat[i][j], j))
        kept = [j for j in ranked if not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])]
        hits = [g_pids[j] == q_pids[i] for j in kept]
        if not any(hits):
            continue
        first = hits.index(True)
        cmcs.append([1.0 if r >= first else 0.0 for r in range(max_rank)])
        found, precisions = 0, []
        for r, hit in enumerate(hits):
            if hit:
                found += 1
                precisions.append(found / (r + 1))
        aps.append(sum(precisions) / len(precisions))
    return np.mean(cmcs, axis=0), float(np.mean(aps))


def test_hand_made_case() -> None:
    # query 0 (pid 1, cam 0): ranked gallery pid 2, pid 1 (cam 1), pid 1 (cam 0, removed), pid 3
    # query 1 (pid 5, cam 0): its only match is on its own camera -> excluded as in torchreid
    distmat = np.array([[0.3, 0.1, 0.2, 0.0, 0.9], [0.5, 0.5, 0.5, 0.5, 0.1]])
    g_pids = np.array([1, 1, 3, 2, 5])
    g_camids = np.array([0, 1, 1, 1, 0])
    cmc, mAP = evaluate_rank(distmat, np.array([1, 5]), g_pids, np.array([0, 0]), g_camids, max_rank=4)
    # query 0 after removal: [pid2, pid1, pid3, pid5] -> first hit at rank 2, AP = 1/2
    np.testing.assert_allclose(cmc, [0, 1, 1, 1])
    assert mAP == pytest.approx(0.5)
    loose = rank_metrics(distmat, np.array([1, 5]), g_pids, np.array([0, 0]), g_camids, 4, same_camera_removal=False)
    # without removal query 0: [pid2, pid1, pid3? no: 0.2 is pid3] -> order pid2(0.0), pid1(0.1), pid3(0.2), pid1(0.3)
    # AP = (1/2 + 2/4) / 2 = 0.5; query 1: its match first -> AP 1
    assert loose.num_valid_queries == 2
    assert loose.mAP == pytest.approx(0.75)
    # mINP of query 0 (standard): last true match at rank 2 -> 1/2
    assert rank_metrics(distmat, np.array([1, 5]), g_pids, np.array([0, 0]), g_camids, 4).mINP == pytest.approx(0.5)


def test_matches_brute_force_on_random_data() -> None:
    rng = np.random.default_rng(0)
    q_pids, g_pids = rng.integers(0, 8, 30), rng.integers(0, 8, 120)
    q_camids, g_camids = rng.integers(0, 3, 30), rng.integers(0, 3, 120)
    distmat = rng.random((30, 120))
    cmc, mAP = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20)
    ref_cmc, ref_map = _reference(distmat, q_pids, g_pids, q_camids, g_camids, 20)
    np.testing.assert_allclose(cmc, ref_cmc, rtol=1e-6)
    assert mAP == pytest.approx(ref_map)


def test_no_valid_query_is_an_error() -> None:
    with pytest.raises(ValueError, match="no query"):
        evaluate_rank(np.zeros((1, 2)), np.array([1]), np.array([2, 3]), np.array([0]), np.array([0, 1]))
