"""Gallery writes at scale, through ``app.gallery.Gallery``: the time to enroll one crop and to delete one entry
(database commit + index update, what a request waits for) with n entries already in the gallery, and the
background snapshot's cost; with a PostgreSQL URL, also the time a change takes to reach a second replica (its
LISTEN/NOTIFY wake-up and catch-up from its watermark).

    python -m bench.writes                                      # 10k and 100k entries on SQLite
    python -m bench.writes --sizes 10000,100000,1000000         # adds 1M: ~2 GB of embeddings in the database
    python -m bench.writes --sizes 10000 --database-url postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import text

from app.db import Base, make_engine
from app.gallery import Gallery
from bench.common import Table, add_common_args, int_list, median, percentile, report, setup
from bench.index import fill_database, templates

logger = logging.getLogger("bench.writes")


def _crop(i: int) -> tuple[str, str, int, int]:
    return (f"{i:064x}", f"crops/{i:064x}.png", 64, 128)


def write_times(gallery: Gallery, rng: np.random.Generator, count: int, n: int) -> tuple[list[float], list[float]]:
    """(seconds of each of ``count`` one-crop enrolments, of each of ``count`` one-entry deletions)."""
    adds, deletes = [], []
    for i in range(count):
        vector = np.maximum(rng.standard_normal((1, gallery.dim), dtype=np.float32), 0)
        start = time.perf_counter()
        gallery.add(f"bench{i}", "c1", {}, [_crop(10**9 + i)], vector)
        adds.append(time.perf_counter() - start)
    victims = rng.choice(np.arange(1, n + 1), size=count, replace=False)
    for victim in victims:
        start = time.perf_counter()
        gallery.delete([int(victim)])
        deletes.append(time.perf_counter() - start)
    return adds, deletes


def propagation_times(writer: Gallery, replica: Gallery, count: int) -> tuple[list[float], list[float]]:
    """(seconds until an enrolment through ``writer`` is in ``replica``'s index, same for a deletion)."""
    rng = np.random.default_rng(1)
    added, deleted = [], []
    for i in range(count):
        vector = np.maximum(rng.standard_normal((1, writer.dim), dtype=np.float32), 0)
        [entry] = writer.add(f"replica{i}", "c1", {}, [_crop(2 * 10**9 + i)], vector)
        start = time.perf_counter()
        while not replica.state.columns.contains(entry.id):
            time.sleep(0.0005)
        added.append(time.perf_counter() - start)
        writer.delete([entry.id])
        start = time.perf_counter()
        while replica.state.columns.contains(entry.id):
            time.sleep(0.0005)
        deleted.append(time.perf_counter() - start)
        time.sleep(0.02)
    return added, deleted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.writes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int_list, default=[10_000, 100_000], help="entries before the timed writes")
    parser.add_argument("--dim", type=int, default=512, help="template size (the paper's 512)")
    parser.add_argument("--factory", default="Flat", help="REID_INDEX_FACTORY of the gallery (default %(default)s)")
    parser.add_argument("--writes", type=int, default=200, help="timed enrolments, then as many deletions")
    parser.add_argument("--replica-trials", type=int, default=50, help="changes timed to the second replica")
    parser.add_argument(
        "--database-url",
        default=None,
        help="SQLAlchemy URL of an empty database (default: SQLite in a temp dir); PostgreSQL adds the replica table",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic templates")
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = setup(args)
    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    started = time.time()
    writes = Table(
        f"Gallery writes ({args.factory}): one request's database commit and index update",
        [
            "size",
            "database",
            "enroll 1 crop p50 ms",
            "p90 ms",
            "delete 1 entry p50 ms",
            "p90 ms",
            "background snapshot s",
            "snapshot MiB",
        ],
    )
    replicas = Table(
        "Replicas: a change through one Gallery until it is in the other's index (LISTEN/NOTIFY, PostgreSQL)",
        ["size", "enrolment p50 ms", "p90 ms", "max ms", "deletion p50 ms", "p90 ms", "max ms"],
    )
    postgres = bool(args.database_url and args.database_url.startswith("postgresql"))
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="bench-writes-") as tmp:
            url = args.database_url or f"sqlite:///{Path(tmp) / 'reid.db'}"
            logger.info("%d: filling the database", n)
            data, _ = templates(n, args.dim, 10, args.seed)
            fill_database(url, data, 10)
            del data
            engine = make_engine(url)
            gallery = Gallery(engine, Path(tmp) / "data", args.dim, args.factory)
            gallery.open()
            logger.info("%d: timing %d enrolments and %d deletions", n, args.writes, args.writes)
            adds, deletes = write_times(gallery, np.random.default_rng(args.seed), args.writes, n)
            start = time.perf_counter()
            size = gallery.snapshot()
            snapshot_s = time.perf_counter() - start
            writes.add(
                n,
                engine.dialect.name,
                1000 * median(adds),
                1000 * percentile(adds, 90),
                1000 * median(deletes),
                1000 * percentile(deletes, 90),
                snapshot_s,
                size / 2**20,
            )
            if postgres:
                replica = Gallery(make_engine(url), Path(tmp) / "replica", args.dim, args.factory, poll_interval_s=5.0)
                replica.open()
                replica.start_background()
                time.sleep(1.0)  # LISTEN established
                logger.info("%d: timing %d changes to the replica", n, args.replica_trials)
                added, deleted = propagation_times(gallery, replica, args.replica_trials)
                replicas.add(
                    n,
                    *(1000 * f(added) for f in (median, lambda v: percentile(v, 90), max)),
                    *(1000 * f(deleted) for f in (median, lambda v: percentile(v, 90), max)),
                )
                replica.close()
                replica.engine.dispose()
            gallery.close()
            if args.database_url:
                Base.metadata.drop_all(engine)
                with engine.begin() as connection:
                    connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
            engine.dispose()
    writes.notes += [
        f"{args.writes} enrolments of one crop (a {args.dim}-d template; the crop file is not written here), then "
        f"{args.writes} deletions of random entries, one Gallery.add / Gallery.delete call each, in one thread; "
        "the gallery filled beforehand with synthetic entries (and their change-log rows).",
        "background snapshot: Gallery.snapshot() after the writes (index, columns and watermark, fsync; "
        "searches go on meanwhile, writes wait). It is written by the background thread every "
        "REID_SNAPSHOT_EVERY changes / REID_SNAPSHOT_INTERVAL_S, never on a request.",
    ]
    replicas.notes.append(
        f"{args.replica_trials} enrolments and deletions through one Gallery, each timed from its return (committed) "
        "until the other Gallery's index holds it (polled every 0.5 ms); both in one process, the second with its "
        "LISTEN thread and a 5 s poll fallback."
    )
    tables = [writes] + ([replicas] if postgres else [])
    report("Gallery writes", "bench.writes", tables, started, results, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
