"""``reid-admin export-crops``: the gallery's stored crops with their cameras, track ids and capture times, and
no names, as the manifest ``python -m training adapt`` reads (docs/TRAINING.md, "Adapting to a site").

One row per entry: ``path,camid,camera,track,captured_at``. ``camid`` numbers the cameras by name (an entry
without a camera gets its own ""), ``path`` points into ``crops/`` beside the manifest, where each stored crop
is hard-linked (copied across file systems) once, under its content-addressed name. The identity and person
columns are never read: a site's adaptation learns from pictures and cameras alone. A rerun skips the crops
already there and rewrites the manifest whole."""

from __future__ import annotations

import csv
import logging
import os
import shutil
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from tqdm import tqdm

from app.db import Entry
from models.files import atomic_path

logger = logging.getLogger(__name__)

COLUMNS = ("path", "camid", "camera", "track", "captured_at")
READ_BATCH = 5_000


def _place(source: Path, target: Path) -> None:
    """``target`` holds ``source``'s bytes: a hard link, or a copy where the two lie on different file systems."""
    if target.exists() and target.stat().st_size == source.stat().st_size:
        return  # content-addressed: the same name is the same crop
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def export_crops(
    engine: Engine,
    data_dir: Path,
    out: Path,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: bool = False,
) -> int:
    """Write ``out/manifest.csv`` and ``out/crops/``; the number of rows. ``since``/``until`` bound the capture
    time (inclusive)."""
    query = select(Entry.id, Entry.crop_path, Entry.camera, Entry.track, Entry.captured_at).order_by(Entry.id)
    if since is not None:
        query = query.where(Entry.captured_at >= since)
    if until is not None:
        query = query.where(Entry.captured_at <= until)
    with Session(engine) as session:
        cameras = sorted({c or "" for c in session.scalars(select(Entry.camera).distinct())})
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        if total == 0:
            raise ValueError(
                "the gallery holds no crops to export" + (" in that time window" if since or until else "")
            )
        camid = {name: i for i, name in enumerate(cameras)}
        crops = out / "crops"
        crops.mkdir(parents=True, exist_ok=True)
        missing = 0
        seen: set[str] = set()  # the cameras of the rows written (camids number every camera of the gallery)
        with atomic_path(out / "manifest.csv") as tmp, tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            rows = session.execute(query.execution_options(yield_per=READ_BATCH))
            for entry_id, crop_path, camera, track, captured_at in tqdm(
                rows, total=total, desc="exporting crops", unit="crop", disable=not progress
            ):
                source = data_dir / crop_path
                if not source.is_file():  # deleted by a replica meanwhile, or a damaged data folder
                    missing += 1
                    logger.warning("entry %d: its crop %s is missing; left out", entry_id, source)
                    continue
                name = Path(crop_path).name
                _place(source, crops / name)
                stamp = captured_at.isoformat() if captured_at is not None else ""
                writer.writerow([f"crops/{name}", camid[camera or ""], camera or "", track or "", stamp])
                seen.add(camera or "")
    written = total - missing
    logger.info("wrote %s: %d crops of %d cameras%s", out / "manifest.csv", written, len(seen),
                f", {missing} missing" if missing else "")  # fmt: skip
    return written
