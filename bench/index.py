"""Gallery search at scale, through the app's own ``VectorIndex`` and ``Gallery``: FAISS flat L2 against IVF and
HNSW on synthetic 512-d templates: build time, memory, queries/s (a batch at once, and one at a time as the
service searches) and recall@10 against flat for each nprobe / efSearch asked for; and the start-up time of
``Gallery.open()`` with the entries in the database: rebuilding the index from it (no snapshot) and loading the
snapshot written at shutdown.

    python -m bench.index                                   # 10k and 100k vectors, a few minutes
    python -m bench.index --sizes 10000,100000,1000000      # adds 1M: ~12 GB at peak, 24 min on one core
    python -m bench.index --sizes 1000000 --nprobe 16,64 --ef-search 64,256 --start-up-factories 'Flat;IVF1000,Flat'

The templates are clustered like a re-ID gallery's (``--per-identity`` images around each identity's centre,
non-negative like the extractor's ReLU output); uniform random vectors would be the worst case for IVF and HNSW.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import insert, text

from app import migrate
from app.db import OP_ADD, Base, Change, Entry, make_engine
from app.gallery import Gallery
from app.index import VectorIndex
from bench.common import (
    PeakMemory,
    Table,
    add_common_args,
    int_list,
    interleaved_rounds,
    median,
    mib,
    paired_ratio,
    report,
    setup,
    time_call,
)

logger = logging.getLogger("bench.index")


def templates(n: int, dim: int, per_identity: int, seed: int, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(gallery (n, dim), centres (n // per_identity, dim)) float32, built in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    centres = np.maximum(rng.standard_normal((max(1, n // per_identity), dim), dtype=np.float32), 0)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        out[start:stop] = centres[rng.integers(0, len(centres), stop - start)]
        out[start:stop] += noise * rng.standard_normal((stop - start, dim), dtype=np.float32)
        np.maximum(out[start:stop], 0, out=out[start:stop])
    return out, centres


def queries(centres: np.ndarray, count: int, seed: int, noise: float = 0.5) -> np.ndarray:
    """New images of gallery identities: the service's queries."""
    rng = np.random.default_rng(seed + 1)
    picked = centres[rng.integers(0, len(centres), count)]
    return np.maximum(picked + noise * rng.standard_normal(picked.shape, dtype=np.float32), 0)


def factories(n: int, args: argparse.Namespace) -> list[tuple[str, str, list[tuple[str, dict[str, int]]]]]:
    """(label, REID_INDEX_FACTORY, [(row label, VectorIndex search settings)]) for a gallery of ``n``."""
    nlist = args.nlist or max(1, round(math.sqrt(n)))  # ~sqrt(n) lists: FAISS's rule of thumb
    ivf = f"IVF{nlist}" + ("" if args.ivf_codes == "Flat" else f",{args.ivf_codes}")
    every = {
        "flat": ("flat", "Flat", [("flat", {})]),
        "ivf": (ivf, f"IVF{nlist},{args.ivf_codes}", [(f"{ivf} nprobe {p}", {"nprobe": p}) for p in args.nprobe]),
        "hnsw": (
            f"HNSW{args.hnsw_m}",
            f"HNSW{args.hnsw_m}",
            [(f"HNSW{args.hnsw_m} efSearch {e}", {"ef_search": e}) for e in args.ef_search],
        ),
    }
    # flat first, always: it is the exact answer that recall is measured against.
    return [every["flat"], *(every[name] for name in args.indexes if name != "flat")]


@dataclass
class Built:
    index: VectorIndex
    build_s: float
    build_memory: int | None
    size_bytes: int


def build(factory: str, ids: np.ndarray, data: np.ndarray) -> Built:
    with PeakMemory() as peak:
        start = time.perf_counter()
        # What the service builds: IVF trained when there are 39 vectors a list, else searched exactly.
        index = VectorIndex.build(data.shape[1], factory, ids, data)
        seconds = time.perf_counter() - start
    return Built(index, seconds, peak.bytes, int(faiss.serialize_index(index.index).nbytes))


def searcher(index: VectorIndex, settings: dict[str, int]):
    """search(queries, k) with ``settings`` (nprobe / ef_search, read at search time) applied first."""

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        for name, value in settings.items():
            setattr(index, name, value)
        return index.search(queries, k)

    return search


