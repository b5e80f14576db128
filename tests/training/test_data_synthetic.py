"""The synthetic Market-1501 generator: a layout the reader accepts, junk and distractors, deterministic."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from training.data import build_dataset
from training.data.market1501 import parse_market1501_name
from training.data.synthetic import generate_synthetic_market1501


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.jpg")}


def test_layout_is_read_by_the_market1501_reader(tmp_path: Path) -> None:
    root = generate_synthetic_market1501(tmp_path / "syn", num_ids=12, images_per_id=6, num_cams=3, size=(64, 32))
    for name in ("market1501", "synthetic"):
        dataset = build_dataset(name, root)
        train_ids, query_ids = {s.pid for s in dataset.train}, {s.pid for s in dataset.query}
        assert train_ids == set(range(1, 7)) and query_ids == set(range(7, 13))
        assert len(dataset.train) == 36 and {s.camid for s in dataset.train} == {0, 1, 2}
        assert {s.pid for s in dataset.gallery} == query_ids | {0}  # distractors kept in the gallery
        for pid in query_ids:  # one query per camera, and a gallery match in another camera for each
            cams = [s.camid for s in dataset.query if s.pid == pid]
            assert len(cams) == len(set(cams)) == 3
            assert all(any(g.pid == pid and g.camid != c for g in dataset.gallery) for c in cams)
    gallery_files = sorted((root / "bounding_box_test").glob("*.jpg"))
    pids = [parse_market1501_name(p)[0] for p in gallery_files]
    assert pids.count(-1) == 3 and pids.count(0) == 6  # num_ids // 4 junk, num_ids // 2 distractors
    with Image.open(gallery_files[0]) as image:
        assert image.size == (32, 64) and image.mode == "RGB"


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    kwargs = dict(num_ids=8, images_per_id=5, num_cams=2, size=(32, 16))
    a = _digest(generate_synthetic_market1501(tmp_path / "a", seed=4, **kwargs))
    b = _digest(generate_synthetic_market1501(tmp_path / "b", seed=4, **kwargs))
    c = _digest(generate_synthetic_market1501(tmp_path / "c", seed=5, **kwargs))
    assert a == b and len(a) == len(c) and a != c


def test_defaults_match_the_documented_size(tmp_path: Path) -> None:
    dataset = build_dataset("synthetic", generate_synthetic_market1501(tmp_path / "d"))
    assert len({s.pid for s in dataset.train}) == 30 and len(dataset.train) == 30 * 8
    assert len(dataset.query) + sum(s.pid != 0 for s in dataset.gallery) == 30 * 8
    assert {s.camid for s in dataset.gallery} == {0, 1, 2, 3}


def test_bad_arguments_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 <= num_cams <= 6"):
        generate_synthetic_market1501(tmp_path, num_cams=7)
