"""``reid-admin``: operator commands on the gallery, configured by the same REID_* settings as the service.

reid-admin migrate             # apply the database migrations (else the service applies them at start-up)
reid-admin reembed             # recompute every template under REID_WEIGHTS, then switch the gallery to them
"""

from __future__ import annotations

import argparse
import logging

from app.config import load_settings
from app.db import make_engine

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = make_engine(settings.sqlalchemy_url, settings.db_connect_timeout_s)
    try:
        if args.command == "migrate":
            from app import migrate

            before, after = migrate.upgrade(engine)
            logger.info("database schema: %s -> %s", before or "empty", after)
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
