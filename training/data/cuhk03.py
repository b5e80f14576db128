"""CUHK03 (Li et al., CVPR 2014) from the official files, on the new protocol (Zhong et al., CVPR 2017).

Layout (as distributed; torchreid's ``CUHK03`` class reads the same files the same way)::

    root/cuhk03_release/cuhk-03.mat                    (or root/cuhk-03.mat)
    root/cuhk03_new_protocol_config_detected.mat
    root/cuhk03_new_protocol_config_labeled.mat

``cuhk-03.mat`` is MATLAB v7.3, i.e. HDF5: ``detected`` and ``labeled`` are 1 x 5 cell arrays, one per camera
pair; each holds an identities x 10 cell array of image references (shots 1-5 from the pair's first camera,
6-10 from the second; some cells are empty). The images are written once as PNG to a cache folder
(``root/images_detected`` or ``root/images_labeled``) under torchreid's names ``{pair}_{pid:03d}_{view}_{shot:02d}
.png``, which the new-protocol ``filelist`` refers to, and reused afterwards. The split files (``scipy.io``
``loadmat``) hold ``train_idx``, ``query_idx``, ``gallery_idx`` (1-based into ``filelist``), ``labels`` and
``camId``: 767 train ids, 700 test ids and 1,400 queries in the real thing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.data.base import ReidDataset, Sample

logger = logging.getLogger(__name__)

VARIANTS = ("detected", "labeled")
RAW_MAT = "cuhk-03.mat"


def split_config_name(variant: str) -> str:
    return f"cuhk03_new_protocol_config_{variant}.mat"


def image_name(pair: int, pid: int, shot: int) -> str:
    """torchreid's cached name, all 0-based in: camera pair, identity within the pair, shot 0-9."""
    view = 1 if shot < 5 else 2
    return f"{pair + 1:01d}_{pid + 1:03d}_{view:01d}_{shot + 1:02d}.png"


def _raw_mat_path(root: Path) -> Path:
    for path in (root / "cuhk03_release" / RAW_MAT, root / RAW_MAT):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{root / 'cuhk03_release' / RAW_MAT} (or {root / RAW_MAT}) does not exist")


def extract_images(root: str | Path, variant: str = "detected", cache_dir: str | Path | None = None) -> Path:
    """Write the ``variant`` images of ``cuhk-03.mat`` into ``cache_dir`` once; returns the folder.

    A folder that already holds a ``.done`` marker is reused as it is.
    """
    import h5py  # only the official CUHK03 files need it

    root = Path(root)
    _check_variant(variant)
    out = Path(cache_dir) if cache_dir is not None else root / f"images_{variant}"
    if (out / ".done").is_file():
        return out
    mat_path = _raw_mat_path(root)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    with h5py.File(mat_path, "r") as mat:
        if variant not in mat:
            raise ValueError(f"{mat_path} has no {variant!r} cell array (keys: {sorted(mat.keys())})")

        def deref(ref: Any) -> np.ndarray:
            return mat[ref][()].T  # MATLAB is column-major: HDF5 holds each array transposed

        for pair, pair_ref in enumerate(mat[variant][0]):
            cells = deref(pair_ref)  # (identities, 10) references
            for pid in range(cells.shape[0]):
                for shot, ref in enumerate(cells[pid]):
                    image = deref(ref)
                    if image.size == 0 or image.ndim < 3:
                        continue  # an empty cell: that shot was never taken
                    path = out / image_name(pair, pid, shot)
                    if not path.is_file():
                        Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(path)
                    written += 1
    if written == 0:
        raise ValueError(f"{mat_path} holds no {variant} images")
    (out / ".done").write_text(f"{written}\n")
    logger.info("wrote %d CUHK03 %s images to %s", written, variant, out)
    return out


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown CUHK03 variant {variant!r}; choose {' or '.join(VARIANTS)}")


def _flat(array: Any) -> np.ndarray:
    return np.asarray(array).reshape(-1)


def _file_name(entry: Any) -> str:
    # loadmat gives a cell of strings as an object array whose items are 1-element string arrays.
    while isinstance(entry, np.ndarray):
        entry = entry.reshape(-1)[0]
    return str(entry).strip()


def read_cuhk03(root: str | Path, variant: str = "detected", cache_dir: str | Path | None = None) -> ReidDataset:
    """CUHK03 ``variant`` ("detected" or "labeled") on the new protocol, images extracted on first use."""
    from scipy.io import loadmat

    _check_variant(variant)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cuhk03 root {root} does not exist")
    config_path = root / split_config_name(variant)
    if not config_path.is_file():
        raise FileNotFoundError(f"CUHK03 new-protocol split file {config_path} does not exist")
    images = extract_images(root, variant, cache_dir)
    config = loadmat(str(config_path))
    for key in ("train_idx", "query_idx", "gallery_idx", "labels", "filelist"):
        if key not in config:
            raise ValueError(f"{config_path} has no field {key!r}")
    filelist = [_file_name(e) for e in _flat(config["filelist"])]
    labels = _flat(config["labels"]).astype(int)
    if len(labels) != len(filelist):
        raise ValueError(f"{config_path}: {len(labels)} labels for {len(filelist)} files")

    def split(key: str) -> list[Sample]:
        samples = []
        for idx in _flat(config[key]).astype(int) - 1:  # MATLAB indices are 1-based
            if not 0 <= idx < len(filelist):
                raise ValueError(f"{config_path}: {key} index {idx + 1} is outside filelist (1..{len(filelist)})")
            name = filelist[idx]
            parts = name.split("_")
            if len(parts) != 4 or not parts[2].isdigit():
                raise ValueError(f"cannot parse the file name {name!r} in {config_path}: expected 1_001_1_01.png")
            path = images / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} (listed in {config_path}) does not exist in the image cache")
            samples.append(Sample(path=path, pid=int(labels[idx]), camid=int(parts[2]) - 1))  # camid = view - 1
        if not samples:
            raise ValueError(f"{config_path}: the {key} split is empty")
        return samples

    dataset = ReidDataset(
        name=f"cuhk03-{variant}",
        train=split("train_idx"),
        query=split("query_idx"),
        gallery=split("gallery_idx"),
        info={"root": str(root), "variant": variant, "images": str(images)},
    )
    logger.info("%s", dataset.summary())
    return dataset
