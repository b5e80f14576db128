"""``reid-admin``: operator commands on the gallery, configured by the same REID_* settings as the service.

reid-admin migrate             # apply the database migrations (else the service applies them at start-up)
reid-admin reembed             # recompute every template under REID_WEIGHTS, then switch the gallery to them
reid-admin ingest --tracks T --frames F --camera C   # send a tracker's tracks to a running service (POST /sightings)
reid-admin export-crops --out DIR   # the stored crops with cameras, no names: what `python -m training adapt` reads
"""

from __future__ import annotations

import argparse
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger("app.admin")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid-admin", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="upgrade the database schema in place (Alembic), keeping every row")
    reembed = commands.add_parser(
        "reembed",
        help="re-embed every entry from its stored crop under REID_WEIGHTS (batched, resumable), then switch the "
        "gallery's model fingerprint in one step; on SQLite stop the service first",
    )
    reembed.add_argument("--batch-size", type=int, default=64, help="crops per forward pass (default %(default)s)")
    from app.ingest import add_arguments

    ingest = commands.add_parser(
        "ingest",
        help="send a tracker's MOTChallenge tracks to a running service (POST /sightings): the best crops of each "
        "track cut from its image folder or video, resumable; an HTTP client, needing neither database nor model",
    )
    add_arguments(ingest)
    export = commands.add_parser(
        "export-crops",
        help="write the gallery's stored crops with their cameras, tracks and capture times (no names) as the "
        "manifest `python -m training adapt --site` reads",
    )
    export.add_argument("--out", type=Path, required=True, help="folder for manifest.csv and crops/")
    export.add_argument("--since", type=_time, help="only crops captured at or after this time (RFC 3339)")
    export.add_argument("--until", type=_time, help="only crops captured at or before this time (RFC 3339)")
    return parser


def _time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time such as 2024-05-01T12:00:00Z") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if args.command == "ingest":  # a client of a running service: no REID_* settings, database or torch here
        from app.ingest import run

        level = os.environ.get("REID_LOG_LEVEL", "INFO").upper()
        logging.basicConfig(level=level if level in logging.getLevelNamesMapping() else "INFO", format=log_format)
        return run(args)
    # Imported here: the settings import the model's package (torch), which ingest must not wait for.
    from app.config import load_settings
    from app.db import make_engine

    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper(), format=log_format)
    engine = make_engine(settings.sqlalchemy_url, settings.db_connect_timeout_s)
    try:
        if args.command == "migrate":
            from app import migrate

            before, after = migrate.upgrade(engine)
            logger.info("database schema: %s -> %s", before or "empty", after)
            return 0
        if args.command == "export-crops":
            from app.export_crops import export_crops

            try:
                export_crops(engine, settings.data_dir, args.out, args.since, args.until, progress=True)
            except (ValueError, OSError) as exc:
                logger.error("%s", exc)
                return 1
            return 0
        from app.embedder import Embedder
        from app.gallery import lock_data_dir
        from app.reembed import reembed

        lock = None if engine.dialect.name == "postgresql" else lock_data_dir(settings.data_dir)
        try:
            embedder = Embedder.from_settings(settings)
            reembed(
                engine, settings.data_dir, embedder.embed_sync, embedder.fingerprint, args.batch_size, progress=True
            )
        finally:
            if lock is not None:
                lock.close()
        return 0
    finally:
        engine.dispose()


if __name__ == "__main__":
    raise SystemExit(main())
