"""Unsupervised adaptation to a site: a source model and a site's unlabeled crops (paths and cameras) to weights
that match better there; pseudo-identities by clustering, refreshed each round, trained with a cluster memory and
camera-aware proxies. ``python -m training adapt``; docs/TRAINING.md, "Adapting to a site"."""

from training.adapt.loop import METHOD, AdaptConfig, adapt
from training.adapt.pseudo_labels import ClusterSettings, cluster_summary, pseudo_labels
from training.adapt.site import Site, SiteCrop, read_site, site_identities

__all__ = [
    "METHOD",
    "AdaptConfig",
    "ClusterSettings",
    "Site",
    "SiteCrop",
    "adapt",
    "cluster_summary",
    "pseudo_labels",
    "read_site",
    "site_identities",
]
