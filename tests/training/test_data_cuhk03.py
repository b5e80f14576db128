"""CUHK03 from the official files (cuhk-03.mat in MATLAB v7.3 + the new-protocol split files) on a tiny fixture."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from PIL import Image

from training.data import build_dataset
from training.data.cuhk03 import image_name


def test_detected_reads_the_new_protocol_splits(cuhk03_root, tmp_path) -> None:
    dataset = build_dataset("cuhk03", cuhk03_root.root, variant="detected", cache_dir=tmp_path / "cache")
    for split in ("train", "query", "gallery"):
        got = Counter((s.path.name, s.pid, s.camid) for s in getattr(dataset, split))
        want = Counter((str(f.path), f.pid, f.camid) for f in cuhk03_root.files if f.split == split)
        assert got == want, split
    # Hand count: pair 1 (3 ids, 30 shots, 1 empty) trains; pair 2 (3 ids, 27 shots) gives 2 queries per id.
    assert len(dataset.train) == 29 and {s.pid for s in dataset.train} == {1, 2, 3}
    assert len(dataset.query) == 6 and len(dataset.gallery) == 21
    assert {s.pid for s in dataset.query} == {s.pid for s in dataset.gallery} == {4, 5, 6}
    assert {s.camid for s in dataset.query} == {0, 1}
    with Image.open(dataset.train[0].path) as image:
        assert image.size == (8, 16)  # detected crops in the fixture are 16 x 8 (H x W)


def test_images_match_the_mat_pixels_and_empty_cells_are_skipped(cuhk03_root) -> None:
    import h5py
    import numpy as np

    dataset = build_dataset("cuhk03", cuhk03_root.root, variant="labeled")
    folder = cuhk03_root.root / "images_labeled"  # the default cache folder
    written = {p.name for p in folder.glob("*.png")}
    assert len(written) == 60 - len(cuhk03_root.extra["empty"])
    for pair, pid, shot in cuhk03_root.extra["empty"]:
        assert image_name(pair, pid, shot) not in written
    with h5py.File(cuhk03_root.root / "cuhk03_release" / "cuhk-03.mat", "r") as mat:
        cells = mat[mat["labeled"][0][1]][()]  # pair 2, (10 shots, 3 ids) on disk
        expected = mat[cells[3, 1]][()].transpose(2, 1, 0)  # shot 4 of identity 2, back to (H, W, 3)
    with Image.open(folder / "2_002_1_04.png") as image:
        assert np.array_equal(np.asarray(image), expected)
        assert image.size == (6, 12)
    assert all(s.path.parent == folder for s in dataset.query)


def test_cached_images_are_reused_without_the_mat(cuhk03_root) -> None:
    first = build_dataset("cuhk03", cuhk03_root.root)  # detected is the default
    (cuhk03_root.root / "cuhk03_release" / "cuhk-03.mat").unlink()
    second = build_dataset("cuhk03", cuhk03_root.root, variant="detected")
    assert first.train == second.train and first.gallery == second.gallery
    with pytest.raises(FileNotFoundError, match=re.escape("cuhk-03.mat")):
        build_dataset("cuhk03", cuhk03_root.root, variant="labeled")  # never extracted


def test_bad_variant_and_missing_files_are_errors(cuhk03_root, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown CUHK03 variant 'both'; choose detected or labeled"):
        build_dataset("cuhk03", cuhk03_root.root, variant="both")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
        build_dataset("cuhk03", tmp_path / "none")
    config = cuhk03_root.root / "cuhk03_new_protocol_config_labeled.mat"
    config.unlink()
    with pytest.raises(FileNotFoundError, match=str(config)):
        build_dataset("cuhk03", cuhk03_root.root, variant="labeled")
