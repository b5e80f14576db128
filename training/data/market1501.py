"""Market-1501 and DukeMTMC-reID: three flat folders of crops whose names carry the identity and the camera.

Layout (both data sets)::

    root/bounding_box_train/  0002_c1s1_000451_03.jpg ...   (Market)   0001_c2_f0046182.jpg ... (Duke)
    root/query/
    root/bounding_box_test/

pid -1 is junk (bad detections): dropped from every split. pid 0 (``0000``) is Market's distractor class (people
outside the identities): kept in the gallery, where it only has to rank low, and dropped from train and query,
where it would be taken for one person. The vocabulary and the parsing follow torchreid's ``Market1501``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from training.data.base import ReidDataset, Sample

logger = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
JUNK_PID = -1
DISTRACTOR_PID = 0

# 0002_c1s1_000451_03.jpg: pid, camera 1-6, sequence, frame, box; junk is -1_c1s1_...
MARKET_NAME = re.compile(r"^(-1|\d+)_c(\d)s(\d+)_(\d+)_(\d+)\.jpg$")
# 0001_c2_f0046182.jpg: pid, camera 1-8, frame
DUKE_NAME = re.compile(r"^(-1|\d+)_c(\d)_f(\d+)\.jpg$")


def _parse(path: Path, pattern: re.Pattern[str], num_cams: int) -> tuple[int, int]:
    match = pattern.match(path.name)
    if match is None:
        raise ValueError(f"cannot parse the file name {path}: expected names like {_example(pattern)}")
    pid, cam = int(match.group(1)), int(match.group(2))
    if not 1 <= cam <= num_cams:
        raise ValueError(f"camera c{cam} in {path} is out of range: this data set has cameras c1..c{num_cams}")
    return pid, cam - 1


def _example(pattern: re.Pattern[str]) -> str:
    return "0002_c1s1_000451_03.jpg" if pattern is MARKET_NAME else "0001_c2_f0046182.jpg"


def parse_market1501_name(path: str | Path) -> tuple[int, int]:
    """``0002_c1s1_000451_03.jpg`` -> (pid 2, camid 0); ValueError naming the path where it does not parse."""
    return _parse(Path(path), MARKET_NAME, num_cams=6)


def parse_dukemtmc_name(path: str | Path) -> tuple[int, int]:
    """``0001_c2_f0046182.jpg`` -> (pid 1, camid 1); ValueError naming the path where it does not parse."""
    return _parse(Path(path), DUKE_NAME, num_cams=8)


def _read_split(folder: Path, split: str, pattern: re.Pattern[str], num_cams: int) -> list[Sample]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{split} folder {folder} does not exist")
    samples: list[Sample] = []
    dropped = {JUNK_PID: 0, DISTRACTOR_PID: 0}
    for path in sorted(folder.glob("*.jpg")):
        pid, camid = _parse(path, pattern, num_cams)
        if pid == JUNK_PID or (pid == DISTRACTOR_PID and split != "gallery"):
            dropped[pid] += 1
            continue
        samples.append(Sample(path=path, pid=pid, camid=camid))
    if not samples:
        raise ValueError(f"{split} folder {folder} holds no usable .jpg images")
    if any(dropped.values()):
        logger.info("%s: dropped %d junk and %d distractor images", folder, dropped[JUNK_PID], dropped[DISTRACTOR_PID])
    return samples


def _read(name: str, root: str | Path, pattern: re.Pattern[str], num_cams: int) -> ReidDataset:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{name} root {root} does not exist")
    splits = {split: _read_split(root / d, split, pattern, num_cams) for split, d in SPLIT_DIRS.items()}
    dataset = ReidDataset(name=name, **splits, info={"root": str(root)})
    logger.info("%s", dataset.summary())
    return dataset


def read_market1501(root: str | Path, name: str = "market1501") -> ReidDataset:
    """Market-1501 (Zheng et al., ICCV 2015) under ``root``; also the synthetic data set, which has its layout."""
    return _read(name, root, MARKET_NAME, num_cams=6)


def read_dukemtmc(root: str | Path) -> ReidDataset:
    """DukeMTMC-reID (Ristani et al. 2016, Zheng et al. 2017) under ``root``."""
    return _read("dukemtmc", root, DUKE_NAME, num_cams=8)
