"""Grouping unnamed sightings into provisional people at scale, on synthetic 512-d unit embeddings of people seen
a few times each: the kNN graph re-grouping builds (FAISS), then ``models.clustering.constrained_groups`` over it,
with and without must-link / cannot-link constraints; with ``--join-sizes``, one online join on galleries of
those sizes, for each index of ``--join-index``; with ``--regroup-sizes``, all of ``POST /people/regroup`` on
SQLite galleries of those sizes.

    python -m bench.grouping --n 100000 --join-sizes 100000,1000000 --join-index 'Flat;IVF1024;HNSW32'
    python -m bench.grouping --n 1000 --regroup-sizes 100000

"group (sum)" is the kNN graph plus the grouping timed here (its pairs, their L2 distances and the grouping);
"link" is all of what ``POST /people/regroup`` computes between reading the units and writing them
(``app.regroup.link``: each camera's mean out, the kNN graph, k-reciprocal Jaccard distances, the grouping).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import Entry, Person, make_engine
from app.gallery import Gallery
from app.gallery.writes import NewEntry
from app.regroup import EXACT_KNN_MAX, IVF_PROBE, REGROUP_EPS, Linkage, knn_graph, link, regroup
from app.sightings import Sighting, enroll, plan, tracklets_of, unnamed_label
from bench.common import PeakMemory, Table, add_common_args, int_list, mib, percentile, report, setup
from models.clustering import constrained_groups, knn, knn_pairs, pair_distances

T0 = datetime(2026, 3, 1, tzinfo=UTC)

logger = logging.getLogger("bench.grouping")


def sightings(n: int, per_person: int, dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(unit features (n, dim) float32, person of each): noise of norm ~``spread`` around unit centres, so two
    sightings of one person are ~spread * sqrt(2) apart and two people ~sqrt(2)."""
    rng = np.random.default_rng(seed)
    people = max(1, n // per_person)
    centres = rng.standard_normal((people, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    person = np.arange(n) % people
    x = centres[person] + (spread / np.sqrt(dim)) * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, person


def constraints(person: np.ndarray, share: float, seed: int) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Tracks (must-link: all the sightings of a ``share`` of the people, as one track would give them) and
    overlapping tracks (cannot-link: as many pairs of sightings of two different people)."""
    rng = np.random.default_rng(seed + 1)
    people = int(person.max()) + 1
    picked = rng.choice(people, max(1, int(share * people)), replace=False)
    members = {p: [] for p in picked.tolist()}
    for i, p in enumerate(person.tolist()):
        if p in members:
            members[p].append(i)
    must = list(members.values())
    a = rng.integers(0, len(person), len(must))
    b = rng.integers(0, len(person), len(must))
    cannot = [(int(i), int(j)) for i, j in zip(a, b, strict=True) if person[i] != person[j]]
    return must, cannot


def adjusted_rand(truth: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(truth, labels))


def online_joins(sizes: list[int], factories: list[str], dim: int, seed: int, joins: int = 30) -> Table:
    """p50 of one tracklet's online join (``app.sightings.plan``: a FAISS search and indexed reads) and of the
    whole enrolment (plan, crop, commit), on a SQLite gallery of ``n`` entries, for each index factory (the
    service's REID_INDEX_FACTORY, with its default nprobe and efSearch)."""
    table = Table(
        "One online join (app.sightings), SQLite",
        ["index", "gallery entries", "fill s", "plan p50 ms", "plan p95 ms", "enrol p50 ms", "joins"],
    )
    for factory, n in itertools.product(factories, sizes):
        rng = np.random.default_rng(seed)
        with tempfile.TemporaryDirectory(prefix="bench-join-") as tmp:
            engine = make_engine(f"sqlite:///{tmp}/reid.db")
            gallery = Gallery(engine, Path(tmp) / "data", dim, factory, fingerprint="f" * 64, snapshot_every=10**9)
            gallery.open()
            t0 = time.perf_counter()
            for start in range(0, n, 10_000):
                count = min(10_000, n - start)
                vectors = rng.normal(size=(count, dim)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                crops = [(f"{start + i:064x}", "crops/none.png", 32, 64) for i in range(count)]
                gallery.add(f"person{start // 10_000}", f"c{start % 8}", {}, crops, vectors, T0)
            if gallery.state.index.needs_rebuild():  # IVF's training, which the service's worker runs next
                gallery._rebuild()
            fill_s = time.perf_counter() - t0
            served = gallery.state.index.description
            logger.info("%s gallery of %d entries filled in %.0f s: %s", factory, n, fill_s, served)
            plan_s, enrol_s = [], []
            for j in range(joins):
                template = rng.normal(size=(1, dim)).astype(np.float32)
                template /= np.linalg.norm(template)
                sighting = Sighting("c1", T0 + timedelta(minutes=j), str(j))
                tracklet = tracklets_of([sighting])
                t0 = time.perf_counter()
                plan(gallery, tracklet, template, 1.0, timedelta(minutes=10))
                plan_s.append(time.perf_counter() - t0)
                image = Image.new("RGB", (32, 64), (j, 0, 0))
                t0 = time.perf_counter()
                crops = gallery.hold_crops([(image.tobytes(), image)])
                enroll(gallery, [sighting], crops, template, 1.0, "mean", timedelta(minutes=10))
                enrol_s.append(time.perf_counter() - t0)
            gallery.close()
            engine.dispose()
        table.add(
            served,
            n,
            fill_s,
            1e3 * percentile(plan_s, 50),
            1e3 * percentile(plan_s, 95),
            1e3 * percentile(enrol_s, 50),
            joins,
        )
    table.notes.append(
        "Random unit 512-d entries in batches of 10,000 (one identity each), 8 cameras; each join a new random "
        "tracklet of one crop with a track id: the track lookup, one FAISS search for 20 candidates and their "
        "conflict checks (plan), then the enrolment with its crop and commit (enrol; it runs its own plan). "
        "fill s: the enrolment of the random entries, then the rebuild the service's background worker would run "
        "(IVF trained on them); index: what the joins searched."
    )
    return table


def service_regroups(sizes: list[int], per_person: int, dim: int, spread: float, threshold: float, seed: int) -> Table:
    """All of ``POST /people/regroup`` (``app.regroup.regroup``: reading every entry, the grouping, writing what
    moved in one transaction) on a SQLite gallery of ``n`` synthetic sightings, each its own provisional person
    as an online step that joined nothing would leave them: the most a re-grouping has to write."""
    columns = ["sightings", "fill s", "regroup s", "peak RSS MiB", "units", "groups", "entries moved"]
    table = Table(
        "Re-grouping a gallery (app.regroup.regroup, all of POST /people/regroup), SQLite",
        [*columns, "people retired", "ARI"],
    )
    for n in sizes:
        x, person = sightings(n, per_person, dim, spread, seed)
        with tempfile.TemporaryDirectory(prefix="bench-regroup-") as tmp:
            engine = make_engine(f"sqlite:///{tmp}/reid.db")
            gallery = Gallery(engine, Path(tmp) / "data", dim, "Flat", fingerprint="f" * 64, snapshot_every=10**9)
            gallery.open()
            t0 = time.perf_counter()
            for start in range(0, n, 10_000):
                rows = range(start, min(n, start + 10_000))
                new = [NewEntry("", f"c{i % 4}", {}, T0 + timedelta(seconds=i)) for i in rows]
                crops = [(f"{i:064x}", "crops/none.png", 32, 64) for i in rows]
                gallery.enroll_held(new, crops, x[rows.start : rows.stop], before_insert=_person_each)
            fill_s = time.perf_counter() - t0
            logger.info("%d sightings enrolled in %.0f s; re-grouping", n, fill_s)
            with PeakMemory() as peak:
                result = regroup(gallery, threshold)
            with Session(engine) as session:
                grouped = {entry: person for entry, person in session.execute(select(Entry.id, Entry.person_id))}
            gallery.close()
            engine.dispose()
        labels = np.array([grouped[i] for i in sorted(grouped)])  # entry ids follow the enrolment order
        table.add(
            n, fill_s, result.seconds, mib(peak.bytes), result.units, result.groups, result.moved,
            result.retired_people, adjusted_rand(person, labels),
        )  # fmt: skip
    table.notes.append(
        f"The synthetic sightings of the table above ({per_person} per person, 4 cameras, no tracks), enrolled in "
        "batches of 10,000, each sighting its own provisional person; then one re-grouping, timed by itself "
        f"(regroup s: its own figure), threshold {threshold}, Jaccard eps {REGROUP_EPS}. ARI: the people it left "
        "against the synthetic ones."
    )
    return table


def _person_each(session: Session, new: list[NewEntry]) -> None:
    """An enrolment's hook: every new entry its own new provisional person."""
    people = [Person() for _ in new]
    session.add_all(people)
    session.flush()
    for item, p in zip(new, people, strict=True):
        item.identity, item.person_id = unnamed_label(p.id), p.id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="sightings (default %(default)s)")
    parser.add_argument("--per-person", type=int, default=5, help="sightings of each synthetic person")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimensions")
    parser.add_argument("--spread", type=float, default=0.5, help="noise norm around a person's centre")
    parser.add_argument("--k", type=int, default=10, help="neighbours of each sighting in the graph")
    parser.add_argument("--threshold", type=float, default=1.0, help="largest L2 distance that groups")
    parser.add_argument("--constrained", type=float, default=0.1, help="share of people with a track (must-link)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic sightings")
    parser.add_argument("--exact-knn", action="store_true", help="numpy's exact kNN instead of the service's FAISS")
    parser.add_argument(
        "--join-sizes",
        type=int_list,
        default=[],
        help="also time one online join (POST /sightings' decision and commit) on galleries of these sizes",
    )
    parser.add_argument(
        "--join-index",
        type=lambda text: text.split(";"),
        default=["Flat"],
        help="the --join-sizes galleries' index factories, ';' between (default Flat; e.g. 'Flat;IVF1024;HNSW32')",
    )
    parser.add_argument(
        "--regroup-sizes",
        type=int_list,
        default=[],
        help="also time all of POST /people/regroup on SQLite galleries of these many sightings",
    )
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = setup(args)
    started = time.time()
    x, person = sightings(args.n, args.per_person, args.dim, args.spread, args.seed)
    must, cannot = constraints(person, args.constrained, args.seed)
    table = Table(
        "Grouping sightings (app.regroup's kNN graph, models.clustering)",
        ["N", "step", "s", "peak RSS MiB", "edges", "groups", "people", "ARI"],
    )
    logger.info("%d sightings: kNN graph", args.n)
    with PeakMemory() as peak:
        t0 = time.perf_counter()
        if args.exact_knn:
            _, indices = knn(x, args.k + 1)
            how = "numpy exact (models.clustering.knn)"
        else:
            indices = knn_graph(x, args.k + 1)
            how = "FAISS " + ("exact" if args.n <= EXACT_KNN_MAX else f"IVF, nprobe {IVF_PROBE}")
        knn_s = time.perf_counter() - t0
    table.add(args.n, f"knn, {how} (k={args.k} + itself)", knn_s, mib(peak.bytes), "", "", "", "")
    people = int(person.max()) + 1
    logger.info("%d sightings: re-grouping's link (camera centring, kNN graph, Jaccard distances, grouping)", args.n)
    cameras = [f"cam{i % 4}" for i in range(args.n)]
    with PeakMemory() as peak:
        t0 = time.perf_counter()
        labels = link(x, cameras, args.threshold, Linkage(neighbours=args.k), cannot)
        link_s = time.perf_counter() - t0
    table.add(
        args.n, f"link: all of re-grouping's grouping, Jaccard eps {REGROUP_EPS} + {len(cannot)} cannot-links",
        link_s, mib(peak.bytes), "", int(labels.max()) + 1, people, adjusted_rand(person, labels),
    )  # fmt: skip
    for label, ml, cl in [("", (), ()), (f" + {len(must)} tracks, {len(cannot)} cannot-links", must, cannot)]:
        logger.info("%d sightings: grouping%s", args.n, label)
        with PeakMemory() as peak:
            t0 = time.perf_counter()
            pairs = knn_pairs(indices)
            weights = pair_distances(x, pairs)
            t1 = time.perf_counter()
            labels = constrained_groups(args.n, pairs, weights, args.threshold, ml, cl)
            t2 = time.perf_counter()
        groups = int(labels.max()) + 1
        ari = adjusted_rand(person, labels)
        table.add(args.n, "pairs + their L2 distances", t1 - t0, "", len(pairs), "", "", "")
        table.add(args.n, "constrained_groups" + label, t2 - t1, mib(peak.bytes), len(pairs), groups, people, ari)
        table.add(args.n, "group (sum)" + label, knn_s + t2 - t0, "", len(pairs), groups, people, ari)
    # The worst case: a threshold that joins the whole graph, so the cannot-links leave one conflicted component
    # and every edge goes through the one-by-one (Python) union-find.
    logger.info("%d sightings: grouping, every edge one by one", args.n)
    t0 = time.perf_counter()
    labels = constrained_groups(args.n, pairs, weights, np.inf, ml, cl)
    table.add(
        args.n,
        "constrained_groups, threshold inf (every edge one by one)",
        time.perf_counter() - t0,
        "",
        len(pairs),
        int(labels.max()) + 1,
        people,
        "",
    )
    table.notes += [
        f"{args.n} unit {args.dim}-d sightings, {args.per_person} per person, noise norm {args.spread} (one "
        f"person's sightings ~{args.spread * 2**0.5:.2f} apart, two people ~1.41); threshold {args.threshold} "
        f"(L2), k={args.k}. ARI: adjusted Rand index of the groups against the people (1 = exact).",
        "knn: what re-grouping runs (app.regroup.knn_graph: FAISS, exact up to "
        f"{EXACT_KNN_MAX} units, IVF beyond), or with --exact-knn numpy's brute force (models.clustering.knn); "
        "peak RSS: the process's peak resident set during the step above the set before. One run, no repeats.",
        "Tracks: all the sightings of a share of the people as must-link groups; cannot-links: as many random "
        "pairs of sightings of two different people.",
    ]
    tables = [table] + (
        [online_joins(args.join_sizes, args.join_index, args.dim, args.seed)] if args.join_sizes else []
    )
    if args.regroup_sizes:
        tables.append(
            service_regroups(args.regroup_sizes, args.per_person, args.dim, args.spread, args.threshold, args.seed)
        )
    report("Grouping sightings", "bench.grouping", tables, started, results, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
