"""A site's crops as adaptation reads them: each crop's path and camera, never who it shows.

A site is given as a manifest (``manifest.csv`` with a ``path`` column and a ``camid`` or ``camera`` column; any
``pid`` or ``split`` column is left unread here) or as a folder of crops: ``root/<camera>/**/*.jpg`` gives each
crop its camera, crops directly under ``root`` share one. ``site_identities`` reads a manifest's ``pid`` column
for ``--eval`` alone: nothing that trains calls it (tests/training/test_adapt.py shuffles that column and gets
the same weights)."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
MANIFEST = "manifest.csv"


@dataclass(frozen=True)
class SiteCrop:
    path: Path
    camid: int  # 0-based camera index at this site


@dataclass
class Site:
    root: Path
    crops: list[SiteCrop]
    cameras: list[str]  # camera names by camid

    def sha256(self) -> str:
        """The crop list's hash (each crop's path below the root, camera and size): the weights' provenance
        names the crops they were adapted to."""
        digest = hashlib.sha256()
        for crop in self.crops:
            relative = crop.path.relative_to(self.root) if crop.path.is_relative_to(self.root) else crop.path
            digest.update(f"{relative.as_posix()}\t{self.cameras[crop.camid]}\t{crop.path.stat().st_size}\n".encode())
        return digest.hexdigest()


def _manifest_path(root: Path) -> Path | None:
    if root.is_file():
        return root
    return root / MANIFEST if (root / MANIFEST).is_file() else None


def read_site(root: str | Path) -> Site:
    """The crops under ``root`` (a folder, or a manifest file or a folder holding ``manifest.csv``), in a fixed
    order (sorted by path), with their cameras."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"site {root} does not exist")
    manifest = _manifest_path(root)
    rows = _read_manifest(manifest) if manifest is not None else _read_folder(root)
    if not rows:
        raise ValueError(f"site {root} holds no crops (.jpg, .jpeg, .png or .bmp)")
    names = sorted({camera for _, camera in rows}, key=_camera_order)
    camid = {name: i for i, name in enumerate(names)}
    base = manifest.parent if manifest is not None else root
    crops = sorted((SiteCrop(path, camid[camera]) for path, camera in rows), key=lambda c: c.path)
    return Site(base, crops, names)


def _camera_order(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _read_manifest(manifest: Path) -> list[tuple[Path, str]]:
    rows: list[tuple[Path, str]] = []
    missing: list[Path] = []
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = {c.strip() for c in reader.fieldnames or []}
        if "path" not in columns:
            raise ValueError(f"manifest {manifest} needs a path column (and camid or camera), got {reader.fieldnames}")
        camera_column = "camid" if "camid" in columns else "camera" if "camera" in columns else None
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            path = Path(row["path"])
            path = path if path.is_absolute() else manifest.parent / path
            if not path.is_file():
                missing.append(path)
            rows.append((path, row[camera_column] if camera_column else ""))
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise FileNotFoundError(f"{manifest}: {len(missing)} listed crops do not exist, e.g. {shown}")
    return rows


def _read_folder(root: Path) -> list[tuple[Path, str]]:
    rows = []
    for path in root.rglob("*"):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            parts = path.relative_to(root).parts
            rows.append((path, parts[0] if len(parts) > 1 else ""))
    return rows


def site_identities(site: Site) -> list[int] | None:
    """Each crop's identity from the manifest's ``pid`` column, in the site's crop order; None without one. For
    ``--eval`` only: the figures printed as adaptation goes."""
    manifest = _manifest_path(site.root)
    if manifest is None:
        return None
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        if "pid" not in {c.strip() for c in reader.fieldnames or []}:
            return None
        pid = {}
        for row in reader:
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            path = Path(row["path"])
            pid[path if path.is_absolute() else manifest.parent / path] = int(row["pid"])
    return [pid[crop.path] for crop in site.crops]
