"""The search behind POST /query against a NumPy brute force: one batched search per request, every filter
combination (cameras kept, cameras dropped, time window), track queries (mean and min); the GPU k bound; the
default threshold the weights carry."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from app.db import make_engine
from app.gallery import EntryFilter, Gallery
from app.index import GPU_MAX_K, VectorIndex
from app.search import ScoreCurve, search, similarity, weights_threshold
from training.export import fmr_curve

DIM = 8
T0 = datetime(2026, 1, 1, tzinfo=UTC)
CAMERAS = ["c1", "c2", "c3", None]


@pytest.fixture
def filled(
    tmp_path: Path, database_url: str | None
) -> tuple[Gallery, dict[int, tuple[np.ndarray, str | None, datetime]]]:
    engine = make_engine(database_url or f"sqlite:///{tmp_path / 'g.db'}")
    gallery = Gallery(engine, tmp_path, DIM)
    gallery.open()
    rng = np.random.default_rng(0)
    truth: dict[int, tuple[np.ndarray, str | None, datetime]] = {}
    for n in range(24):  # 24 enrolments of 1 to 3 crops: 4 cameras, one every hour
        camera, at = CAMERAS[n % 4], T0 + timedelta(hours=n)
        vectors = rng.normal(size=(1 + n % 3, DIM)).astype(np.float32)
        crops = [(f"{n}-{i}", f"crops/{n}-{i}.png", 32, 64) for i in range(len(vectors))]
        for entry, vector in zip(gallery.add(f"p{n % 7}", camera, {}, crops, vectors, at), vectors, strict=True):
            truth[entry.id] = (vector, camera, at)
    yield gallery, truth
    engine.dispose()


def _accepts(where: EntryFilter, camera: str | None, at: datetime) -> bool:
    """The filter's meaning, written out for the brute force (an entry with no camera fails a `cameras` list)."""
    if where.cameras is not None and camera not in where.cameras:
        return False
    if camera is not None and camera in where.exclude_cameras:
        return False
    return (where.after is None or at >= where.after) and (where.before is None or at < where.before)


def _brute(
    truth: dict, queries: np.ndarray, where: EntryFilter | None, track: str, k: int
) -> list[list[tuple[int, float]]]:
    kept = [i for i, (_, camera, at) in truth.items() if where is None or _accepts(where, camera, at)]
    vectors = np.stack([truth[i][0] for i in kept]) if kept else np.zeros((0, DIM), np.float32)
    if track == "mean":
        queries = queries.mean(0, keepdims=True)
    d = np.sqrt(((queries[:, None, :] - vectors[None]) ** 2).sum(-1))  # (n, kept)
    if track == "min":
        d = d.min(0, keepdims=True)
    return [sorted(zip(kept, row.tolist(), strict=True), key=lambda x: (x[1], x[0]))[:k] for row in d]


FILTERS = [
    EntryFilter(cameras, exclude, after, before)
    for cameras, exclude, after, before in itertools.product(
        [None, ("c1",), ("c1", "c2")],
        [(), ("c2",)],
        [None, T0 + timedelta(hours=5)],
        [None, T0 + timedelta(hours=17)],
    )
]


@pytest.mark.parametrize("track", ["none", "mean", "min"])
def test_search_matches_brute_force_with_every_filter(filled, track: str) -> None:
    gallery, truth = filled
    queries = np.random.default_rng(1).normal(size=(3, DIM)).astype(np.float32)
    calls = []
    search_once = gallery.search

    def counted(*args, **kwargs):
        calls.append(args)
        return search_once(*args, **kwargs)

    gallery.search = counted
    for where in [None, *FILTERS]:
        for k in (1, 5, 100):
            calls.clear()
            got = search(gallery, queries, k, where, track)
            assert len(calls) == 1  # one batched search for all the query vectors
            expected = _brute(truth, queries, where, track, k)
            assert len(got) == (3 if track == "none" else 1)
            for matches, want in zip(got, expected, strict=True):
                assert [m.id for m in matches] == [i for i, _ in want], (where, k)
                np.testing.assert_allclose([m.distance for m in matches], [d for _, d in want], rtol=1e-4, atol=1e-4)
                for m in matches:
                    _, camera, at = truth[m.id]
                    assert m.camera == camera and m.captured_at == at
                    assert where is None or _accepts(where, m.camera, m.captured_at)


def test_filter_keeping_nothing_answers_nothing(filled) -> None:
    gallery, _ = filled
    queries = np.ones((2, DIM), np.float32)
    assert search(gallery, queries, 5, EntryFilter(cameras=("nowhere",))) == [[], []]
    late = EntryFilter(after=T0 + timedelta(days=30))
    assert search(gallery, queries, 5, late, "min") == [[]]


