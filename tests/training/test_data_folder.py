"""Folder data sets: the CSV manifest (train/query/gallery or train/val), identity folders, the real CUHK03 crops."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, require_shared
from tests.training.conftest import write_jpg
from training.config import TrainConfig
from training.data import build_dataset
from training.data.loaders import build_loaders


def test_manifest_val_split_takes_queries_from_query_camid(manifest_root) -> None:
    for query_camid in (0, 1):
        dataset = build_dataset("folder", manifest_root.root, query_camid=query_camid)
        val = [f for f in manifest_root.files if f.split == "val"]
        assert Counter((s.path, s.pid, s.camid) for s in dataset.query) == Counter(
            (f.path, f.pid, f.camid) for f in val if f.camid == query_camid
        )
        assert Counter((s.path, s.pid, s.camid) for s in dataset.gallery) == Counter(
            (f.path, f.pid, f.camid) for f in val if f.camid != query_camid
        )
        assert len(dataset.train) == 20 and {s.pid for s in dataset.train} == set(range(5))
    assert len(dataset.query) == 6 and len(dataset.gallery) == 8  # query_camid=1: 1003 has no camera-1 image


def test_manifest_with_query_and_gallery_splits(tmp_path: Path) -> None:
    rows = ["path,pid,camid,split"]
    for i, (pid, camid, split) in enumerate([(1, 0, "train"), (1, 1, "train"), (2, 0, "query"), (2, 1, "gallery")]):
        write_jpg(tmp_path / f"img{i}.png", i)
        rows.append(f"img{i}.png,{pid},{camid},{split}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    dataset = build_dataset("folder", tmp_path)
    assert [(s.path.name, s.pid, s.camid) for s in dataset.query] == [("img2.png", 2, 0)]
    assert [(s.path.name, s.pid, s.camid) for s in dataset.gallery] == [("img3.png", 2, 1)]
    assert len(dataset.train) == 2


@pytest.mark.parametrize(
    ("row", "error", "match"),
    [
        ("a.jpg,1,0,test", ValueError, "line 3: split 'test'; choose train, query, gallery or val"),
        ("a.jpg,one,0,train", ValueError, "line 3: pid and camid must be integers"),
        ("nowhere.jpg,1,0,train", FileNotFoundError, "nowhere.jpg"),
    ],
)
def test_bad_manifest_rows_are_errors_naming_the_file(tmp_path: Path, row: str, error: type, match: str) -> None:
    write_jpg(tmp_path / "a.jpg", 0)
    (tmp_path / "manifest.csv").write_text(f"path,pid,camid,split\na.jpg,1,0,train\n{row}\n")
    with pytest.raises(error, match=match) as info:
        build_dataset("folder", tmp_path)
    assert str(tmp_path / "manifest.csv") in str(info.value)


def test_manifest_with_an_empty_split_or_no_query_camera_is_an_error(manifest_root) -> None:
    manifest = manifest_root.root / "manifest.csv"
    with pytest.raises(ValueError, match=f"{manifest}: no val image has query_camid 5; val cameras are \\[0, 1\\]"):
        build_dataset("folder", manifest_root.root, query_camid=5)
    lines = [line for line in manifest.read_text().splitlines() if not line.endswith(",train")]
    manifest.write_text("\n".join(lines) + "\n")
    site = build_dataset("folder", manifest_root.root)  # a site to evaluate has no train split
    assert site.train == [] and site.query and site.gallery
    config = TrainConfig(dataset="folder", root=str(manifest_root.root))
    with pytest.raises(ValueError, match=f"{manifest_root.root} has no train images: fit needs some"):
        build_loaders(config)
    lines = [line for line in lines if not line.endswith(",val")]
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{manifest} has no query images"):
        build_dataset("folder", manifest_root.root)


def test_identity_folders(tmp_path: Path) -> None:
    for i, name in enumerate(["alice/x_c1_0.jpg", "alice/x_c2_1.jpg", "bob/cam/c3s1_2.jpg", "carol/a.png"]):
        write_jpg(tmp_path / name, i)
    (tmp_path / "bob" / "notes.txt").write_text("not an image")
    dataset = build_dataset("folder", tmp_path)
    got = sorted((s.path.relative_to(tmp_path).as_posix(), s.pid, s.camid) for s in dataset.train)
    assert got == [
        ("alice/x_c1_0.jpg", 0, 0),
        ("alice/x_c2_1.jpg", 0, 1),
        ("bob/cam/c3s1_2.jpg", 1, 2),
        ("carol/a.png", 2, 0),
    ]
    assert dataset.info["pid_names"] == {"alice": 0, "bob": 1, "carol": 2}
    assert dataset.query == [] and dataset.gallery == []


def test_identity_folders_in_three_splits_keep_numeric_ids(tmp_path: Path) -> None:
    for i, name in enumerate(
        ["train/0007/a_c1.jpg", "query/0012/b_c1.jpg", "gallery/0012/c_c2.jpg", "gallery/0003/d_c1.jpg"]
    ):
        write_jpg(tmp_path / name, i)
    dataset = build_dataset("folder", tmp_path)
    assert [(s.pid, s.camid) for s in dataset.train] == [(7, 0)]
    assert [(s.pid, s.camid) for s in dataset.query] == [(12, 0)]
    assert sorted((s.pid, s.camid) for s in dataset.gallery) == [(3, 0), (12, 1)]


def test_folder_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        build_dataset("folder", tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'} has no identity folders"):
        build_dataset("folder", tmp_path / "empty")
    (tmp_path / "empty" / "alice").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'} holds no images"):
        build_dataset("folder", tmp_path / "empty")


def test_real_cuhk03_detected_manifest_counts() -> None:
    root = require_shared(SHARED_DATA / "cuhk03-detected")
    dataset = build_dataset("folder", root, query_camid=0)
    assert len(dataset.train) == 7239 and len({s.pid for s in dataset.train}) == 743
    assert len(dataset.query) == 451 and len(dataset.gallery) == 487
    assert {s.pid for s in dataset.query} | {s.pid for s in dataset.gallery} == set(range(1000, 1100))
    assert {s.camid for s in dataset.query} == {0} and {s.camid for s in dataset.gallery} == {1}
    assert {s.camid for s in dataset.train} == {0, 1}
    assert not {s.pid for s in dataset.train} & {s.pid for s in dataset.query}
