"""Pseudo-identities from a site's templates: k-reciprocal Jaccard distances, then DBSCAN (models.clustering,
the same math the service groups sightings with), after each camera's mean template is taken out.

Why the centring: a camera's light, angle and background shift every template it gives the same way, so two
crops of one camera sit closer than two crops of one person seen by two cameras, and clusters come out as
same-camera pairs that teach nothing across cameras. Taking each camera's mean out (then unit length again)
removes that shared shift; on cuhk01-site it raises the strong CUHK03 weights' mAP from 34.2 to 39.2 by itself."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.clustering import camera_centred, cluster_overlap, dbscan, jaccard_distance, unit


@dataclass(frozen=True)
class ClusterSettings:
    # k1 = 20 and eps = 0.6 are Market-1501's (SpCL, Cluster Contrast), where a person has ~20 crops: at a site
    # where people are seen a handful of times, a neighbourhood that large is mostly strangers, and so is Zhong et
    # al.'s query expansion over 6: k2 = 2 averages a crop's neighbourhood with its nearest's only, as re-grouping
    # sightings does (app.regroup). These were chosen on CUHK03 val (labelled, never the site's labels): eps 0.6
    # pairs the crops it keeps with precision 0.85, as k2 = 6 did at eps 0.45 (the earlier default), at recall
    # 0.72 against 0.71, and keeps 99% of them against 93%. min_samples 2: a pair of mutual look-alikes is a
    # cluster, as a person seen twice is (docs/TRAINING.md, "Adapting to a site").
    k1: int = 10
    k2: int = 2
    eps: float = 0.6
    min_samples: int = 2
    camera_centring: bool = True
    # SpCL's self-paced criterion (Ge et al., NeurIPS 2020), with its settings: a cluster is trusted when it stays
    # itself as eps moves by this much. Looser, a cluster that merges with others is not independent: the first
    # round's least independent tenth is left out, and that round's bar holds after. Tighter, only the crops of
    # its largest core are compact enough to keep. 0: every cluster as DBSCAN gives it.
    reliability_delta: float = 0.0
    independence_quantile: float = 0.9


def pseudo_labels(
    features: np.ndarray, camids: np.ndarray, settings: ClusterSettings, independence_bar: float | None = None
) -> tuple[np.ndarray, float | None]:
    """(N,) int64 cluster per template, -1 for the ones left out (not trained on this round), and the
    independence bar (``reliable``'s; None without ``reliability_delta``) for the rounds after this one."""
    cams = np.asarray(camids)
    x = camera_centred(features, cams) if settings.camera_centring and len(np.unique(cams)) > 1 else unit(features)
    distances = jaccard_distance(x, settings.k1, settings.k2)
    labels = dbscan(distances, settings.eps, settings.min_samples)
    if settings.reliability_delta <= 0:
        return labels, None
    return reliable(distances, labels, settings, independence_bar)


def reliable(
    distances: np.ndarray, labels: np.ndarray, settings: ClusterSettings, independence_bar: float | None
) -> tuple[np.ndarray, float | None]:
    """SpCL's criterion on ``labels`` (DBSCAN at ``eps`` over ``distances``): the crops of clusters both
    independent and compact, renumbered; the others -1. The bar: 1 - IoU with the looser clustering a cluster may
    have, the given one or, in the first round, the ``independence_quantile`` of this round's clusters'."""
    count = int(labels.max(initial=-1)) + 1
    if count == 0:  # nothing to judge: the bar waits for a round with clusters
        return labels, independence_bar
    delta = settings.reliability_delta
    tight = dbscan(distances, settings.eps - delta, settings.min_samples) if settings.eps > delta else labels
    loose = dbscan(distances, settings.eps + delta, settings.min_samples)
    compact, independent = cluster_overlap(labels, tight), cluster_overlap(labels, loose)
    clustered = labels >= 0
    best_compact, best_independent = np.zeros(count), np.zeros(count)
    np.maximum.at(best_compact, labels[clustered], compact[clustered])
    np.maximum.at(best_independent, labels[clustered], independent[clustered])
    if independence_bar is None:
        scores = np.sort(1 - best_independent)
        independence_bar = float(scores[min(len(scores) - 1, round(len(scores) * settings.independence_quantile))])
    member = np.where(clustered, labels, 0)
    keep = clustered & (compact >= best_compact[member] - 1e-12) & (1 - best_independent[member] <= independence_bar)
    kept_per_cluster = np.bincount(labels[keep], minlength=count)
    keep &= kept_per_cluster[member] >= 2  # a crop alone pulls towards no one
    out = np.full_like(labels, -1)
    out[keep] = np.unique(labels[keep], return_inverse=True)[1].ravel()
    return out, independence_bar


def cluster_summary(labels: np.ndarray, camids: np.ndarray) -> dict[str, float]:
    """What a round of pseudo-labels looks like, without any identity: clusters, the share of crops in one, the
    mean cluster size and the share of clusters that span more than one camera."""
    kept = labels >= 0
    clusters = np.unique(labels[kept])
    cross = sum(len(np.unique(camids[labels == c])) > 1 for c in clusters)
    return {
        "clusters": float(len(clusters)),
        "clustered": float(kept.mean()) if len(labels) else 0.0,
        "mean_size": float(kept.sum() / max(len(clusters), 1)),
        "cross_camera": float(cross / max(len(clusters), 1)),
    }
