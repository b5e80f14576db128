"""models.clustering: kNN, the k-reciprocal Jaccard distance (dense and sparse), DBSCAN's eps, and the service's
constrained grouping (must-link, cannot-link, determinism); re-ranking unchanged by the move of its core."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from models.clustering import (
    camera_centred,
    cluster_overlap,
    constrained_groups,
    dbscan,
    group_sightings,
    jaccard_distance,
    jaccard_pairs,
    knn,
    knn_pairs,
    pair_distances,
)
from training.evaluation import _blocked_knn, euclidean_distmat, k_reciprocal_rerank


def _blobs(people: int, per_person: int, dim: int = 32, spread: float = 0.15, seed: int = 0):
    """Unit-normalised sightings around random unit centres: (features, true labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((people, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(people), per_person)
    x = centres[labels] + spread * rng.standard_normal((len(labels), dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two labellings are one partition up to renaming (noise -1 kept as its own label)."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# -- knn -------------------------------------------------------------------------------------------------------


def test_knn_is_exact_with_the_row_first_even_among_duplicates() -> None:
    x, _ = _blobs(6, 5, seed=1)
    x[7] = x[3]  # a duplicate: 3 and 7 are at distance 0 from each other
    d, idx = knn(x, 6)
    assert idx.shape == d.shape == (30, 6) and (idx[:, 0] == np.arange(30)).all() and (d[:, 0] == 0).all()
    assert idx[3, 1] == 7 and idx[7, 1] == 3
    full = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(full, -1)
    expected = np.argsort(full, axis=1, kind="stable")[:, :6]
    assert (idx == expected).all()
    np.testing.assert_allclose(d[:, 1:], np.take_along_axis(full, expected, 1)[:, 1:], atol=1e-5)
    assert knn(x, 100)[1].shape == (30, 30)  # capped at N


# -- Jaccard distance and DBSCAN: pseudo-labels ------------------------------------------------------------------


def test_dense_and_sparse_jaccard_agree() -> None:
    x, _ = _blobs(12, 8, spread=0.6, seed=2)
    dense = jaccard_distance(x, k1=10, k2=4)
    sparse = jaccard_distance(x, k1=10, k2=4, dense_limit=0)
    assert isinstance(dense, np.ndarray) and dense.shape == (96, 96) and sp.issparse(sparse)
    coo = sparse.tocoo()
    assert (coo.row == coo.col).sum() == 96  # the diagonal is stored (zeros kept)
    np.testing.assert_allclose(coo.data, dense[coo.row, coo.col], atol=1e-6)
    assert abs(sparse - sparse.T).max() == 0  # exactly symmetric
    # the pairs left out share (almost) no neighbours: far beyond the eps DBSCAN is used with (0.6)
    stored = np.zeros(dense.shape, bool)
    stored[coo.row, coo.col] = True
    assert dense[~stored].min() > 0.8 and np.median(dense[~stored]) == 1
    assert (dbscan(dense, 0.6) == dbscan(sparse, 0.6)).all()
    # with every pair in the kNN graph the sparse matrix is the dense one, entry for entry
    small = x[:30]
    full = jaccard_distance(small, k1=29, k2=6, dense_limit=0)
    assert full.nnz == 30 * 30
    np.testing.assert_allclose(full.toarray(), jaccard_distance(small, k1=29, k2=6), atol=1e-6)


def test_jaccard_pairs_on_a_graph_found_elsewhere_are_the_distances_of_the_matrix() -> None:
    x, _ = _blobs(12, 8, spread=0.6, seed=3)
    _, rank = knn(x, 11)
    pairs, d = jaccard_pairs(x, rank, k1=10, k2=4)
    np.testing.assert_array_equal(pairs, knn_pairs(rank))
    np.testing.assert_allclose(d, jaccard_distance(x, k1=10, k2=4)[pairs[:, 0], pairs[:, 1]], atol=1e-6)
    assert jaccard_pairs(x[:1], rank[:1, :1], k1=10)[0].shape == (0, 2)  # one row: no pair


def test_with_a_query_expansion_of_2_mutual_first_neighbours_are_at_jaccard_distance_0() -> None:
    # k2 2 averages each row's encoding with its nearest's: two rows that are each other's nearest get one and the
    # same encoding (FINCH's first-neighbour link), however many strangers their wider neighbourhoods hold.
    x, _ = _blobs(12, 8, spread=0.6, seed=4)
    _, rank = knn(x, 11)
    first = rank[:, 1]
    mutual = np.flatnonzero(first[first] == np.arange(len(x)))
    assert len(mutual) > 0
    d = jaccard_distance(x, k1=10, k2=2)
    np.testing.assert_allclose(d[mutual, first[mutual]], 0.0, atol=1e-6)
    one_way = np.flatnonzero(first[first] != np.arange(len(x)))
    assert (d[one_way, first[one_way]] > 0).all()
    assert (jaccard_distance(x, k1=10, k2=6)[mutual, first[mutual]] > 0).any()  # not so with Zhong et al.'s 6


def test_camera_centring_takes_out_each_cameras_shift() -> None:
    rng = np.random.default_rng(0)
    people = rng.normal(size=(20, 16))
    shift = 3 * rng.normal(size=16)
    x = np.concatenate([people, people + shift])  # the same 20 people through two cameras, one shifted
    cameras = np.array([0] * 20 + [1] * 20)
    centred = camera_centred(x, cameras)
    np.testing.assert_allclose(np.linalg.norm(centred, axis=1), 1.0, atol=1e-5)
    nearest = knn(centred, 2)[1][:, 1]
    assert (nearest == np.r_[np.arange(20, 40), np.arange(20)]).all()  # each one's nearest: itself, other camera
    assert (knn(x, 2)[1][:20, 1] < 20).all()  # uncentred: a crop of its own camera
    few = camera_centred(x, cameras, min_rows=21)  # too few rows for a camera's own mean: the overall one
    np.testing.assert_allclose(few, camera_centred(x, np.zeros(40)), atol=1e-6)


def test_jaccard_distance_has_the_properties_of_one() -> None:
    x, _ = _blobs(5, 6, seed=3)
    d = jaccard_distance(x, k1=6, k2=3)
    assert d.dtype == np.float32 and (d >= 0).all() and (d <= 1).all()
    np.testing.assert_allclose(np.diag(d), 0, atol=1e-6)
    np.testing.assert_allclose(d, d.T, atol=1e-6)


@pytest.mark.parametrize("dense_limit", [10_000, 0])
def test_pseudo_labels_recover_well_separated_people(dense_limit: int) -> None:
    x, truth = _blobs(15, 8, dim=64, spread=0.5, seed=4)
    labels = dbscan(jaccard_distance(x, k1=8, k2=3, dense_limit=dense_limit), eps=0.6, min_samples=4)
    assert (labels >= 0).all() and _same_partition(labels, truth)


def test_identical_neighbourhoods_stay_neighbours_in_the_sparse_matrix() -> None:
    """Near-duplicates have Jaccard distance 0: stored as explicit zeros, which DBSCAN must count."""
    x, _ = _blobs(3, 4, seed=5)
    x = np.repeat(x, 2, axis=0)  # every sighting twice: identical encodings
    sparse = jaccard_distance(x, k1=3, k2=1, dense_limit=0)
    assert sparse[0, 1] == 0 and (sparse.tocoo().data == 0).sum() > 24
    assert dbscan(sparse, eps=1e-3, min_samples=2).tolist() == np.repeat(np.arange(12), 2).tolist()


@pytest.mark.parametrize("sparse", [False, True])
def test_dbscan_eps_is_the_largest_distance_of_neighbours(sparse: bool) -> None:
    """Points 0-1 and 2-3 at distance just under / exactly eps are neighbours; 4 is just over eps from 3."""
    eps = 0.5
    d = np.ones((5, 5))
    np.fill_diagonal(d, 0)
    for a, b, value in [(0, 1, np.nextafter(eps, 0)), (2, 3, eps), (3, 4, np.nextafter(eps, 1))]:
        d[a, b] = d[b, a] = value
    matrix = sp.csr_matrix(d) if sparse else d
    assert dbscan(matrix, eps, min_samples=2).tolist() == [0, 0, 1, 1, -1]
    assert dbscan(matrix, float(np.nextafter(eps, 1)), min_samples=2).tolist() == [0, 0, 1, 1, 1]
    # min_samples counts the point itself: a pair is not enough for 3
    assert dbscan(matrix, eps, min_samples=3).tolist() == [-1] * 5


def test_sparse_missing_pairs_are_not_neighbours_whatever_eps() -> None:
    d = sp.csr_matrix(np.array([[0.0, 0.2, 0.0], [0.2, 0.0, 0.0], [0.0, 0.0, 0.0]]))  # 2 joins nobody
    assert dbscan(d, eps=5.0, min_samples=2).tolist() == [0, 0, -1]


def test_cluster_overlap_is_each_items_intersection_over_union() -> None:
    labels = np.array([0, 0, 0, 1, 1, -1, -1])
    other = np.array([5, 5, 7, 7, 7, -1, 5])  # other numbers, the same kind of clustering
    # 0: {0,1,2} vs {0,1,6} -> 2/4; 2: {0,1,2} vs {2,3,4} -> 1/5; 3: {3,4} vs {2,3,4} -> 2/3;
    # 5: alone in both -> 1; 6: alone vs {0,1,6} -> 1/3
    expected = [2 / 4, 2 / 4, 1 / 5, 2 / 3, 2 / 3, 1.0, 1 / 3]
    assert np.allclose(cluster_overlap(labels, other), expected)
    assert np.allclose(cluster_overlap(labels, labels), 1.0)
    assert np.allclose(cluster_overlap(other, labels), expected)  # symmetric


# -- constrained grouping: the service ---------------------------------------------------------------------------


def test_groups_follow_the_threshold_in_weight_order() -> None:
    edges = np.array([[0, 1], [1, 2], [3, 4], [2, 3]])
    weights = np.array([0.1, 0.3, 0.2, 0.31])
    assert constrained_groups(6, edges, weights, 0.3).tolist() == [0, 0, 0, 1, 1, 2]
    assert constrained_groups(6, edges, weights, 0.31).tolist() == [0, 0, 0, 0, 0, 1]
    assert constrained_groups(6, edges, weights, 0.05).tolist() == [0, 1, 2, 3, 4, 5]


def test_must_link_is_kept_even_when_far_apart() -> None:
    x, _ = _blobs(4, 5, seed=6)
    plain = group_sightings(x, threshold=0.5, k=4)
    assert len(set(plain.tolist())) == 4 and plain[0] != plain[19]
    linked = group_sightings(x, threshold=0.5, k=4, must_link=[[0, 19]])  # one track across two people
    assert len(set(linked.tolist())) == 3 and linked[0] == linked[19] == linked[5 * 3]


def test_cannot_link_is_kept_even_when_identical() -> None:
    x = np.repeat(np.eye(4, 8, dtype=np.float32), 3, axis=0)  # 4 people, each 3 identical sightings
    assert group_sightings(x, threshold=0.1, k=5).tolist() == np.repeat(np.arange(4), 3).tolist()
    labels = group_sightings(x, threshold=0.1, k=5, cannot_link=[(0, 2)], must_link=[[1, 2]])
    assert labels[0] != labels[2] and labels[1] == labels[2]
    assert labels.tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]


def test_cannot_link_blocks_chains_and_later_edges_still_unite() -> None:
    # a chain 0-1-2-3 by increasing weight; 0 and 3 may not meet: the last edge of the chain is refused
    edges = np.array([[0, 1], [1, 2], [2, 3], [3, 4]])
    weights = np.array([0.1, 0.2, 0.3, 0.05])
    labels = constrained_groups(5, edges, weights, 1.0, cannot_link=[(0, 3)])
    assert labels.tolist() == [0, 0, 0, 1, 1]
    # ties broken by (i, j): (0, 1) before (1, 2), whichever order the edges are given in
    tied = constrained_groups(3, np.array([[2, 1], [1, 0]]), np.array([0.2, 0.2]), 1.0, cannot_link=[(0, 2)])
    assert tied.tolist() == [0, 0, 1]


def test_contradictory_constraints_are_refused_with_a_sentence() -> None:
    with pytest.raises(ValueError, match="items 0 and 2 must not be grouped"):
        constrained_groups(4, np.empty((0, 2)), np.empty(0), 1.0, must_link=[[0, 1], [1, 2]], cannot_link=[(0, 2)])
    with pytest.raises(ValueError, match="must not be grouped"):
        constrained_groups(2, np.empty((0, 2)), np.empty(0), 1.0, cannot_link=[(1, 1)])


def test_grouping_is_deterministic_and_does_not_depend_on_the_order() -> None:
    x, truth = _blobs(40, 5, dim=64, spread=0.5, seed=7)  # within a person ~0.7 apart, between people ~1.4
    # cannot-links inside people 1, 0 and 20 split them (the edge-by-edge path); a must-link joins people 10, 11
    must, cannot = [[0, 1, 2], [50, 55]], [(5, 6), (100, 7), (0, 3), (100, 101)]
    labels = group_sightings(x, threshold=0.9, k=6, must_link=must, cannot_link=cannot)
    assert (labels == group_sightings(x, threshold=0.9, k=6, must_link=must, cannot_link=cannot)).all()
    _, first = np.unique(labels, return_index=True)
    assert (np.diff(first) > 0).all() and labels[0] == 0  # numbered by smallest member
    assert labels[5] != labels[6] and labels[0] != labels[3] and labels[100] != labels[101] and labels[50] == labels[55]
    assert 40 - 1 + 3 <= len(set(labels.tolist())) <= 40 - 1 + 3 + 3  # each split makes two or three groups
    perm = np.random.default_rng(8).permutation(len(x))
    where = np.argsort(perm)  # item i of x is item where[i] of x[perm]
    shuffled = group_sightings(
        x[perm],
        threshold=0.9,
        k=6,
        must_link=[[int(where[i]) for i in g] for g in must],
        cannot_link=[(int(where[a]), int(where[b])) for a, b in cannot],
    )
    assert _same_partition(shuffled[where], labels)
    assert not _same_partition(labels, truth)  # the constraints did change the partition


def test_grouping_matches_the_sightings_of_well_separated_people() -> None:
    x, truth = _blobs(30, 6, dim=64, spread=0.5, seed=9)  # within a person ~0.7 apart, between people ~1.4
    assert _same_partition(group_sightings(x, threshold=1.0, k=5), truth)
    assert len(set(group_sightings(x, threshold=0.3, k=5).tolist())) == len(x)  # nobody that close


def test_graph_helpers() -> None:
    x, _ = _blobs(3, 3, seed=10)
    _, idx = knn(x, 3)
    pairs = knn_pairs(idx)
    assert (pairs[:, 0] < pairs[:, 1]).all() and len(np.unique(pairs, axis=0)) == len(pairs)
    expected = np.linalg.norm(x[pairs[:, 0]].astype(np.float64) - x[pairs[:, 1]], axis=1)
    np.testing.assert_allclose(pair_distances(x, pairs), expected, rtol=1e-12)


def test_constrained_groups_scale_to_many_conflicted_edges() -> None:
    """Every edge in one conflicted component (the slow path): 20k items, 200k edges."""
    rng = np.random.default_rng(11)
    n, m = 20_000, 200_000
    edges = rng.integers(0, n, (m, 2))
    cannot = [tuple(p) for p in rng.integers(0, n, (2000, 2)).tolist() if p[0] != p[1]]
    labels = constrained_groups(n, edges, rng.random(m), 0.5, cannot_link=cannot)
    assert all(labels[a] != labels[b] for a, b in cannot)
    assert len(set(labels.tolist())) < n // 2  # the edges did unite


# -- re-ranking, unchanged by the move ---------------------------------------------------------------------------


def _old_k_reciprocal_neighbors(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
    forward = initial_rank[i, : k + 1]
    backward = initial_rank[forward, : k + 1]
    return forward[np.any(backward == i, axis=1)]


def _old_min_product(a, b_csc) -> np.ndarray:
    out = np.zeros((a.shape[0], b_csc.shape[0]), dtype=np.float64)
    for i in range(a.shape[0]):
        start, end = a.indptr[i], a.indptr[i + 1]
        for c, value in zip(a.indices[start:end], a.data[start:end], strict=True):
            lo, hi = b_csc.indptr[c], b_csc.indptr[c + 1]
            if lo < hi:
                out[i, b_csc.indices[lo:hi]] += np.minimum(value, b_csc.data[lo:hi])
    return out


def _old_k_reciprocal_rerank(q_feats, g_feats, k1=20, k2=6, lambda_value=0.3, block=512) -> np.ndarray:
    """training.evaluation.k_reciprocal_rerank as it was before its core moved to models.clustering."""
    feats = torch.cat([q_feats, g_feats]).float().cpu()
    num_q, n = len(q_feats), len(q_feats) + len(g_feats)
    k1 = min(k1, n - 1)
    half = int(np.around(k1 / 2.0))
    initial_rank, row_max = _blocked_knn(feats, k1 + 1, block)
    rows, cols, vals = [], [], []
    for i in range(n):
        reciprocal = _old_k_reciprocal_neighbors(initial_rank, i, k1)
        expansion = [reciprocal]
        for candidate in reciprocal:
            cand = _old_k_reciprocal_neighbors(initial_rank, int(candidate), half)
            if len(np.intersect1d(cand, reciprocal)) > 2.0 / 3 * len(cand):
                expansion.append(cand)
        members = np.unique(np.concatenate(expansion))
        d = euclidean_distmat(feats[i : i + 1], feats[members])[0].double().numpy() / max(row_max[i], 1e-12)
        weight = np.exp(-d)
        rows.append(np.full(len(members), i))
        cols.append(members)
        vals.append(weight / weight.sum())
    v = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    if k2 > 1:
        nearest = initial_rank[:, :k2]
        expand = sp.csr_matrix(
            (np.full(nearest.size, 1.0 / k2), (np.repeat(np.arange(n), k2), nearest.ravel())), (n, n)
        )
        v = (expand @ v).tocsr()
    v_gallery = v[num_q:].tocsc()
    final = np.empty((num_q, n - num_q), dtype=np.float32)
    for start in range(0, num_q, block):
        q = slice(start, min(start + block, num_q))
        d = euclidean_distmat(feats[q], feats[num_q:]).double().numpy() / np.maximum(row_max[q, None], 1e-12)
        overlap = _old_min_product(v[q], v_gallery)
        jaccard = 1.0 - overlap / (2.0 - overlap)
        final[q] = (1.0 - lambda_value) * jaccard + lambda_value * d
    return final


@pytest.mark.parametrize(("k1", "k2", "lambda_value", "block"), [(20, 6, 0.3, 512), (5, 1, 0.0, 7), (8, 3, 1.0, 4)])
def test_rerank_gives_exactly_what_it_gave_before_the_move(k1: int, k2: int, lambda_value: float, block: int) -> None:
    g = torch.Generator().manual_seed(12)
    qf, gf = torch.randn(13, 16, generator=g), torch.randn(45, 16, generator=g)
    expected = _old_k_reciprocal_rerank(qf, gf, k1, k2, lambda_value, block)
    np.testing.assert_array_equal(k_reciprocal_rerank(qf, gf, k1, k2, lambda_value, block), expected)
