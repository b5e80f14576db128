"""Grouping unnamed sightings into provisional people (``models.clustering``) at scale: the kNN graph, then
``group_sightings``' grouping over it, with and without must-link / cannot-link constraints, on synthetic 512-d
unit embeddings of people seen a few times each.

    python -m bench.grouping --n 10000        # seconds
    python -m bench.grouping --n 100000       # the exact kNN graph dominates: ~10 min on 2 cores

The kNN graph is built once and timed; ``group_sightings`` is that graph plus the grouping timed here (its pairs,
their L2 distances and ``constrained_groups``), so its total is the sum of the two.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from bench.common import PeakMemory, Table, add_common_args, mib, report, setup
from models.clustering import constrained_groups, knn, knn_pairs, pair_distances

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
    add_common_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = setup(args)
    started = time.time()
    x, person = sightings(args.n, args.per_person, args.dim, args.spread, args.seed)
    must, cannot = constraints(person, args.constrained, args.seed)
    table = Table(
        "Grouping sightings (models.clustering)",
        ["N", "step", "s", "peak RSS MiB", "edges", "groups", "people", "ARI"],
    )
    logger.info("%d sightings: kNN graph", args.n)
    with PeakMemory() as peak:
        t0 = time.perf_counter()
        _, indices = knn(x, args.k + 1)
        knn_s = time.perf_counter() - t0
    table.add(args.n, f"knn (exact, k={args.k} + itself)", knn_s, mib(peak.bytes), "", "", "", "")
    people = int(person.max()) + 1
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
        table.add(args.n, "group_sightings" + label + " (sum)", knn_s + t2 - t0, "", len(pairs), groups, people, ari)
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
        "knn: exact brute force on numpy's BLAS, a block of rows at a time (FAISS is kept out of models/); "
        "peak RSS: the process's peak resident set during the step above the set before. One run, no repeats.",
        "Tracks: all the sightings of a share of the people as must-link groups; cannot-links: as many random "
        "pairs of sightings of two different people.",
    ]
    report("Grouping sightings", "bench.grouping", [table], started, results, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
