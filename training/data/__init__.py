"""Data set readers: each returns a ReidDataset of Samples (path, pid, camid).

``build_dataset(name, root, **kwargs)`` is the one entry point; ``DATASETS`` lists the names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.data.base import ImageDataset, ReidDataset, Sample
from training.data.cuhk03 import read_cuhk03
from training.data.folder import read_folder, read_manifest
from training.data.market1501 import parse_dukemtmc_name, parse_market1501_name, read_dukemtmc, read_market1501

DATASETS = ("market1501", "dukemtmc", "cuhk03", "folder", "synthetic")


def build_dataset(name: str, root: str | Path, **kwargs: Any) -> ReidDataset:
    """Read data set ``name`` under ``root``.

    kwargs: ``cuhk03`` takes ``variant="detected"|"labeled"`` and ``cache_dir=None``; ``folder`` takes
    ``query_camid=0`` (for a manifest with a ``val`` split). ``synthetic`` reads a folder written by
    ``training.data.synthetic.generate_synthetic_market1501`` (Market-1501 layout).
    """
    if name == "market1501":
        return read_market1501(root, **kwargs)
    if name == "dukemtmc":
        return read_dukemtmc(root, **kwargs)
    if name == "cuhk03":
        return read_cuhk03(root, **kwargs)
    if name == "folder":
        return read_folder(root, **kwargs)
    if name == "synthetic":
        return read_market1501(root, name="synthetic", **kwargs)
    raise ValueError(f"unknown dataset {name!r}; choose {', '.join(DATASETS)}")


__all__ = [
    "DATASETS",
    "ImageDataset",
    "ReidDataset",
    "Sample",
    "build_dataset",
    "parse_dukemtmc_name",
    "parse_market1501_name",
    "read_cuhk03",
    "read_dukemtmc",
    "read_folder",
    "read_manifest",
    "read_market1501",
]
