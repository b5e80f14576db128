"""Market-1501 and DukeMTMC-reID readers on fixtures in the real layout, and the real Market-1501 names."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, require_shared
from training.data import DATASETS, build_dataset, parse_dukemtmc_name, parse_market1501_name


def _expected(files, split: str) -> Counter:
    """The reader's rules, applied to what the fixture wrote: junk out everywhere, distractors only in the gallery."""
    return Counter(
        (f.path, f.pid, f.camid)
        for f in files
        if f.split == split and f.pid != -1 and (f.pid != 0 or split == "gallery")
    )


@pytest.mark.parametrize("name", ["market1501", "synthetic"])
def test_market1501_reads_every_split_with_junk_and_distractor_rules(market_root, name: str) -> None:
    dataset = build_dataset(name, market_root.root)
    assert dataset.name == name
    for split in ("train", "query", "gallery"):
        got = Counter((s.path, s.pid, s.camid) for s in getattr(dataset, split))
        assert got == _expected(market_root.files, split), split
    assert all(s.pid != -1 for split in (dataset.train, dataset.query, dataset.gallery) for s in split)
    assert sum(s.pid == 0 for s in dataset.gallery) == 3 and all(s.pid != 0 for s in dataset.train)
    # Hand count of MARKET_LAYOUT: train ids {2, 7, 11}, 7 images, cameras {0, 2, 1, 5, 3}.
    assert len({s.pid for s in dataset.train}) == 3 and len(dataset.train) == 7
    assert {s.camid for s in dataset.train} == {0, 1, 2, 3, 5}
    assert len(dataset.query) == 4 and len(dataset.gallery) == 10


def test_dukemtmc_reads_every_split(duke_root) -> None:
    dataset = build_dataset("dukemtmc", duke_root.root)
    for split in ("train", "query", "gallery"):
        got = Counter((s.path, s.pid, s.camid) for s in getattr(dataset, split))
        assert got == _expected(duke_root.files, split), split
    assert {s.camid for s in dataset.train} == {0, 1, 2, 6, 7}  # c1, c2, c3, c7, c8
    assert len({s.pid for s in dataset.train}) == 3 and len(dataset.gallery) == 5


def test_real_market1501_names_parse() -> None:
    folder = require_shared(SHARED_DATA / "market1501-samples")
    paths = sorted(folder.glob("*.jpg"))
    assert len(paths) == 58
    for path in paths:
        pid, camid = parse_market1501_name(path)
        # Oracle: the name's own characters, read by position (PPPP_cC...).
        assert pid == int(path.name[:4]) and camid == int(path.name[6]) - 1
        assert 0 <= camid <= 5
    assert any(parse_market1501_name(p)[0] == 0 for p in paths)  # the distractor


@pytest.mark.parametrize(
    ("name", "expected"),
    [("0002_c1s1_000451_03.jpg", (2, 0)), ("-1_c3s2_012345_01.jpg", (-1, 2)), ("0000_c6s4_002427_02.jpg", (0, 5))],
)
def test_market1501_name_parser(name: str, expected: tuple[int, int]) -> None:
    assert parse_market1501_name(name) == expected


def test_dukemtmc_name_parser() -> None:
    assert parse_dukemtmc_name("0001_c2_f0046182.jpg") == (1, 1)
    assert parse_dukemtmc_name("0730_c8_f0231654.jpg") == (730, 7)


@pytest.mark.parametrize("bad", ["0002_c1_f0046182.jpg", "person_c1s1_000451_03.jpg", "0002_c7s1_000451_03.jpg"])
def test_unparsable_market_name_is_an_error_naming_the_path(market_root, bad: str) -> None:
    path = market_root.root / "query" / bad
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=bad):
        build_dataset("market1501", market_root.root)


def test_missing_folder_is_an_error_naming_the_path(market_root, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        build_dataset("market1501", tmp_path / "nowhere")
    for path in (market_root.root / "query").iterdir():
        path.unlink()
    (market_root.root / "query").rmdir()
    with pytest.raises(FileNotFoundError, match=str(market_root.root / "query")):
        build_dataset("market1501", market_root.root)


def test_empty_split_is_an_error_naming_the_path(duke_root) -> None:
    query = duke_root.root / "query"
    for path in query.iterdir():
        path.unlink()
    with pytest.raises(ValueError, match=f"{query}.*no usable"):
        build_dataset("dukemtmc", duke_root.root)


def test_a_split_of_junk_only_is_empty(market_root) -> None:
    query = market_root.root / "query"
    for path in query.iterdir():
        path.rename(query / ("-1" + path.name[4:]))
    with pytest.raises(ValueError, match=str(query)):
        build_dataset("market1501", market_root.root)


def test_unknown_dataset_lists_the_names(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="unknown dataset 'viper'; choose market1501, dukemtmc, cuhk03, folder, synthetic"
    ):
        build_dataset("viper", tmp_path)
    assert set(DATASETS) == {"market1501", "dukemtmc", "cuhk03", "folder", "synthetic"}
