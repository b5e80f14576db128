"""Your own cameras: one folder per identity, or any folder with a ``manifest.csv`` of ``path,pid,camid,split``.

Manifest form (takes precedence where ``root/manifest.csv`` exists)::

    path,pid,camid,split
    train/0000_00.jpg,0,0,train
    val/0000_00.jpg,1000,0,val

``path`` is relative to ``root`` (or absolute). ``split`` is ``train``/``query``/``gallery``, or ``train``/``val``
where the val images of camera ``query_camid`` are the queries and the rest of val is the gallery (the protocol
of ../shared/data/cuhk03-detected: camera 0 queries, camera 1 gallery).

Identity-folder form::

    root/<identity>/<anything>.jpg                  every image is a training image
    root/{train,query,gallery}/<identity>/*.jpg     the three splits

Identity folders named by a number keep it as the pid; otherwise the sorted folder names are numbered 0, 1, ...
(``info["pid_names"]`` keeps the names). The camera comes from a ``c<N>`` token in the file name (``x_c2_7.jpg``
-> camid 1), else 0; give cameras through the manifest when evaluating, since the protocol only matches an
identity across different cameras.
"""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

from training.data.base import ReidDataset, Sample

logger = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("path", "pid", "camid", "split")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CAMERA_TOKEN = re.compile(r"(?:^|[_\-.])c(\d+)(?=[_\-.s])", re.IGNORECASE)


def read_folder(root: str | Path, query_camid: int = 0) -> ReidDataset:
    """A manifest folder or an identity-folder tree under ``root`` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"folder data set root {root} does not exist")
    if (root / MANIFEST).is_file():
        return read_manifest(root / MANIFEST, query_camid=query_camid)
    if all((root / split).is_dir() for split in ("train", "query", "gallery")):
        pid_names: dict[str, int] = {}
        splits = {
            split: _read_identity_folders(root / split, split, pid_names) for split in ("train", "query", "gallery")
        }
    else:
        pid_names = {}
        splits = {"train": _read_identity_folders(root, "train", pid_names), "query": [], "gallery": []}
    dataset = ReidDataset(name="folder", **splits, info={"root": str(root), "pid_names": pid_names})
    logger.info("%s", dataset.summary())
    return dataset


def _camid_from_name(name: str) -> int:
    match = CAMERA_TOKEN.search(name)
    return int(match.group(1)) - 1 if match and int(match.group(1)) > 0 else 0


def _read_identity_folders(folder: Path, split: str, pid_names: dict[str, int]) -> list[Sample]:
    identities = sorted(p for p in folder.iterdir() if p.is_dir())
    if not identities:
        raise ValueError(f"{split} folder {folder} has no identity folders (expected {folder}/<identity>/<image>.jpg)")
    samples: list[Sample] = []
    for identity in identities:
        if identity.name not in pid_names:
            # Numeric folder names keep their number, so the same person keeps one pid across splits.
            numeric = identity.name.isdigit() and all(n.isdigit() for n in pid_names)
            pid_names[identity.name] = int(identity.name) if numeric else len(pid_names)
        pid = pid_names[identity.name]
        for path in sorted(identity.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                samples.append(Sample(path=path, pid=pid, camid=_camid_from_name(path.name)))
    if not samples:
        raise ValueError(f"{split} folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return samples


def read_manifest(manifest: str | Path, query_camid: int = 0) -> ReidDataset:
    """``manifest.csv`` (``path,pid,camid,split``) -> train/query/gallery; see the module docstring."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest {manifest} does not exist")
    root = manifest.parent
    rows: dict[str, list[Sample]] = {"train": [], "query": [], "gallery": [], "val": []}
    missing: list[Path] = []
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not set(MANIFEST_COLUMNS) <= {c.strip() for c in reader.fieldnames}:
            raise ValueError(
                f"manifest {manifest} must have the columns {','.join(MANIFEST_COLUMNS)}, got {reader.fieldnames}"
            )
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            split = row["split"].lower()
            if split not in rows:
                raise ValueError(f"{manifest} line {line}: split {row['split']!r}; choose train, query, gallery or val")
            try:
                pid, camid = int(row["pid"]), int(row["camid"])
            except ValueError:
                raise ValueError(f"{manifest} line {line}: pid and camid must be integers, got {row}") from None
            if camid < 0:
                raise ValueError(f"{manifest} line {line}: camid must be >= 0, got {camid}")
            path = Path(row["path"])
            path = path if path.is_absolute() else root / path
            if not path.is_file():
                missing.append(path)
            rows[split].append(Sample(path=path, pid=pid, camid=camid))
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise FileNotFoundError(f"{manifest}: {len(missing)} listed images do not exist, e.g. {shown}")
    if rows["val"]:
        if rows["query"] or rows["gallery"]:
            raise ValueError(f"{manifest} mixes a val split with query/gallery splits: use one or the other")
        rows["query"] = [s for s in rows["val"] if s.camid == query_camid]
        rows["gallery"] = [s for s in rows["val"] if s.camid != query_camid]
        if not rows["query"]:
            cams = sorted({s.camid for s in rows["val"]})
            raise ValueError(f"{manifest}: no val image has query_camid {query_camid}; val cameras are {cams}")
    for split in ("query", "gallery"):  # no train split is fine: a site to evaluate (or adapt to) has none
        if not rows[split]:
            raise ValueError(f"{manifest} has no {split} images")
    dataset = ReidDataset(
        name="folder",
        train=rows["train"],
        query=rows["query"],
        gallery=rows["gallery"],
        info={"root": str(root), "manifest": str(manifest), "query_camid": query_camid},
    )
    logger.info("%s", dataset.summary())
    return dataset
