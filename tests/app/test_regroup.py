"""Re-grouping sightings (app.regroup) on a gallery of chosen templates: it repairs what online joining got
wrong, and keeps every constraint: tracks whole, tracks seen at once on one camera apart, people an operator split
apart apart, named people as they are, provisional ids stable."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import people, sightings
from app.config import Settings
from app.db import make_engine
from app.gallery import Gallery
from app.reembed import one_run
from app.regroup import CENTRING_MIN_UNITS, JACCARD_K2, NEIGHBOURS, Linkage, knn_graph, link, regroup
from app.sightings import Sighting
from app.transit import TransitTable
from models.clustering import camera_centred, jaccard_pairs

DIM = 4
THRESHOLD = 1.0
T0 = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


@pytest.fixture
def gallery(tmp_path: Path, database_url: str | None) -> Iterator[Gallery]:
    engine = make_engine(database_url or f"sqlite:///{tmp_path / 'reid.db'}")
    gallery = Gallery(engine, tmp_path / "data", DIM, "Flat", fingerprint="f" * 64)
    gallery.open()
    yield gallery
    gallery.close()
    engine.dispose()


def crop(seed: int) -> tuple[bytes, Image.Image]:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 4, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), image


def at(x: float) -> np.ndarray:
    return np.array([x, 0.0, 0.0, 0.0], np.float32)


def send(gallery: Gallery, tracks: list[tuple[str, str | None, float, list]]) -> list[int]:
    """One request: per tracklet (camera, track, minutes after T0, crops' positions on a line or templates); their
    people."""
    items, vectors = [], []
    for camera, track, minutes, xs in tracks:
        for x in xs:
            items.append(Sighting(camera, T0 + timedelta(minutes=minutes), track))
            vectors.append(at(x) if np.isscalar(x) else np.asarray(x, np.float32))
    uploads = [crop(i + len(gallery) * 7) for i in range(len(items))]
    crops = gallery.hold_crops(uploads)
    _, decisions, _ = sightings.enroll(
        gallery, items, crops, np.stack(vectors), THRESHOLD, "mean", timedelta(seconds=1)
    )
    return [d.person_id for d in decisions]


def person_of(gallery: Gallery, person_id: int) -> people.PersonOut:
    return people.get_person(gallery, person_id)


def test_a_bridge_seen_later_merges_two_people_into_the_older_id(gallery: Gallery) -> None:
    [a] = send(gallery, [("c1", "1", 0, [0.0])])
    [b] = send(gallery, [("c2", "2", 1, [1.8])])  # 1.8 from a: someone else, as far as anyone knows yet
    [bridge] = send(gallery, [("c3", "3", 2, [0.85])])  # near both: joins the nearer online
    assert a != b and bridge == a
    done = regroup(gallery, THRESHOLD)
    assert done.skipped is None and done.moved == 1 and done.retired_people == 1
    assert person_of(gallery, a).sightings == 3  # the older id stays
    assert person_of(gallery, b).status == "merged" and person_of(gallery, b).merged_into == a
    assert regroup(gallery, THRESHOLD).moved == 0  # a second run has nothing to repair


def test_a_person_seen_in_two_tracks_among_strangers_is_regrouped_whole(gallery: Gallery) -> None:
    # Eight people (each at +-10 along an axis of their own), each seen once on c1 and once on c2: two units a
    # person. Online each c2 track joins its c1 track; re-grouping keeps the eight. With the default query
    # expansion (2) a person's two tracks share one neighbourhood and every stranger is farther; Zhong et al.'s 6
    # averages each neighbourhood with strangers' until some strangers lie nearer than a person's own two tracks.
    rng = np.random.default_rng(0)
    centres = 10.0 * np.concatenate([np.eye(DIM), -np.eye(DIM)]).astype(np.float32)
    found: dict[int, set[int]] = {}
    templates, cameras = [], []
    for n, (who, camera) in enumerate([(who, camera) for camera in ("c1", "c2") for who in range(len(centres))]):
        track = centres[who] + rng.uniform(-0.3, 0.3, (2, DIM)).astype(np.float32)
        found.setdefault(who, set()).update(send(gallery, [(camera, f"{camera}-{who}", n, list(track))]))
        templates.append(track.mean(axis=0))
        cameras.append(camera)
    assert all(len(people) == 1 for people in found.values())
    assert regroup(gallery, THRESHOLD).moved == 0
    x = camera_centred(np.stack(templates), np.array(cameras), min_rows=CENTRING_MIN_UNITS)
    for k2, separated in ((JACCARD_K2, True), (6, False)):
        pairs, jaccard = jaccard_pairs(x, knn_graph(x, NEIGHBOURS + 1), NEIGHBOURS, k2)
        same = pairs[:, 0] % len(centres) == pairs[:, 1] % len(centres)
        assert (jaccard[same].max() < jaccard[~same].min()) == separated, (k2, jaccard[same], jaccard[~same].min())


def test_a_reembed_run_does_not_hold_up_regrouping(gallery: Gallery) -> None:
    # On PostgreSQL each job takes its own advisory lock: the two once shared a key, so a re-grouping skipped
    # itself ("another replica is re-grouping") while a re-embed ran, and a re-embed refused while one re-grouped.
    send(gallery, [("c1", "1", 0, [0.0])])
    send(gallery, [("c2", "2", 1, [1.8])])
    send(gallery, [("c3", "3", 2, [0.85])])
    with one_run(gallery.engine):
        done = regroup(gallery, THRESHOLD)
    assert done.skipped is None and done.moved == 1


@pytest.mark.parametrize("order", [0, 1, 2])
def test_online_joining_agrees_with_batch_grouping_on_separated_people(gallery: Gallery, order: int) -> None:
    # Four people (each along an axis of their own), each a two-crop track on c1, another on c2 and three crops
    # without a track on c3, sent in a random order: online and batch find the same four people.
    rng = np.random.default_rng(order)
    centres = 10.0 * np.eye(DIM, dtype=np.float32)
    units = [(who, cam) for who in range(4) for cam in ("c1", "c2", "c3", "c3", "c3")]
    truth: dict[int, set[int]] = {}
    for n, k in enumerate(rng.permutation(len(units)).tolist()):
        who, camera = units[k]
        crops = centres[who] + rng.uniform(-0.15, 0.15, (1 if camera == "c3" else 2, DIM)).astype(np.float32)
        people = send(gallery, [(camera, None if camera == "c3" else f"{who}", n, list(crops))])
        truth.setdefault(who, set()).update(people)
    assert all(len(found) == 1 for found in truth.values())  # online: one person each
    assert regroup(gallery, THRESHOLD).moved == 0  # batch: the same partition


def test_a_tracks_mean_gets_back_its_spread_before_the_threshold(gallery: Gallery) -> None:
    # Two tracks whose means lie 0.8 apart, under the threshold of 1, while their crops lie 1.07 apart on average
    # (root mean square over the four pairs): the threshold is calibrated on pairs of crops, and a mean lies
    # nearer to everyone than its crops do. Online the second joined the first (its mean 0.3 from a crop).
    first, second = send(gallery, [("c1", "1", 0, [-0.5, 0.5])]), send(gallery, [("c2", "2", 1, [0.3, 1.3])])
    assert first == second
    assert regroup(gallery, THRESHOLD, correct_averaging=False).moved == 0  # the means' own distance: one person
    done = regroup(gallery, THRESHOLD)
    assert done.moved == 2 and done.new_people == 1  # each track's scatter x (1 - 1/2) added back: two people
    assert person_of(gallery, first[0]).sightings == 2


def test_tracks_seen_at_once_on_one_camera_stay_apart(gallery: Gallery) -> None:
    twins = send(gallery, [("c1", "1", 0, [0.0, 0.0]), ("c1", "2", 0, [0.0])])
    assert twins[0] != twins[1]  # online: the overlap forbids the join
    regroup(gallery, THRESHOLD)
    assert person_of(gallery, twins[0]).sightings == 2 and person_of(gallery, twins[1]).sightings == 1


def test_a_split_is_kept_and_a_named_person_is_not_moved(gallery: Gallery) -> None:
    [p] = send(gallery, [("c1", "1", 0, [0.0])])
    assert send(gallery, [("c2", "7", 5, [0.1])]) == [p]
    entry = people.timeline(gallery, p, timedelta(minutes=1)).visits[-1].entries[0]
    other = people.split_person(gallery, p, [entry]).id
    regroup(gallery, THRESHOLD)
    assert person_of(gallery, p).sightings == 1 and person_of(gallery, other).sightings == 1

    # A named person with crops far apart (a merge the operator made) stays whole; a stranger stays out.
    [far] = send(gallery, [("c3", "9", 9, [5.0])])
    people.merge_people(gallery, far, p)
    people.name_person(gallery, p, "Ann")
    [near_far] = send(gallery, [("c4", "3", 20, [5.3])])
    assert person_of(gallery, near_far).identity == "Ann"  # online: its nearest crop is Ann's
    regroup(gallery, THRESHOLD)
    named = person_of(gallery, p)
    assert (named.identity, named.status, named.sightings) == ("Ann", "named", 3)
    assert person_of(gallery, other).identity == f"unknown-{other}"


def test_a_review_between_read_and_write_makes_the_run_give_up(gallery: Gallery, monkeypatch) -> None:
    [a] = send(gallery, [("c1", "1", 0, [0.0])])
    send(gallery, [("c2", "2", 1, [1.8])])
    send(gallery, [("c3", "3", 2, [0.9])])
    import app.regroup as module

    real = module._assign

    def review_meanwhile(*args):
        people.name_person(gallery, a, "Bo")
        return real(*args)

    monkeypatch.setattr(module, "_assign", review_meanwhile)
    done = regroup(gallery, THRESHOLD)
    assert done.skipped == "a review decision came in" and done.moved == 0


def test_look_alikes_under_the_threshold_do_not_chain_strangers_into_one_person() -> None:
    # 60 people, 4 crops each, two cameras: at a threshold that about 0.5% of stranger pairs pass (each person has
    # a look-alike or two under it), linking by the threshold alone chains most people together; sharing nearest
    # neighbours (the Jaccard distance) is what keeps them apart.
    rng = np.random.default_rng(0)
    people, per = 60, 4
    x = np.repeat(rng.normal(size=(people, 64)), per, axis=0) + 0.6 * rng.normal(size=(people * per, 64))
    x = x.astype(np.float32)
    truth = np.repeat(np.arange(people), per)
    cameras = [f"c{i % 2}" for i in range(people * per)]

    def pair_precision_recall(labels: np.ndarray) -> tuple[float, float]:
        together = labels[:, None] == labels[None, :]
        same = truth[:, None] == truth[None, :]
        off = ~np.eye(len(truth), dtype=bool)
        right = (together & same & off).sum()
        return right / (together & off).sum(), right / (same & off).sum()

    precision, recall = pair_precision_recall(link(x, cameras, 10.0, Linkage.one_eps(1.0)))  # the threshold alone
    assert precision < 0.2 and recall == 1.0
    precision, recall = pair_precision_recall(link(x, cameras, 10.0))  # lone crops: within REGROUP_EPS
    assert precision > 0.95 and recall > 0.5, (precision, recall)

    # A pair with a unit of several crops links within the track eps, two lone crops within the other.
    by_kind = Linkage(eps=1.0, track_eps=0.3)
    alone, several = np.zeros(len(x), bool), np.ones(len(x), bool)
    np.testing.assert_array_equal(
        link(x, cameras, 10.0, by_kind, several=alone), link(x, cameras, 10.0, Linkage.one_eps(1.0))
    )
    np.testing.assert_array_equal(
        link(x, cameras, 10.0, by_kind, several=several), link(x, cameras, 10.0, Linkage.one_eps(0.3))
    )
    mixed = link(x, cameras, 10.0, by_kind, several=np.arange(len(x)) < len(x) // 2)
    groups = [len(np.unique(link(x, cameras, 10.0, Linkage.one_eps(eps)))) for eps in (1.0, 0.3)]
    assert groups[0] < len(np.unique(mixed)) < groups[1]  # the second half's lone crops link more freely


def test_the_services_settings_default_to_the_measured_linkage() -> None:
    # Settings keeps the REID_REGROUP_* knobs, app.regroup the values measured for them: they must not drift apart.
    assert Linkage.from_settings(Settings.model_construct()) == Linkage()  # the fields' defaults, no environment
    bounds = [m.le for m in Settings.model_fields["regroup_query_expansion"].metadata if hasattr(m, "le")]
    assert bounds == [NEIGHBOURS + 1]  # the expansion draws on a unit's own neighbours only


def transit_table(tmp_path: Path, text: str) -> TransitTable:
    path = tmp_path / "transit.csv"
    path.write_text(text)
    return TransitTable.load(path)


def test_a_sighting_does_not_join_someone_seen_too_recently_at_another_camera(gallery: Gallery, tmp_path: Path) -> None:
    transit = transit_table(tmp_path, "camera_a,camera_b,min_seconds\nc1,c2,300\n")

    def sighted(camera: str, minutes: float, x: float) -> int | None:
        crops = gallery.hold_crops([crop(int(minutes * 10))])
        _, [decision], _ = sightings.enroll(
            gallery,
            [sightings.Sighting(camera, T0 + timedelta(minutes=minutes))],
            crops,
            np.array([[x, 0, 0, 0]], np.float32),
            THRESHOLD,
            "mean",
            timedelta(seconds=1),
            transit=transit,
        )
        return decision.person_id

    first = sighted("c1", 0, 0.0)
    assert sighted("c2", 2, 0.1) != first  # two minutes later, five minutes' walk away: someone else, however alike
    assert sighted("c2", 6, -0.1) == first  # six minutes later: time enough to walk there
    assert sighted("c3", 0.5, -0.05) == first  # c3 is in no row: not constrained


def test_regrouping_keeps_apart_what_the_table_forbids(gallery: Gallery, tmp_path: Path) -> None:
    [a] = send(gallery, [("c1", "1", 0, [0.0])])
    [b] = send(gallery, [("c2", "2", 1, [0.1])])  # one minute later, online without a table: joined
    assert a == b
    assert regroup(gallery, THRESHOLD).moved == 0
    transit = transit_table(tmp_path, "camera_a,camera_b,min_seconds\nc1,c2,300\n")
    done = regroup(gallery, THRESHOLD, transit=transit)
    assert done.moved == 1 and done.new_people == 1
    assert person_of(gallery, a).sightings == 1
