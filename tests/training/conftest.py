"""Fixtures that write tiny data sets in the real on-disk formats into tmp_path.

Each returns the root and what it wrote, so the tests check the readers against the list of files written
rather than against numbers typed in by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@dataclass(frozen=True)
class Written:
    split: str  # train / query / gallery / val
    pid: int
    camid: int  # 0-based
    path: Path


@dataclass
class Fixture:
    root: Path
    files: list[Written] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def write_jpg(path: Path, seed: int, size: tuple[int, int] = (16, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path)


# Market-1501: (folder, pid, camera 1-based); two images per (pid, camera) in some places, junk and distractors.
MARKET_LAYOUT = {
    "bounding_box_train": [(2, 1), (2, 1), (2, 3), (7, 2), (7, 6), (7, 6), (11, 4), (-1, 1), (-1, 5)],
    "query": [(3, 1), (3, 2), (5, 6), (9, 4)],
    "bounding_box_test": [(3, 1), (3, 3), (3, 5), (5, 2), (5, 2), (9, 6), (9, 1), (0, 1), (0, 4), (0, 4), (-1, 2)],
}
SPLIT_OF = {"bounding_box_train": "train", "query": "query", "bounding_box_test": "gallery"}


@pytest.fixture
def market_root(tmp_path: Path) -> Fixture:
    fx = Fixture(tmp_path / "Market-1501-v15.09.15")
    frame = 0
    for folder, entries in MARKET_LAYOUT.items():
        for pid, cam in entries:
            frame += 1
            pid_text = "-1" if pid == -1 else f"{pid:04d}"
            path = fx.root / folder / f"{pid_text}_c{cam}s{1 + frame % 6}_{frame * 25:06d}_{frame % 8:02d}.jpg"
            write_jpg(path, frame)
            fx.files.append(Written(SPLIT_OF[folder], pid, cam - 1, path))
    (fx.root / "bounding_box_test" / "Thumbs.db").write_bytes(b"not an image")  # the real archive has these
    return fx


DUKE_LAYOUT = {
    "bounding_box_train": [(1, 2), (1, 2), (1, 7), (4, 1), (4, 8), (6, 3)],
    "query": [(8, 1), (12, 5)],
    "bounding_box_test": [(8, 2), (8, 3), (12, 8), (12, 4), (15, 6)],
}


@pytest.fixture
def duke_root(tmp_path: Path) -> Fixture:
    fx = Fixture(tmp_path / "DukeMTMC-reID")
    frame = 0
    for folder, entries in DUKE_LAYOUT.items():
        for pid, cam in entries:
            frame += 1
            path = fx.root / folder / f"{pid:04d}_c{cam}_f{46182 + frame * 120:07d}.jpg"
            write_jpg(path, frame)
            fx.files.append(Written(SPLIT_OF[folder], pid, cam - 1, path))
    return fx


def _write_matlab_v73_cuhk03(path: Path, variants: dict[str, list[np.ndarray]]) -> None:
    """cuhk-03.mat as MATLAB v7.3 saves it: HDF5, cell arrays as object references, arrays transposed.

    variants[name][pair] is an object array (identities, 10) of (H, W, 3) uint8 images or None for an empty cell.
    """
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        counter = 0

        def put(array: np.ndarray, empty: bool = False) -> h5py.Reference:
            nonlocal counter
            counter += 1
            ds = refs.create_dataset(f"r{counter}", data=array)
            if empty:
                ds.attrs["MATLAB_empty"] = np.uint8(1)
                ds.attrs["MATLAB_class"] = np.bytes_("double")
            else:
                ds.attrs["MATLAB_class"] = np.bytes_("uint8" if array.dtype == np.uint8 else "cell")
            return ds.ref

        for name, pairs in variants.items():
            pair_refs = []
            for cells in pairs:
                ids, shots = cells.shape
                cell_refs = np.empty((shots, ids), dtype=h5py.ref_dtype)  # transposed: MATLAB is column-major
                for i in range(ids):
                    for s in range(shots):
                        image = cells[i, s]
                        if image is None:  # MATLAB stores [] as its dimensions (0, 0), flagged MATLAB_empty
                            cell_refs[s, i] = put(np.zeros(2, dtype=np.uint64), empty=True)
                        else:
                            cell_refs[s, i] = put(np.ascontiguousarray(image.T))  # (3, W, H) on disk
                pair_refs.append(put(cell_refs))
            top = f.create_dataset(name, data=np.array([pair_refs], dtype=h5py.ref_dtype))  # (1, pairs)
            top.attrs["MATLAB_class"] = np.bytes_("cell")


@pytest.fixture
def cuhk03_root(tmp_path: Path) -> Fixture:
    """2 camera pairs x 3 identities x 10 shots (some empty), both variants, and both new-protocol split files.

    Identities 1-3 (pair 1) train, 4-6 (pair 2) test; each test identity's first image in each view is a query.
    Labeled images are 12x6 and detected 16x8, so a test can tell which variant was read.
    """
    from scipy.io import savemat

    fx = Fixture(tmp_path / "cuhk03")
    (fx.root / "cuhk03_release").mkdir(parents=True)
    rng = np.random.default_rng(3)
    empty = {(0, 1, 9), (1, 0, 4), (1, 2, 8), (1, 2, 9)}  # (pair, identity, shot) never taken
    sizes = {"detected": (16, 8), "labeled": (12, 6)}
    variants: dict[str, list[np.ndarray]] = {}
    for variant, (h, w) in sizes.items():
        pairs = []
        for pair in range(2):
            cells = np.empty((3, 10), dtype=object)
            for i in range(3):
                for s in range(10):
                    cells[i, s] = None if (pair, i, s) in empty else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pairs.append(cells)
        variants[variant] = pairs
    _write_matlab_v73_cuhk03(fx.root / "cuhk03_release" / "cuhk-03.mat", variants)

    for variant in sizes:
        names, labels, cams, train, query, gallery = [], [], [], [], [], []
        for pair in range(2):
            for i in range(3):
                label = pair * 3 + i + 1
                seen_views: set[int] = set()
                for s in range(10):
                    if (pair, i, s) in empty:
                        continue
                    view = 1 if s < 5 else 2
                    names.append(f"{pair + 1}_{i + 1:03d}_{view}_{s + 1:02d}.png")
                    labels.append(label)
                    cams.append(view)
                    index = len(names)  # 1-based, as MATLAB
                    if pair == 0:
                        train.append(index)
                        split = "train"
                    elif view not in seen_views:
                        seen_views.add(view)
                        query.append(index)
                        split = "query"
                    else:
                        gallery.append(index)
                        split = "gallery"
                    if variant == "detected":
                        fx.files.append(Written(split, label, view - 1, Path(names[-1])))
        filelist = np.empty((len(names), 1), dtype=object)
        for j, n in enumerate(names):
            filelist[j, 0] = n
        savemat(
            fx.root / f"cuhk03_new_protocol_config_{variant}.mat",
            {
                "filelist": filelist,
                "labels": np.array(labels, dtype=float).reshape(-1, 1),
                "camId": np.array(cams, dtype=float).reshape(-1, 1),
                "train_idx": np.array(train, dtype=float).reshape(-1, 1),
                "query_idx": np.array(query, dtype=float).reshape(-1, 1),
                "gallery_idx": np.array(gallery, dtype=float).reshape(-1, 1),
            },
        )
    fx.extra["sizes"] = sizes
    fx.extra["empty"] = empty
    return fx


@pytest.fixture
def manifest_root(tmp_path: Path) -> Fixture:
    """A train/val manifest like ../shared/data/cuhk03-detected: val ids offset by 1000, cameras 0 and 1."""
    fx = Fixture(tmp_path / "mine")
    lines = ["path,pid,camid,split"]
    n = 0
    for split, pids in (("train", range(0, 5)), ("val", range(1000, 1004))):
        for pid in pids:
            for shot in range(4 if pid != 1003 else 2):  # 1003 has camera-0 images only
                camid = 0 if shot < 2 else 1
                rel = f"{split}/{pid % 1000:04d}_{shot:02d}.jpg"
                n += 1
                write_jpg(fx.root / rel, n)
                lines.append(f"{rel},{pid},{camid},{split}")
                fx.files.append(Written(split, pid, camid, fx.root / rel))
    (fx.root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return fx