def search_rounds(rows: dict[str, object], q: np.ndarray, args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per round of each row (an index at its settings) for the batch ("<label>") and one query at a time
    ("<label> single"), the rows taking turns within each round."""
    calls = {}
    singles = q[: args.single_queries]
    for label, search in rows.items():
        calls[label] = lambda search=search: search(q, args.k)
        calls[f"{label} single"] = lambda search=search: [search(v[None], args.k) for v in singles]
    return interleaved_rounds(calls, args.repeats)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top k that the approximate top k holds, averaged over queries."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def fill_database(url: str, data: np.ndarray, per_identity: int) -> None:
    """The gallery's tables holding ``data`` as entries 1..n and their n "add" changes (what enrolment writes)."""
    engine = make_engine(url)
    migrate.upgrade(engine)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        for start in range(0, len(data), 20_000):
            stop = min(len(data), start + 20_000)
            conn.execute(insert(Change), [{"op": OP_ADD, "entry_id": i + 1, "at": now} for i in range(start, stop)])
            rows = [
                {
                    "id": i + 1,
                    "identity": f"{i // per_identity:07d}",
                    "camera": f"c{i % 6 + 1}",
                    "meta": {},
                    "created_at": now,
                    "captured_at": now,
                    "content_sha256": f"{i:064x}",
                    "crop_path": f"crops/{i:064x}.png",
                    "width": 64,
                    "height": 128,
                    "embedding": data[i].astype("<f4").tobytes(),
                }
                for i in range(start, stop)
            ]
            conn.execute(insert(Entry), rows)
        if engine.dialect.name == "postgresql":  # explicit ids do not advance the id sequence
            conn.execute(text("SELECT setval(pg_get_serial_sequence('reid_entries', 'id'), :n)"), {"n": len(data)})
    engine.dispose()


def start_up_seconds(url: str, data_dir: Path, dim: int, factory: str) -> tuple[float, float, int, float]:
    """(Gallery.open() with no snapshot: a rebuild, writing the snapshot at shutdown, the snapshot's bytes,
    Gallery.open() again: the snapshot loaded)."""
    index_file = data_dir / "gallery.faiss"
    index_file.unlink(missing_ok=True)
    times, size = [], 0
    for expect_rebuild in (True, False):
        engine = make_engine(url)
        gallery = Gallery(engine, data_dir, dim, factory)
        times.append(time_call(gallery.open))
        assert gallery.rebuilt == expect_rebuild, f"expected rebuilt={expect_rebuild} for {factory}"
        if expect_rebuild:
            times.append(time_call(gallery.close))  # the shutdown snapshot
            size = index_file.stat().st_size
        else:
            gallery.close()
        engine.dispose()
        del gallery
        gc.collect()
    index_file.unlink(missing_ok=True)
    return times[0], times[1], size, times[2]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.index", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=int_list,
        default=[10_000, 100_000],
        help="gallery sizes (default %(default)s; 1000000 alone took 24 min on one core, ~12 GB at peak: 2 GB a "
        "copy of the vectors, three indexes, the database, and HNSW builds of 9 min)",
    )
    parser.add_argument("--dim", type=int, default=512, help="template size (the paper's 512)")
    parser.add_argument("--queries", type=int, default=1000, help="queries searched as one batch")
    parser.add_argument("--single-queries", type=int, default=200, help="queries searched one at a time")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (recall@k)")
    parser.add_argument("--per-identity", type=int, default=10, help="synthetic images per identity")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: about sqrt of the size)")
    parser.add_argument(
        "--nprobe", type=int_list, default=[16], help="IVF lists searched per query; a list gives a row each"
    )
    parser.add_argument(
        "--indexes",
        type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
        default=["flat", "ivf", "hnsw"],
        help="index types to build, comma-separated among flat, ivf, hnsw (flat is always built: recall's truth)",
    )
    parser.add_argument("--ivf-codes", default="Flat", choices=["Flat", "SQ8"], help="IVF list encoding")
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node")
    parser.add_argument("--ef-search", type=int_list, default=[64], help="HNSW efSearch; a list gives a row each")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each search (median)")
    parser.add_argument(
        "--no-start-up", action="store_true", help="skip the start-up (database rebuild and load) measurement"
    )
    parser.add_argument(
        "--start-up-factories",
        default=None,
        help="REID_INDEX_FACTORY values whose start-up is measured, separated by ';' (default: the searched ones; "
        "an HNSW rebuild at 1M takes ~9 min on one core)",
    )
    parser.add_argument(
        "--database-url", default=None, help="SQLAlchemy URL of an empty database (default: SQLite in a temp dir)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic templates")
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = sorted(set(args.indexes) - {"flat", "ivf", "hnsw"})
    if unknown:
        parser.error(f"unknown index types {unknown}; choose among flat, ivf, hnsw")
    results = setup(args)
    if args.threads is not None:
        faiss.omp_set_num_threads(args.threads)
    started = time.time()
    search = Table(
        "FAISS search (app.index.VectorIndex)",
        [
            "size",
            "index",
            "build s",
            "build peak RSS MiB",
            "index MiB",
            "queries/s (batch)",
            "x flat (batch)",
            "queries/s (one at a time)",
            "x flat (one at a time)",
            f"recall@{args.k}",
        ],
    )
    start_up = Table(
        "Start-up: Gallery.open() with the entries in the database",
        [
            "size",
            "REID_INDEX_FACTORY",
            "rebuild from the database s",
            "write the snapshot s",
            "snapshot MiB",
            "load the snapshot s",
        ],
    )
    for n in args.sizes:
        logger.info("%d templates of %d dimensions", n, args.dim)
        data, centres = templates(n, args.dim, args.per_identity, args.seed)
        q = queries(centres, args.queries, args.seed)
        ids = np.arange(1, n + 1, dtype=np.int64)
        built: dict[str, Built] = {}
        rows: dict[str, tuple[Built, object]] = {}
        for label, factory, settings in factories(n, args):
            logger.info("%d: building %s", n, label)
            built[label] = build(factory, ids, data)
            if built[label].index.spec.needs_training and not built[label].index.trained_on:
                logger.warning("%d: %s is too small to train: searched exactly, as the service does", n, label)
            for row, setting in settings:
                rows[row] = (built[label], searcher(built[label].index, setting))
        logger.info("%d: searching", n)
        times = search_rounds({label: s for label, (_, s) in rows.items()}, q, args)
        flat = next(iter(rows))
        truth = built["flat"].index.search(q, args.k)[1]
        singles = min(args.single_queries, len(q))
        for label, (b, searcher_) in rows.items():
            search.add(
                n,
                label,
                b.build_s,
                mib(b.build_memory),
                b.size_bytes / 2**20,
                len(q) / median(times[label]),
                paired_ratio(times[flat], times[label]),
                singles / median(times[f"{label} single"]),
                paired_ratio(times[f"{flat} single"], times[f"{label} single"]),
                recall_at_k(searcher_(q, args.k)[1], truth),
            )
        factory_strings = [b.index.factory for b in built.values()]
        if args.start_up_factories:
            factory_strings = [f.strip() for f in args.start_up_factories.split(";") if f.strip()]
        del built, rows, times
        gc.collect()
        if not args.no_start_up:
            with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
                url = args.database_url or f"sqlite:///{Path(tmp) / 'reid.db'}"
                logger.info("%d: filling the database", n)
                fill_database(url, data, args.per_identity)
                for factory in factory_strings:
                    logger.info("%d: start-up with REID_INDEX_FACTORY=%s", n, factory)
                    rebuild, write, size, load = start_up_seconds(url, Path(tmp), args.dim, factory)
                    start_up.add(n, factory, rebuild, write, size / 2**20, load)
                if args.database_url:
                    engine = make_engine(url)
                    Base.metadata.drop_all(engine)
                    with engine.begin() as connection:
                        connection.execute(text("DROP TABLE IF EXISTS alembic_version"))
                    engine.dispose()
        del data
        gc.collect()
    search.notes += [
        f"{args.queries} queries at once (FAISS threads: {faiss.omp_get_max_threads()}) and {args.single_queries} "
        f"one at a time as the service searches; k={args.k}; medians of {args.repeats} rounds, the indexes "
        "taking turns in each. x flat: median over rounds of flat's time / this index's (> 1 is faster).",
        "build: add() including IVF training, on all the vectors at once; build peak RSS: the process's peak "
        "resident set during it above the set before; index MiB: faiss.serialize_index size (the index file).",
        f"Synthetic clustered templates, {args.per_identity} per identity; recall@{args.k}: share of flat's "
        f"top {args.k} found.",
    ]
    start_up.notes.append(
        "The app's start-up path: Gallery.open() over "
        + ("the given database" if args.database_url else "SQLite")
        + " holding the entries; with no snapshot it reads every embedding and builds the index (IVF trained), "
        "the shutdown writes a snapshot (index, columns, watermark; fsync), the next open() reads it and replays "
        "the changes after its watermark (none here)."
    )
    tables = [search] + ([] if args.no_start_up else [start_up])
    report("Gallery search", "bench.index", tables, started, results, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