def test_deleted_entries_leave_the_filters(filled) -> None:
    gallery, truth = filled
    c1 = [i for i, (_, camera, _) in truth.items() if camera == "c1"]
    gallery.delete(c1[:-1])
    [matches] = search(gallery, np.zeros((1, DIM), np.float32), 50, EntryFilter(cameras=("c1",)))
    assert [m.id for m in matches] == [c1[-1]]


def test_gpu_index_is_never_asked_for_more_than_its_k_limit() -> None:
    """A GPU copy that refuses k over GPU_MAX_K, as GPU FAISS does: a large top_k goes to the CPU master copy
    instead of a 500, and a small one is served by the copy."""
    index = VectorIndex(4)
    rng = np.random.default_rng(0)
    index.add(np.arange(3000), rng.normal(size=(3000, 4)).astype(np.float32))
    asked: list[int] = []

    class GpuLike:
        ntotal = 3000

        def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            asked.append(k)
            if k > GPU_MAX_K:
                raise RuntimeError("GPU index only supports k <= 2048")
            return index.index.search(queries, k)

    index.use_gpu = True
    index._gpu = GpuLike()
    queries = rng.normal(size=(2, 4)).astype(np.float32)
    _, ids = index.search(queries, 2500)
    assert asked == [] and ids.shape == (2, 2500) and (ids >= 0).all()
    _, ids = index.search(queries, 100)
    assert asked == [100] and ids.shape == (2, 100) and (ids >= 0).all()


def test_default_threshold_from_the_weights_provenance() -> None:
    provenance = {
        "thresholds": [{"fmr": 0.01, "distance": 7.5, "tmr": 0.9}, {"fmr": 0.001, "distance": 6.25, "tmr": 0.8}],
        "threshold_split": "val",
    }
    assert weights_threshold(provenance, 0.01) == (7.5, "weights (FMR 0.01, val)")
    assert weights_threshold(provenance, 0.001) == (6.25, "weights (FMR 0.001, val)")
    assert weights_threshold(provenance, 0.05) is None
    assert weights_threshold({}, 0.01) is None
    assert weights_threshold({"thresholds": "nonsense"}, 0.01) is None
    assert weights_threshold({"thresholds": [{"fmr": 0.01, "distance": "x"}, {"fmr": 0.01}]}, 0.01) is None


def test_the_score_is_one_minus_the_false_match_rate_of_the_weights_curve() -> None:
    """Impostor distances spread 25..35 (the strong weights' range): 1/(1+d) would give 0.03 to all of them; the
    calibrated score separates a close pair from a stranger's typical distance."""
    impostor = np.random.default_rng(0).uniform(25.0, 35.0, 100_000)
    curve = ScoreCurve.from_provenance({"fmr_curve": fmr_curve(impostor), "threshold_split": "val"})
    assert curve is not None
    for distance in (25.5, 27.0, 30.0, 34.0):
        assert curve.false_match_rate(distance) == pytest.approx(np.mean(impostor <= distance), rel=0.1)
    assert curve.false_match_rate(40.0) == 1.0 and similarity(40.0, curve) == 0.0
    assert curve.false_match_rate(10.0) == pytest.approx(1e-4, rel=0.01)  # the curve's floor: an upper bound
    assert similarity(26.0, curve) > 0.85 > 0.15 > similarity(34.0, curve)
    assert similarity(3.0) == 0.25  # without a curve: 1 / (1 + d)
    for broken in ({}, {"fmr_curve": [[1.0, 0.5]]}, {"fmr_curve": [[2.0, 0.1], [1.0, 0.5]]}, {"fmr_curve": "x"}):
        assert ScoreCurve.from_provenance(broken) is None


def test_a_rate_without_a_calibrated_threshold_takes_its_distance_from_the_curve() -> None:
    # REID_PROVISIONAL_JOIN_FMR=1e-4 for a gallery of thousands: training calibrates thresholds at 1e-2 and 1e-3
    # only, but its false-match curve resolves 1e-4 to 1.
    impostor = np.random.default_rng(0).uniform(25.0, 35.0, 100_000)
    provenance = {
        "thresholds": [{"fmr": 0.01, "distance": 7.5}],
        "fmr_curve": fmr_curve(impostor),
        "threshold_split": "val",
    }
    assert weights_threshold(provenance, 0.01) == (7.5, "weights (FMR 0.01, val)")  # the calibrated one first
    distance, source = weights_threshold(provenance, 1e-4)
    assert distance == pytest.approx(np.quantile(impostor, 1e-4), abs=0.01)
    assert source == "weights (FMR 0.0001, val, from its false-match curve)"
    assert np.mean(impostor <= weights_threshold(provenance, 0.005)[0]) == pytest.approx(0.005, rel=0.05)
    curve = ScoreCurve.from_provenance(provenance)
    assert curve.false_match_rate(curve.distance_at(0.003)) == pytest.approx(0.003)  # the inverse of the score
    assert weights_threshold(provenance, 1e-5) is None  # under what its pairs resolve
