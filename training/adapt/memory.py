"""The contrastive losses adaptation trains with, over memories of pseudo-identities (no classifier: the
identities change every round).

- ``ClusterMemory`` (Cluster Contrast ReID, Dai et al. 2022): one unit centroid per cluster; a crop's loss is
  the cross-entropy of its similarities to every centroid at temperature 0.05; after each step a cluster's
  centroid moves towards its hardest crop in the batch (the least similar; the paper's best update).
- ``CameraProxies`` (camera-aware proxies, CAP, Wang et al. AAAI 2021): one centroid per (cluster, camera). The
  intra-camera loss contrasts a crop with the proxies of its own camera only (what a camera's light shares is
  no clue there); the inter-camera loss pulls it towards its cluster's proxies in every camera against the
  hardest proxies of other clusters: crossing cameras is what a site needs learnt."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def centroids(features: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """(count, D) unit mean of the unit features of each label 0..count-1."""
    sums = torch.zeros(count, features.shape[1], dtype=features.dtype)
    sums.index_add_(0, labels, F.normalize(features, dim=1))
    return F.normalize(sums, dim=1)


class ClusterMemory:
    def __init__(self, features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.05, momentum: float = 0.1):
        self.count = int(labels.max()) + 1
        self.centroids = centroids(features, labels, self.count)
        self.temperature = temperature
        self.momentum = momentum

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(features, dim=1) @ self.centroids.T.to(features.dtype) / self.temperature
        return F.cross_entropy(logits.float(), labels)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        f = F.normalize(features.detach().float(), dim=1)
        for label in labels.unique():
            rows = f[labels == label]
            hardest = rows[(rows @ self.centroids[label]).argmin()]
            self.centroids[label] = F.normalize(
                self.momentum * self.centroids[label] + (1 - self.momentum) * hardest, dim=0
            )


class CameraProxies:
    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        camids: torch.Tensor,
        temperature: float = 0.07,
        momentum: float = 0.2,
        hard_negatives: int = 50,
    ):
        keys = labels * (int(camids.max()) + 1) + camids
        unique, self.proxy_of = torch.unique(keys, return_inverse=True)  # proxy index per crop
        self.proxies = centroids(features, self.proxy_of, len(unique))
        cameras = int(camids.max()) + 1
        self.proxy_label, self.proxy_camera = unique // cameras, unique % cameras
        self.cameras = cameras
        self.temperature = temperature
        self.momentum = momentum
        self.hard_negatives = hard_negatives

    def proxy_index(self, labels: torch.Tensor, camids: torch.Tensor) -> torch.Tensor:
        keys = labels * self.cameras + camids
        table = self.proxy_label * self.cameras + self.proxy_camera
        return torch.searchsorted(table, keys)  # table is sorted: torch.unique sorts

    def loss(self, features: torch.Tensor, labels: torch.Tensor, camids: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features.float(), dim=1)
        sims = f @ self.proxies.T / self.temperature  # (B, P)
        own = self.proxy_index(labels, camids)
        same_camera = self.proxy_camera[None, :] == camids[:, None]
        intra = F.cross_entropy(sims.masked_fill(~same_camera, float("-inf")), own)
        positive = self.proxy_label[None, :] == labels[:, None]
        negatives = sims.masked_fill(positive, float("-inf"))
        k = min(self.hard_negatives, negatives.shape[1])
        hard = negatives.topk(k, dim=1).values  # (B, k); -inf where fewer negatives exist
        pos = sims.masked_fill(~positive, float("-inf"))
        denominator = torch.logsumexp(torch.cat([pos, hard], dim=1), dim=1, keepdim=True)
        log_p = (sims - denominator).masked_fill(~positive, 0.0)
        inter = -(log_p.sum(1) / positive.sum(1)).mean()
        return intra + inter

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, camids: torch.Tensor) -> None:
        f = F.normalize(features.detach().float(), dim=1)
        index = self.proxy_index(labels, camids)
        for proxy in index.unique():
            mean = f[index == proxy].mean(0)
            self.proxies[proxy] = F.normalize(self.momentum * self.proxies[proxy] + (1 - self.momentum) * mean, dim=0)
