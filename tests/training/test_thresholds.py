"""The open-set threshold: Euclidean distance thresholds at target false-match rates from genuine and impostor
pairs, on distances whose quantiles are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm

from training.evaluation import calibrate_thresholds, pair_distances


def test_thresholds_on_a_grid_of_distances_match_exactly_the_target_share_of_impostors() -> None:
    rng = np.random.default_rng(0)
    impostor = rng.permutation(np.arange(1.0, 1001.0))  # 1, 2, ..., 1000 in any order
    genuine = rng.permutation(np.arange(0.5, 20.0))  # 0.5, 1.5, ..., 19.5
    at_1e2, at_1e3 = calibrate_thresholds(genuine, impostor, (1e-2, 1e-3))
    # FMR 1e-2: 10 of the 1000 impostors (1..10) may match, the 11th (11.0) must not
    assert at_1e2["fmr"] == 0.01 and 10.0 <= at_1e2["distance"] < 11.0
    assert np.mean(impostor <= at_1e2["distance"]) == 0.01
    assert at_1e2["tmr"] == 11 / 20  # 0.5 .. 10.5
    assert 1.0 <= at_1e3["distance"] < 2.0 and np.mean(impostor <= at_1e3["distance"]) == 0.001
    assert at_1e3["tmr"] == 2 / 20  # 0.5, 1.5


def test_thresholds_on_normal_distances_sit_at_the_known_quantiles() -> None:
    rng = np.random.default_rng(1)
    impostor = rng.normal(2.0, 0.2, 1_000_000)
    genuine = rng.normal(1.2, 0.2, 1_000_000)
    for target in calibrate_thresholds(genuine, impostor, (1e-2, 1e-3)):
        quantile = norm.ppf(target["fmr"], 2.0, 0.2)  # 1.535 at 1e-2, 1.382 at 1e-3
        assert target["distance"] == pytest.approx(quantile, abs=0.01)
        assert target["tmr"] == pytest.approx(norm.cdf(quantile, 1.2, 0.2), abs=0.01)


def test_bad_targets_and_missing_pairs_are_refused() -> None:
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        calibrate_thresholds(np.ones(3), np.ones(3), (0.0,))
    with pytest.raises(ValueError, match="genuine and impostor pairs, got 0 and 3"):
        calibrate_thresholds(np.array([]), np.ones(3))


def test_pairs_are_cross_camera_euclidean_distances_without_junk() -> None:
    qf = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    gf = torch.tensor([[0.0, 4.0], [3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])
    q_pids, g_pids = np.array([1, 2]), np.array([1, 2, 1, -1])
    q_camids, g_camids = np.array([0, 0]), np.array([1, 1, 0, 1])  # gallery image 2 is query 0's own camera
    genuine, impostor = pair_distances(qf, gf, q_pids, g_pids, q_camids, g_camids)
    assert sorted(genuine.tolist()) == pytest.approx([4.0, 4.0])  # (q0, g0), (q1, g1): not squared
    assert sorted(impostor.tolist()) == pytest.approx([5.0, 5.0])  # (q1, g0), (q0, g1); junk and same camera out
