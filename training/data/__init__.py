"""Data set readers: each returns a ReidDataset of Samples (path, pid, camid)."""

from training.data.base import ImageDataset, ReidDataset, Sample

__all__ = ["ImageDataset", "ReidDataset", "Sample"]
