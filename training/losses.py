"""The paper's losses (section 2.2): batch-hard triplet loss, and the mask generator's identity,
sparsity and contiguity losses (equations 3-6); and the strong recipe's ID loss (cross-entropy with label
smoothing, Szegedy et al. 2016, as Luo et al. use it for re-ID)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B) Euclidean distances in fp32, with a floor so the gradient of sqrt stays finite.

    Autocast is off here: under it ``x @ x.t()`` would run in bf16 / fp16, whose 8 / 11 bits of mantissa blur the
    small gaps between the hardest positive and negative that batch-hard mining compares."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 / fp16 up to fp32, fp64 kept
        sq = (x * x).sum(1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.t()
        return d2.clamp_min(1e-12).sqrt()


def triplet_loss(
    features: torch.Tensor, pids: torch.Tensor, margin: float = 0.3, soft_margin: bool = False
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al., "In Defense of the Triplet Loss", 2017).

    For each anchor: the farthest positive and the nearest negative in the batch;
    loss = mean(max(0, margin + d(a, p) - d(a, n))), or mean(softplus(d(a, p) - d(a, n))) with ``soft_margin``.
    Anchors without a positive or a negative in the batch are left out.
    """
    if features.dim() != 2 or features.shape[0] != pids.shape[0]:
        raise ValueError(f"features (B, D) and pids (B,) do not match: {tuple(features.shape)}, {tuple(pids.shape)}")
    dist = pairwise_distance(features.float())  # (B, B)
    same = pids[:, None] == pids[None, :]
    eye = torch.eye(len(pids), dtype=torch.bool, device=pids.device)
    pos = same & ~eye
    neg = ~same
    valid = pos.any(1) & neg.any(1)
    if not valid.any():
        return features.sum() * 0.0
    hardest_pos = torch.where(pos, dist, torch.full_like(dist, -float("inf"))).max(1).values
    hardest_neg = torch.where(neg, dist, torch.full_like(dist, float("inf"))).min(1).values
    gap = (hardest_pos - hardest_neg)[valid]
    if soft_margin:
        return F.softplus(gap).mean()
    return F.relu(gap + margin).mean()


def id_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy over the training identities, (B, num_classes) logits and (B,) labels in [0, num_classes);
    the target is 1 - eps + eps / N on the true class and eps / N elsewhere (torch's ``label_smoothing``)."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def identity_loss(clean_features: torch.Tensor, masked_features: torch.Tensor) -> torch.Tensor:
    """Equation 3: mse(F(a), F(M(a) * a)), averaged over the batch and the feature dimensions."""
    return F.mse_loss(masked_features.float(), clean_features.float())


def sparsity_loss(mask: torch.Tensor) -> torch.Tensor:
    """Equation 4: the mean of the mask, over pixels and the batch. mask: (B, 1, H, W)."""
    return mask.float().mean()


def contiguity_loss(mask: torch.Tensor) -> torch.Tensor:
    """Equation 5: (1 / (h * w)) * sum over pixels of |vertical diff| + |horizontal diff|, averaged
    over the batch. Normalised by h * w as the paper writes it, not by the number of differences."""
    m = mask.float()
    h, w = m.shape[-2:]
    vertical = (m[..., 1:, :] - m[..., :-1, :]).abs().flatten(1).sum(1)  # (B,)
    horizontal = (m[..., :, 1:] - m[..., :, :-1]).abs().flatten(1).sum(1)  # (B,)
    return ((vertical + horizontal) / (h * w)).mean()


def mask_loss(
    clean_features: torch.Tensor, masked_features: torch.Tensor, mask: torch.Tensor, lambda2: float = 0.95
) -> dict[str, torch.Tensor]:
    """Equation 6: lambda2 * L_identity + (1 - lambda2) * (L_sparsity + L_contiguity); all terms returned."""
    identity = identity_loss(clean_features, masked_features)
    sparsity = sparsity_loss(mask)
    contiguity = contiguity_loss(mask)
    total = lambda2 * identity + (1.0 - lambda2) * (sparsity + contiguity)
    return {"loss_mask": total, "loss_identity": identity, "loss_sparsity": sparsity, "loss_contiguity": contiguity}


def extractor_loss(
    clean_features: torch.Tensor,
    masked_features: torch.Tensor,
    pids: torch.Tensor,
    lambda1: float = 0.9,
    margin: float = 0.3,
    soft_margin: bool = False,
    clean_id: torch.Tensor | None = None,
    masked_id: torch.Tensor | None = None,
    id_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """lambda1 * L(clean) + (1 - lambda1) * L(masked), section 2.2, with L = L_triplet (the paper's) or, given the
    ID losses of both views, L_triplet + id_weight * L_id (the strong recipe)."""
    clean = triplet_loss(clean_features, pids, margin, soft_margin)
    masked = triplet_loss(masked_features, pids, margin, soft_margin)
    out = {"loss_triplet": clean, "loss_triplet_masked": masked}
    if clean_id is not None and masked_id is not None:
        out.update(loss_id=clean_id, loss_id_masked=masked_id)
        clean, masked = clean + id_weight * clean_id, masked + id_weight * masked_id
    return {"loss_extractor": lambda1 * clean + (1.0 - lambda1) * masked, **out}
