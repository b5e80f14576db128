"""The losses against brute force (triplet) and hand computations (mask terms)."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import (
    contiguity_loss,
    extractor_loss,
    id_loss,
    identity_loss,
    mask_loss,
    pairwise_distance,
    sparsity_loss,
    triplet_loss,
)


def _brute_force_triplet(features: torch.Tensor, pids: list[int], margin: float, soft: bool) -> float:
    n = len(pids)
    dist = [[math.dist(features[i].tolist(), features[j].tolist()) for j in range(n)] for i in range(n)]
    losses = []
    for a in range(n):
        positives = [dist[a][p] for p in range(n) if p != a and pids[p] == pids[a]]
        negatives = [dist[a][q] for q in range(n) if pids[q] != pids[a]]
        if not positives or not negatives:
            continue
        gap = max(positives) - min(negatives)
        losses.append(math.log1p(math.exp(gap)) if soft else max(0.0, margin + gap))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("margin", [0.3, 1.0])
def test_triplet_loss_matches_brute_force(soft: bool, margin: float) -> None:
    pids = [0, 0, 0, 1, 1, 1, 2, 2, 3]  # pid 3 has no positive: left out
    features = torch.randn(len(pids), 5)
    got = triplet_loss(features, torch.tensor(pids), margin=margin, soft_margin=soft)
    assert got.item() == pytest.approx(_brute_force_triplet(features, pids, margin, soft), rel=1e-5)


def test_triplet_loss_is_zero_for_well_separated_ids_and_has_gradient() -> None:
    pids = torch.tensor([0, 0, 1, 1])
    features = torch.tensor([[0.0, 0.0], [0.0, 0.1], [10.0, 0.0], [10.0, 0.1]], requires_grad=True)
    assert triplet_loss(features, pids).item() == 0.0
    close = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.1, 0.0], [1.1, 0.0]], requires_grad=True)
    loss = triplet_loss(close, pids)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(close.grad).all() and close.grad.abs().sum() > 0


def test_mask_terms_match_hand_computation() -> None:
    mask = torch.tensor([[[[0.0, 1.0, 0.0], [0.0, 0.5, 0.0], [1.0, 1.0, 1.0]]]])  # (1, 1, 3, 3)
    # sparsity: (1 + 0.5 + 3) / 9
    assert sparsity_loss(mask).item() == pytest.approx(4.5 / 9)
    # vertical diffs: col0 |0-0|+|1-0| = 1, col1 |0.5-1|+|1-0.5| = 1, col2 0+1 = 1 -> 3
    # horizontal diffs: row0 1+1 = 2, row1 0.5+0.5 = 1, row2 0 -> 3; normalised by h*w = 9
    assert contiguity_loss(mask).item() == pytest.approx(6 / 9)
    clean = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    masked = torch.tensor([[1.0, 0.0, 3.0, 2.0]])
    assert identity_loss(clean, masked).item() == pytest.approx((4 + 4) / 4)
    terms = mask_loss(clean, masked, mask, lambda2=0.95)
    assert terms["loss_mask"].item() == pytest.approx(0.95 * 2.0 + 0.05 * (4.5 / 9 + 6 / 9))


def test_mask_terms_average_over_the_batch() -> None:
    a = torch.rand(1, 1, 4, 6)
    b = torch.rand(1, 1, 4, 6)
    both = torch.cat([a, b])
    assert contiguity_loss(both).item() == pytest.approx((contiguity_loss(a) + contiguity_loss(b)).item() / 2)
    assert sparsity_loss(both).item() == pytest.approx((a.mean() + b.mean()).item() / 2)


def test_id_loss_with_label_smoothing_against_a_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 1])
    eps, n = 0.1, 3
    expected = 0.0
    for row, label in zip(logits.tolist(), labels.tolist(), strict=True):
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        target = [eps / n + (1 - eps if c == label else 0.0) for c in range(n)]  # 1 - eps + eps/N on the pid
        expected += -sum(t * lp for t, lp in zip(target, log_p, strict=True))
    assert id_loss(logits, labels, eps).item() == pytest.approx(expected / 2, rel=1e-6)
    plain = -sum(
        math.log(math.exp(r[c]) / sum(math.exp(v) for v in r))
        for r, c in ((logits[0].tolist(), 0), (logits[1].tolist(), 1))
    )
    assert id_loss(logits, labels, 0.0).item() == pytest.approx(plain / 2, rel=1e-6)


def test_extractor_loss_adds_each_views_id_loss_at_its_weight() -> None:
    feats, masked = torch.randn(6, 4), torch.randn(6, 4)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    paper = extractor_loss(feats, masked, pids, 0.9)
    strong = extractor_loss(
        feats, masked, pids, 0.9, clean_id=torch.tensor(2.0), masked_id=torch.tensor(3.0), id_weight=0.5
    )
    expected = 0.9 * (paper["loss_triplet"] + 0.5 * 2.0) + 0.1 * (paper["loss_triplet_masked"] + 0.5 * 3.0)
    assert strong["loss_extractor"].item() == pytest.approx(expected.item())
    assert "loss_id" not in paper and strong["loss_id"].item() == 2.0


def test_pairwise_distance_stays_fp32_under_bf16_autocast() -> None:
    """Batch-hard mining compares small gaps: under autocast the distances must not drop to bf16's 8-bit mantissa."""
    x = torch.randn(60, 512, generator=torch.Generator().manual_seed(0))
    x = x / x.norm(dim=1, keepdim=True)
    off_diagonal = ~torch.eye(60, dtype=torch.bool)
    exact = pairwise_distance(x.double())[off_diagonal]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = pairwise_distance(x)
        blurred = (2 - 2 * x @ x.t()).clamp_min(0).sqrt()  # the same distances with the matmul left to autocast
    assert under.dtype == torch.float32
    assert torch.equal(under, pairwise_distance(x))
    assert (under[off_diagonal].double() - exact).abs().max() < 1e-5
    assert (blurred[off_diagonal].double() - exact).abs().max() > 1e-3
