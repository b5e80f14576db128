"""Clustering of re-ID embeddings, shared by the service and training (``models`` is the floor both import).

- ``knn``: exact nearest neighbours of every row among the rows (the graph everything else starts from).
- ``camera_centred``: each camera's mean template taken out, before either grouping.
- ``jaccard_distance`` + ``dbscan``: pseudo-labels for unsupervised domain adaptation, as SpCL / Cluster Contrast
  make them: the k-reciprocal Jaccard distance of Zhong et al. (CVPR 2017), then DBSCAN on it; ``jaccard_pairs``:
  the same distances on a kNN graph found elsewhere (the service's FAISS); ``cluster_overlap``: how far two
  clusterings of the same items agree, per item (SpCL's reliability criterion).
- ``constrained_groups`` + ``group_sightings``: the service's provisional people: single-linkage over a kNN graph
  up to a distance threshold, with must-link (one track) and cannot-link (two overlapping tracks) constraints.

numpy and scipy only (scikit-learn lazily, for DBSCAN): no torch, and no FAISS, which the layout keeps out of
``models`` (tests/test_layout.py); ``knn`` is the same exact brute force as FAISS's ``IndexFlatL2``, on BLAS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

# Up to this many rows the Jaccard distance is a dense (N, N) float32 matrix: 8192^2 * 4 B = 256 MiB, plus a
# block of float64 overlaps while it is filled. Beyond, N^2 grows past what a 24 GiB machine should give one
# step (50k rows: 10 GiB), so only the kNN graph's pairs are kept (sparse, ~N * k1 entries).
DENSE_LIMIT = 8192

_KNN_BLOCK_BYTES = 1 << 28  # one (rows, N) float32 block of distances at a time: 256 MiB whatever N is
_PAIR_CHUNK = 1 << 15  # pairs whose distances are computed at once (bounds the temporaries)


# -- nearest neighbours ----------------------------------------------------------------------------------------


def knn(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(squared L2 distances (N, k) float32, indices (N, k) int64) of each row's k nearest rows, nearest first and
    the row itself always first (distance 0, even among duplicates); k is capped at N.

    Exact brute force, a block of rows at a time (memory O(block * N)), like FAISS's ``IndexFlatL2``. Ties are
    broken by index, so the result depends only on the input (and a permutation of the rows permutes it, ties
    aside)."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"knn needs a non-empty (N, D) array, got shape {x.shape}")
    if k < 1:
        raise ValueError(f"knn needs k >= 1, got {k}")
    n, k = len(x), min(k, len(x))
    norms = np.einsum("ij,ij->i", x, x)
    out_d, out_i = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    block = max(1, min(n, _KNN_BLOCK_BYTES // (4 * n)))
    for start in range(0, n, block):
        rows = np.arange(start, min(n, start + block))
        d = norms[rows, None] + norms[None, :] - 2.0 * (x[rows] @ x.T)
        np.maximum(d, 0.0, out=d)  # rounding can make near-duplicates slightly negative
        d[np.arange(len(rows)), rows] = -1.0  # the row itself first, whatever its duplicates
        cand = np.argpartition(d, k - 1, axis=1)[:, :k] if k < n else np.broadcast_to(np.arange(n), d.shape)
        cand_d = np.take_along_axis(d, cand, axis=1)
        order = np.lexsort((cand, cand_d), axis=1)  # by distance, then index: deterministic ties
        out_i[rows] = np.take_along_axis(cand, order, axis=1)
        out_d[rows] = np.maximum(np.take_along_axis(cand_d, order, axis=1), 0.0)
    return out_d, out_i


def pair_distances(features: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """(m,) L2 distances of the (m, 2) row pairs, in float64 from the difference itself: not ``knn``'s float32
    expansion, so a pair's distance does not depend on where its rows sit (thresholds and ties stay exact)."""
    x = np.asarray(features, dtype=np.float32)
    out = np.empty(len(pairs), np.float64)
    for start in range(0, len(pairs), _PAIR_CHUNK):
        p = pairs[start : start + _PAIR_CHUNK]
        diff = x[p[:, 0]].astype(np.float64) - x[p[:, 1]]
        out[start : start + len(p)] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def knn_pairs(indices: np.ndarray) -> np.ndarray:
    """The undirected pairs (i < j) of a kNN graph (``knn``'s indices), each once, sorted; self-pairs dropped."""
    n, k = indices.shape
    i = np.repeat(np.arange(n, dtype=np.int64), k)
    j = indices.ravel().astype(np.int64)
    keep = i != j
    keys = np.unique(np.minimum(i, j)[keep] * n + np.maximum(i, j)[keep])  # one int64 a pair: a fast unique
    return np.stack([keys // n, keys % n], axis=1)


def unit(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    x = np.asarray(features, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def camera_centred(features: np.ndarray, cameras: np.ndarray, min_rows: int = 1) -> np.ndarray:
    """Unit rows with their camera's mean (of unit rows) taken out, then unit length again: a camera's light,
    angle and background shift all its crops the same way, so that two crops of one camera look closer than
    one person seen by two. A camera with fewer than ``min_rows`` rows has too few for a mean of its own: its
    rows are centred on the mean of all rows instead."""
    x = unit(features)
    cams = np.asarray(cameras)
    out = x - x.mean(axis=0)
    for cam in np.unique(cams):
        rows = cams == cam
        if rows.sum() >= min_rows:
            out[rows] = x[rows] - x[rows].mean(axis=0)
    return unit(out)


# -- k-reciprocal Jaccard distance -----------------------------------------------------------------------------


def k_reciprocal_neighbors(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """R(i, k): the j among i's k nearest (itself included) that have i among their own k nearest."""
    forward = initial_rank[i, : k + 1]
    backward = initial_rank[forward, : k + 1]
    return forward[np.any(backward == i, axis=1)]


def k_reciprocal_encoding(
    initial_rank: np.ndarray, k1: int, k2: int, distances: Callable[[int, np.ndarray], np.ndarray]
) -> sp.csr_matrix:
    """Zhong et al.'s encodings V (N, N), sparse: row i is softmax(-distances(i, members)) over i's k1-reciprocal
    set expanded by the k1/2-reciprocal sets of its members that overlap it by more than 2/3; with k2 > 1 each
    row is then the mean of its k2 nearest rows' (local query expansion). Every row sums to 1.

    ``initial_rank`` (N, >= k1 + 1) holds each row's nearest, itself first. ``distances`` is the caller's, so
    re-ranking (squared L2 over the row's largest) and pseudo-labelling (plain squared L2, as SpCL) share this."""
    n = len(initial_rank)
    half = int(np.around(k1 / 2.0))
    halves = [k_reciprocal_neighbors(initial_rank, j, half) for j in range(n)]  # each is needed many times
    rows, cols, vals = [], [], []
    for i in range(n):
        reciprocal = k_reciprocal_neighbors(initial_rank, i, k1)
        expansion = [reciprocal]
        for candidate in reciprocal:
            cand = halves[int(candidate)]
            if len(np.intersect1d(cand, reciprocal)) > 2.0 / 3 * len(cand):
                expansion.append(cand)
        members = np.unique(np.concatenate(expansion))
        weight = np.exp(-distances(i, members))
        rows.append(np.full(len(members), i))
        cols.append(members)
        vals.append(weight / weight.sum())
    v = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    if k2 > 1:  # local query expansion: each encoding is the mean of its k2 nearest's
        nearest = initial_rank[:, :k2]
        expand = sp.csr_matrix(
            (np.full(nearest.size, 1.0 / k2), (np.repeat(np.arange(n), k2), nearest.ravel())), (n, n)
        )
        v = (expand @ v).tocsr()
    return v


def min_product(a: sp.csr_matrix, b_csc: sp.csc_matrix) -> np.ndarray:
    """(A.rows, B.rows) matrix of sum_c min(A[i, c], B[j, c]) for sparse non-negative A (CSR) and B (CSC over c):
    through B's inverted index, so only the pairs sharing a non-zero dimension cost anything."""
    out = np.zeros((a.shape[0], b_csc.shape[0]), dtype=np.float64)
    for i in range(a.shape[0]):
        start, end = a.indptr[i], a.indptr[i + 1]
        for c, value in zip(a.indices[start:end], a.data[start:end], strict=True):
            lo, hi = b_csc.indptr[c], b_csc.indptr[c + 1]
            if lo < hi:
                out[i, b_csc.indices[lo:hi]] += np.minimum(value, b_csc.data[lo:hi])
    return out


def jaccard_from_encodings(a: sp.csr_matrix, b_csc: sp.csc_matrix) -> np.ndarray:
    """(A.rows, B.rows) Jaccard distances 1 - |a ∩ b| / |a ∪ b| of encodings that each sum to 1, where the
    intersection is the min-product o and the union 2 - o."""
    overlap = min_product(a, b_csc)
    return 1.0 - overlap / (2.0 - overlap)


def _squared_l2_to(x: np.ndarray) -> Callable[[int, np.ndarray], np.ndarray]:
    def distances(i: int, members: np.ndarray) -> np.ndarray:
        diff = x[members].astype(np.float64) - x[i]
        return np.einsum("ij,ij->i", diff, diff)

    return distances


def jaccard_distance(
    features: np.ndarray, k1: int = 20, k2: int = 6, dense_limit: int = DENSE_LIMIT
) -> np.ndarray | sp.csr_matrix:
    """k-reciprocal Jaccard distances in [0, 1] between the rows, as SpCL / Cluster Contrast compute them for
    pseudo-labels (encodings weighted by exp(-squared L2), not normalised: for unit features 2 - 2 cos), with
    the authors' defaults k1 = 20, k2 = 6 and k1 neighbours besides the row itself.

    Up to ``dense_limit`` rows: a dense (N, N) float32 matrix (memory N^2 * 4 B, see ``DENSE_LIMIT``). Beyond: a
    symmetric ``csr_matrix`` holding the distances of the kNN graph's pairs (j among i's k1 nearest or i among
    j's) and the diagonal (explicit zeros); a pair not stored is at distance 1, which is what the dense matrix
    holds for almost every such pair (no shared neighbours). Stored values equal the dense ones."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    n = len(x)
    if k1 < 1 or not 1 <= k2 <= k1 + 1:
        raise ValueError(f"the Jaccard distance needs k1 >= 1 and 1 <= k2 <= k1 + 1, got {k1}, {k2}")
    k1 = min(k1, n - 1)
    k2 = min(k2, k1 + 1)
    _, initial_rank = knn(x, k1 + 1)
    v = k_reciprocal_encoding(initial_rank, k1, k2, _squared_l2_to(x))
    if n <= dense_limit:
        v_csc = v.tocsc()
        out = np.empty((n, n), np.float32)
        block = max(1, _KNN_BLOCK_BYTES // (8 * n))
        for start in range(0, n, block):
            out[start : start + block] = jaccard_from_encodings(v[start : start + block], v_csc)
        return np.clip(out, 0.0, 1.0, out=out)
    pairs, d = _pair_jaccard(v, knn_pairs(initial_rank))
    diag = np.arange(n)
    rows = np.concatenate([pairs[:, 0], pairs[:, 1], diag])
    cols = np.concatenate([pairs[:, 1], pairs[:, 0], diag])
    data = np.concatenate([d, d, np.zeros(n, np.float32)])
    # No duplicates: coo -> csr keeps every entry, explicit zeros (identical neighbourhoods) included.
    return sp.csr_matrix((data, (rows, cols)), shape=(n, n))


def _pair_jaccard(v: sp.csr_matrix, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    overlap = np.empty(len(pairs), np.float64)
    for start in range(0, len(pairs), _PAIR_CHUNK):
        p = pairs[start : start + _PAIR_CHUNK]
        overlap[start : start + len(p)] = np.asarray(v[p[:, 0]].minimum(v[p[:, 1]]).sum(axis=1)).ravel()
    return pairs, np.clip(1.0 - overlap / (2.0 - overlap), 0.0, 1.0).astype(np.float32)


def jaccard_pairs(
    features: np.ndarray, initial_rank: np.ndarray, k1: int = 20, k2: int = 6
) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of a kNN graph (``knn_pairs(initial_rank)``) and their k-reciprocal Jaccard distances, the same
    values ``jaccard_distance`` gives them: for a caller that found the neighbours itself (the service, with
    FAISS). ``initial_rank``: each row's nearest rows, itself first, at least k1 + 1 columns."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    k1 = min(k1, len(x) - 1, initial_rank.shape[1] - 1)
    if k1 < 1:
        return np.empty((0, 2), np.int64), np.empty(0, np.float32)
    k2 = max(1, min(k2, k1 + 1))
    v = k_reciprocal_encoding(initial_rank, k1, k2, _squared_l2_to(x))
    return _pair_jaccard(v, knn_pairs(initial_rank[:, : k1 + 1]))


def dbscan(distances: np.ndarray | sp.spmatrix, eps: float, min_samples: int = 4) -> np.ndarray:
    """DBSCAN labels (N,) int64 over a precomputed (N, N) distance matrix, -1 for noise (Cluster Contrast uses
    eps 0.6 and min_samples 4 on the Jaccard distance).

    Two points are neighbours when their distance is <= ``eps``; a core point has at least ``min_samples``
    neighbours, itself counted. A sparse matrix's missing entries mean "not neighbours" whatever ``eps`` (for
    ``jaccard_distance``'s sparse result, where missing means 1, that is the same for any eps < 1)."""
    from sklearn.cluster import DBSCAN  # only pseudo-labelling needs scikit-learn: the service never loads it

    if not eps > 0 or min_samples < 1:
        raise ValueError(f"DBSCAN needs eps > 0 and min_samples >= 1, got {eps}, {min_samples}")
    if distances.shape[0] != distances.shape[1]:
        raise ValueError(f"DBSCAN needs a square distance matrix, got shape {distances.shape}")
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(distances)
    return labels.astype(np.int64)


def cluster_overlap(labels: np.ndarray, other: np.ndarray) -> np.ndarray:
    """(N,) float64: for each item, the intersection over union of its cluster in ``labels`` and its cluster in
    ``other``, two clusterings of the same items (noise, -1, is the item alone). SpCL's reliability of a cluster:
    against a tighter eps it says how compact the cluster is, against a looser one how independent."""
    a, b = noise_alone(np.asarray(labels)), noise_alone(np.asarray(other))
    a_ids, b_ids = (np.unique(x, return_inverse=True)[1].ravel() for x in (a, b))
    joint_ids = np.unique(a_ids * (int(b_ids.max(initial=0)) + 1) + b_ids, return_inverse=True)[1].ravel()
    size_a, size_b, joint = (np.bincount(ids)[ids] for ids in (a_ids, b_ids, joint_ids))
    return joint / (size_a + size_b - joint)


def noise_alone(labels: np.ndarray) -> np.ndarray:
    """Clustering labels with each noise item (-1) a cluster of its own, numbered after the others."""
    out = labels.astype(np.int64, copy=True)
    noise = out < 0
    out[noise] = out.max(initial=-1) + 1 + np.arange(int(noise.sum()))
    return out


# -- constrained grouping (the service) ------------------------------------------------------------------------


def _first_member_order(keys: np.ndarray) -> np.ndarray:
    """Labels 0..G-1 for per-item group keys, numbered in order of each group's smallest member."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.ravel()]


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    graph = sp.coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def constrained_groups(
    n: int,
    edges: np.ndarray,
    weights: np.ndarray,
    threshold: float,
    must_link: Sequence[Sequence[int]] = (),
    cannot_link: Sequence[tuple[int, int]] = (),
) -> np.ndarray:
    """Group labels (n,) int64, 0..G-1 numbered in order of each group's smallest member.

    Every must-link group is one group first (the crops of one track are one person). Then the edges with
    weight <= ``threshold``, in ascending weight (ties by (i, j), i < j, so the result is deterministic), unite
    their groups unless that would put both items of a cannot-link pair in one group (two tracks overlapping in
    time on one camera are two people); a refused edge does not stop later ones. Raises ValueError when a
    must-link group holds both items of a cannot-link pair.

    Only the components of the thresholded graph that hold both items of some cannot-link pair need the edges
    one by one (Kruskal with cannot-link sets); every other component is one group, found vectorised."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if n == 0:
        return np.empty(0, np.int64)
    weights = np.asarray(weights, dtype=np.float64).ravel()
    if len(edges) != len(weights):
        raise ValueError(f"{len(edges)} edges but {len(weights)} weights")
    if len(edges) and (edges.min() < 0 or edges.max() >= n):
        raise ValueError(f"edges must join items 0..{n - 1}")
    ml_a, ml_b = [], []
    for group in must_link:
        members = np.asarray(group, dtype=np.int64).ravel()
        if len(members) and (members.min() < 0 or members.max() >= n):
            raise ValueError(f"must-link items must be in 0..{n - 1}, got {members.tolist()}")
        ml_a.append(members[:-1])
        ml_b.append(members[1:])
    cl = np.asarray(cannot_link, dtype=np.int64).reshape(-1, 2)
    if len(cl) and (cl.min() < 0 or cl.max() >= n):
        raise ValueError(f"cannot-link items must be in 0..{n - 1}")

    # 1. Must-link groups: the starting groups ("blocks"), each item's block id.
    ml_a = np.concatenate(ml_a) if ml_a else np.empty(0, np.int64)
    ml_b = np.concatenate(ml_b) if ml_b else np.empty(0, np.int64)
    block = _components(n, ml_a, ml_b)
    contradicted = block[cl[:, 0]] == block[cl[:, 1]]
    if contradicted.any():
        a, b = cl[contradicted][0]
        raise ValueError(
            f"items {a} and {b} must not be grouped (cannot-link) but the must-link groups put them in one group"
        )

    # 2. The edges that may unite, as (i < j) between different blocks, in the order they are tried.
    keep = weights <= threshold
    i, j, w = np.minimum(edges[:, 0], edges[:, 1])[keep], np.maximum(edges[:, 0], edges[:, 1])[keep], weights[keep]
    order = np.lexsort((j, i, w))
    bi, bj = block[i[order]], block[j[order]]
    useful = bi != bj
    bi, bj = bi[useful], bj[useful]
    n_blocks = int(block.max()) + 1 if n else 0

    # 3. Components of the thresholded graph over blocks; only those holding a cannot-link pair are refined.
    comp = _components(n_blocks, bi, bj)
    ca, cb = block[cl[:, 0]], block[cl[:, 1]]
    conflicted = np.unique(comp[ca][comp[ca] == comp[cb]])
    group = comp.copy()  # per block: the component id, or for a refined block its Kruskal root + n_blocks
    if len(conflicted):
        in_conflict = np.isin(comp, conflicted)
        sel = in_conflict[bi]
        roots = _kruskal(n_blocks, bi[sel], bj[sel], ca, cb)
        group[in_conflict] = n_blocks + roots[in_conflict]
    return _first_member_order(group[block])


def _kruskal(n: int, a: np.ndarray, b: np.ndarray, ca: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """Roots (n,) after uniting the pairs (a, b) in the order given, refusing a union that would join a
    cannot-link pair (ca, cb). Each root keeps the set of roots it must not join, merged small into large."""
    parent = list(range(n))
    forbid: dict[int, set[int]] = {}
    for x, y in zip(ca.tolist(), cb.tolist(), strict=True):
        forbid.setdefault(x, set()).add(y)
        forbid.setdefault(y, set()).add(x)
    empty: set[int] = set()

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = find(x), find(y)
        if rx == ry:
            continue
        fx, fy = forbid.get(rx, empty), forbid.get(ry, empty)
        if ry in fx:
            continue
        if len(fx) < len(fy):  # the root with more partners stays root: fewer partner sets to rewrite
            rx, ry, fx, fy = ry, rx, fy, fx
        parent[ry] = rx
        if fy:
            for p in fy:  # ry's partners now refuse rx instead
                partners = forbid[p]
                partners.discard(ry)
                partners.add(rx)
            forbid.setdefault(rx, set()).update(fy)
            del forbid[ry]
    return np.array([find(x) for x in range(n)], dtype=np.int64)


def group_sightings(
    features: np.ndarray,
    threshold: float,
    k: int = 10,
    must_link: Sequence[Sequence[int]] = (),
    cannot_link: Sequence[tuple[int, int]] = (),
) -> np.ndarray:
    """Provisional people for unnamed sightings: labels (N,) from ``constrained_groups`` over each sighting's k
    nearest others, the edges weighted by their L2 distance (``threshold`` in the same units: for unit
    embeddings sqrt(2 - 2 cos)). A group is chained through neighbours at most ``threshold`` apart."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    if not len(x):
        return np.empty(0, np.int64)
    _, indices = knn(x, k + 1)  # the row itself comes first: k others
    pairs = knn_pairs(indices)
    return constrained_groups(len(x), pairs, pair_distances(x, pairs), threshold, must_link, cannot_link)
