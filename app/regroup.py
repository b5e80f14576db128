"""Re-grouping: the batch step that repairs what online joining got wrong (``POST /sightings`` decides each
tracklet once, in arrival order, from its nearest neighbours then).

The units it groups are the ones nothing may cut: a track (the crops of one track on one camera are one person), a
crop sent without a track, and as fixed units every named person, every identity enrolled by name, every ignored
person and every provisional person an operator's decision made (a merge's target, a split's halves). Each unit is
one template, the mean of its crops'. ``link`` joins units along their k-nearest-neighbour graph (FAISS) where
they share most of their neighbours (k-reciprocal Jaccard distance under REID_REGROUP_EPS, or
REID_REGROUP_TRACK_EPS where a unit holds several crops, each camera's mean taken out first) and lie under the
join threshold; ``models.clustering.constrained_groups`` never links two tracks seen at once on one camera, nor two
people an operator split apart.

A group then becomes:
- with one fixed unit: that unit's identity and person (a named person only gains sightings, never loses any);
- with several fixed units (two names chained through strangers): each fixed unit keeps its own, and each other
  unit joins the one whose template is nearest;
- with none: a provisional person, keeping the id that most of its crops had (ties: the smaller id), so that ids
  stay stable across re-groupings; a person whose crops all went elsewhere is recorded as merged into where most
  of them went.

Everything is read in one pass and written in one transaction under the writers' lock; a review decision made
in between (seen by the people's ``updated_at``) makes this run give up and leave the next one to do it."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import faiss
import numpy as np
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import PERSON_MERGED, PERSON_PROVISIONAL, REGROUP_LOCK, Entry, PeopleApart, Person
from app.gallery import Gallery
from app.sightings import unnamed_label
from app.transit import Span, TransitTable
from models.clustering import camera_centred, constrained_groups, jaccard_pairs, knn_pairs, pair_distances

logger = logging.getLogger(__name__)

NEIGHBOURS = 10  # k1 of the k-reciprocal Jaccard distance: a person seen in about this many units or fewer
# The Jaccard distance's local query expansion (REID_REGROUP_QUERY_EXPANSION): each unit's neighbourhood is
# averaged with its nearest unit's. Zhong et al.'s 6 averages in strangers when a person is seen in fewer units than
# that (two tracks, a few crops); with 2, two units that are each other's nearest share one neighbourhood (distance
# 0, FINCH's first-neighbour link, still under the join threshold). It gave more precision at every recall than 6,
# 3 and 1, on CUHK03 val and on cuhk01-site, crops and tracklets (docs/RESULTS.md, bench.linkage).
JACCARD_K2 = 2
# Jaccard distances under which two units link, chosen on CUHK03 val with k2 2 (docs/RESULTS.md): two lone crops
# within 0.5 (REID_REGROUP_EPS; pair precision 0.915 at recall 0.626, crops one by one, the strong weights), a pair
# with a unit of several crops (a track, a person) within 0.3 (REID_REGROUP_TRACK_EPS; BCubed F 0.856 against 0.803
# at 0.5). A person seen in crops is many units, and the crops that are not each other's nearest still share part
# of their neighbourhoods; a person seen in tracks is a few, linked mostly as first neighbours (distance 0 with k2
# 2), and at 0.5 strangers' tracks join them: on cuhk01-site and the bench.ingest clip too, 0.3 gave tracks the
# higher BCubed F.
REGROUP_EPS = 0.5
REGROUP_TRACK_EPS = 0.3
CENTRING_MIN_UNITS = 20  # a camera with fewer units is centred on the gallery's mean, not its own
EXACT_KNN_MAX = 20_000
IVF_PROBE = 16  # units looked at per unit: a person seen in more tracks than this chains through its neighbours
READ_BATCH = 5_000
WRITE_BATCH = 5_000


@dataclass(frozen=True)
class Linkage:
    """How re-grouping links two units (``link``): the k-reciprocal Jaccard distance's k1 and query expansion, and
    the eps under which a pair links, by the kind of its units."""

    eps: float = REGROUP_EPS  # two lone crops (units of one crop)
    track_eps: float = REGROUP_TRACK_EPS  # a pair with a unit of several crops
    k2: int = JACCARD_K2
    neighbours: int = NEIGHBOURS

    @classmethod
    def from_settings(cls, settings: Settings) -> Linkage:
        return cls(settings.regroup_eps, settings.regroup_track_eps, settings.regroup_query_expansion)

    @classmethod
    def one_eps(cls, eps: float, **kwargs: int) -> Linkage:
        """The same eps for every pair (bench sweeps)."""
        return cls(eps, eps, **kwargs)


@dataclass
class Unit:
    entries: list[int] = field(default_factory=list)
    persons: Counter[int | None] = field(default_factory=Counter)  # crops per current person
    identity: str | None = None  # a fixed unit's identity; None: free to move
    person: int | None = None  # a fixed unit's person (None: an identity enrolled by name)
    camera: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    track: bool = False  # a track (overlap constraints apply)
    total: np.ndarray | None = None  # sum of its crops' templates
    squares: float = 0.0  # sum of its crops' squared norms: with the total, their scatter about the mean

    def averaged_out(self) -> float:
        """The squared distance its mean template lost to averaging (``app.sightings.averaged_out`` for a mean):
        the crops' unbiased scatter about their mean x (1 - 1/k)."""
        k = len(self.entries)
        if k < 2 or self.total is None:
            return 0.0
        scatter = (self.squares - float(self.total @ self.total) / k) / (k - 1)
        return max(scatter, 0.0) * (1.0 - 1.0 / k)


@dataclass
class Regrouped:
    units: int
    groups: int
    moved: int  # entries whose person or identity changed
    new_people: int
    retired_people: int
    seconds: float
    skipped: str | None = None  # why nothing was written


def _people(session: Session) -> dict[int, Person]:
    return {p.id: p for p in session.scalars(select(Person))}


def _resolve(people: dict[int, Person], person_id: int) -> int:
    for _ in range(64):
        p = people.get(person_id)
        if p is None or p.status != PERSON_MERGED or p.merged_into is None:
            return person_id
        person_id = p.merged_into
    return person_id


def _fixed(person: Person | None) -> bool:
    return person is not None and (person.status != PERSON_PROVISIONAL or person.reviewed)


def read_units(session: Session, people: dict[int, Person]) -> list[Unit]:
    """The units, in order of their first entry; every entry of the gallery takes part."""
    units: dict[tuple, Unit] = {}
    order: list[Unit] = []
    last = 0
    while True:
        rows = session.execute(
            select(
                Entry.id, Entry.identity, Entry.person_id, Entry.camera, Entry.track, Entry.captured_at, Entry.embedding
            )
            .where(Entry.id > last)
            .order_by(Entry.id)
            .limit(READ_BATCH)
        ).all()
        if not rows:
            break
        for entry_id, identity, person_id, camera, track, at, blob in rows:
            person = people.get(person_id) if person_id is not None else None
            if person_id is None:
                key: tuple = ("identity", identity)
            elif _fixed(person):
                key = ("person", person_id)
            elif track is not None:
                key = ("track", camera, track, person_id)
            else:
                key = ("crop", entry_id)
            unit = units.get(key)
            if unit is None:
                unit = units[key] = Unit(camera=camera, track=key[0] == "track")
                if key[0] in ("identity", "person"):
                    unit.identity, unit.person = identity, person_id
                order.append(unit)
            vector = np.frombuffer(blob, dtype="<f4")
            unit.total = vector.astype(np.float64) if unit.total is None else unit.total + vector
            unit.squares += float(np.dot(vector, vector.astype(np.float64)))
            unit.entries.append(entry_id)
            unit.persons[person_id] += 1
            at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
            unit.start = at if unit.start is None else min(unit.start, at)
            unit.end = at if unit.end is None else max(unit.end, at)
        last = rows[-1][0]
    return order


def knn_graph(templates: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of each template's nearest, by FAISS: exact up to EXACT_KNN_MAX units (the same neighbours
    as ``models.clustering.knn``, which is pure numpy), an IVF index beyond (the exact graph of 1e5 units took
    740 s on this project's 2-core machine; IVF with ``IVF_PROBE`` of its lists visits a few percent)."""
    n, dim = templates.shape
    k = min(k, n)
    if n <= EXACT_KNN_MAX:
        index = faiss.IndexFlatL2(dim)
    else:
        lists = int(4 * np.sqrt(n))  # FAISS's guideline: 4..16 sqrt(N) lists
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, lists)
        index.train(templates)
        index.nprobe = IVF_PROBE
    index.add(templates)
    _, indices = index.search(templates, k)
    return np.where(indices < 0, np.arange(n)[:, None], indices)  # -1 (too few found): the row itself, no edge


def _overlapping_tracks(units: list[Unit]) -> list[tuple[int, int]]:
    """Pairs of track units seen at once on one camera: a sweep per camera over their time spans."""
    by_camera: dict[str | None, list[int]] = defaultdict(list)
    for i, u in enumerate(units):
        if u.track:
            by_camera[u.camera].append(i)
    pairs = []
    for members in by_camera.values():
        members.sort(key=lambda i: (units[i].start, i))
        active: list[int] = []
        for i in members:
            active = [j for j in active if units[j].end >= units[i].start]
            pairs.extend((j, i) for j in active)
            active.append(i)
    return pairs


def _too_soon(units: list[Unit], transit: TransitTable | None) -> list[tuple[int, int]]:
    """Pairs of free units (tracks, lone crops) seen at two cameras closer in time than the transit table allows.
    A fixed unit's span runs from its person's first sighting to the last: not a time it was anywhere."""
    if transit is None or not transit.least:
        return []
    free = [i for i, u in enumerate(units) if u.identity is None and u.start is not None and u.end is not None]
    spans = [Span(units[i].camera, units[i].start, units[i].end) for i in free]  # type: ignore[arg-type]
    return [(free[a], free[b]) for a, b in transit.conflicts(spans)]


def _apart(session: Session, people: dict[int, Person], units: list[Unit]) -> list[tuple[int, int]]:
    """Unit pairs an operator split apart (each person resolved through its merges)."""
    unit_of_person = {u.person: i for i, u in enumerate(units) if u.person is not None}
    pairs = []
    for a, b in session.execute(select(PeopleApart.person_a, PeopleApart.person_b)):
        ua, ub = unit_of_person.get(_resolve(people, a)), unit_of_person.get(_resolve(people, b))
        if ua is not None and ub is not None and ua != ub:
            pairs.append((ua, ub))
    return pairs


def link(
    templates: np.ndarray,
    cameras: list[str | None],
    threshold: float,
    linkage: Linkage = Linkage(),
    cannot: list[tuple[int, int]] | None = None,
    averaged_out: np.ndarray | None = None,
    several: np.ndarray | None = None,
) -> np.ndarray:
    """Group labels of unit templates: linked along their kNN graph where the two are both closer than the join
    ``threshold`` (L2, the service's distance) and within ``linkage``'s eps in k-reciprocal Jaccard distance,
    computed after each camera's mean template is taken out (``models.clustering``, as adaptation's pseudo-labels).
    ``several``: per unit, whether it holds several crops; a pair with one such unit links within
    ``linkage.track_eps`` (None: every pair within ``linkage.eps``).

    Why both: a threshold alone chains strangers through their near look-alikes once a gallery holds many people
    (on CUHK03 val, 938 crops at the FMR 1e-2 threshold became one group: pair precision 0.01); sharing most of
    their nearest neighbours is what two crops of one person do and two look-alikes do not. In a gallery no larger
    than a neighbourhood every unit is in every other's, sharing them tells nothing, and the threshold decides.

    ``averaged_out``: per unit, the squared distance its mean template lost to averaging its crops
    (``app.sightings.averaged_out``), added back before the threshold as ``POST /sightings`` does online."""
    n, neighbours = len(templates), linkage.neighbours
    x = camera_centred(templates, np.array([c or "" for c in cameras]), min_rows=CENTRING_MIN_UNITS)
    graph = knn_graph(x, neighbours + 1)

    def l2_of(pairs: np.ndarray) -> np.ndarray:
        l2 = pair_distances(templates, pairs)
        if averaged_out is None:
            return l2
        return np.sqrt(l2**2 + averaged_out[pairs[:, 0]] + averaged_out[pairs[:, 1]])

    if n <= neighbours + 1:  # every pair, nearest first
        pairs = knn_pairs(graph)
        l2 = l2_of(pairs)
        keep = l2 <= threshold
        return constrained_groups(n, pairs[keep], l2[keep] / threshold, 1.0, (), cannot or [])
    pairs, jaccard = jaccard_pairs(x, graph, neighbours, linkage.k2)
    eps = np.full(len(pairs), linkage.eps)
    if several is not None:
        eps[several[pairs[:, 0]] | several[pairs[:, 1]]] = linkage.track_eps
    keep = (jaccard <= eps) & (l2_of(pairs) <= threshold)
    return constrained_groups(n, pairs[keep], jaccard[keep].astype(np.float64), 1.0, (), cannot or [])


def regroup(
    gallery: Gallery,
    threshold: float,
    linkage: Linkage = Linkage(),
    correct_averaging: bool = True,
    transit: TransitTable | None = None,
) -> Regrouped:
    """Re-group every sighting (see the module's docstring); what it did. With replicas on PostgreSQL one runs at
    a time (an advisory lock; the others skip); on SQLite the service is the only writer. ``correct_averaging``
    (REID_TRACKLET_SPREAD_CORRECTION): each unit's mean gets back what averaging its crops took out before the
    threshold, as online (on CUHK03 val tracklets, pair precision 0.42 -> 0.57 at recall 0.64 -> 0.61;
    docs/RESULTS.md). ``transit``: tracks and lone crops seen at two cameras closer in time than anyone walks
    between them are never one group (a named or reviewed person's sightings are the operator's)."""
    with contextlib.ExitStack() as stack:
        if gallery.postgres:
            connection = stack.enter_context(gallery.engine.connect())
            if not connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": REGROUP_LOCK}).scalar():
                return Regrouped(0, 0, 0, 0, 0, 0.0, "another replica is re-grouping")
            stack.callback(connection.execute, text("SELECT pg_advisory_unlock(:key)"), {"key": REGROUP_LOCK})
        return _regroup(gallery, threshold, linkage, correct_averaging, transit)


def _regroup(
    gallery: Gallery,
    threshold: float,
    linkage: Linkage,
    correct_averaging: bool,
    transit: TransitTable | None,
) -> Regrouped:
    began = time.monotonic()
    with gallery.sessions() as session:
        people = _people(session)
        stamp = session.scalar(select(func.max(Person.updated_at)))
        units = read_units(session, people)
        cannot = _overlapping_tracks(units) + _apart(session, people, units) + _too_soon(units, transit)
    if not units:
        return Regrouped(0, 0, 0, 0, 0, time.monotonic() - began)
    templates = np.stack([u.total / len(u.entries) for u in units]).astype(np.float32)
    lost = np.array([u.averaged_out() for u in units]) if correct_averaging else None
    several = np.array([len(u.entries) > 1 for u in units])
    labels = link(templates, [u.camera for u in units], threshold, linkage, cannot, lost, several)
    assignment = _assign(units, labels, templates)
    return _write(gallery, units, assignment, stamp, began, int(labels.max()) + 1)


def _assign(units: list[Unit], labels: np.ndarray, templates: np.ndarray) -> list[tuple[str | None, int | None]]:
    """Per unit: (identity, person) for fixed targets, or (None, group number) for a provisional group."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels.tolist()):
        groups[label].append(i)
    out: list[tuple[str | None, int | None]] = [(None, None)] * len(units)
    for label, members in groups.items():
        fixed = [i for i in members if units[i].identity is not None]
        if not fixed:
            out_label: tuple[str | None, int | None] = (None, -1 - label)  # a provisional group, named later
            for i in members:
                out[i] = out_label
            continue
        for i in fixed:
            out[i] = (units[i].identity, units[i].person)
        free = [i for i in members if units[i].identity is None]
        if free:
            anchors = templates[fixed]
            nearest = ((templates[free][:, None, :] - anchors[None, :, :]) ** 2).sum(-1).argmin(axis=1)
            for i, j in zip(free, nearest.tolist(), strict=True):
                out[i] = out[fixed[j]]
    return out


def _write(
    gallery: Gallery,
    units: list[Unit],
    assignment: list[tuple[str | None, int | None]],
    stamp: datetime | None,
    began: float,
    group_count: int,
) -> Regrouped:
    moved = new_people = retired = 0
    with gallery.relabelling() as session:
        if session.scalar(select(func.max(Person.updated_at))) != stamp:
            return Regrouped(len(units), group_count, 0, 0, 0, time.monotonic() - began, "a review decision came in")
        people = _people(session)
        # Provisional groups keep the id most of their crops had, when no larger group claims it first.
        provisional: dict[int, list[int]] = defaultdict(list)
        for i, (identity, target) in enumerate(assignment):
            if identity is None and target is not None:
                provisional[target].append(i)
        claimed: set[int] = {person for identity, person in assignment if identity is not None and person}
        chosen: dict[int, int] = {}
        by_size = sorted(provisional.items(), key=lambda item: (-sum(len(units[i].entries) for i in item[1]), item[0]))
        for group, members in by_size:
            votes: Counter[int] = Counter()
            for i in members:
                for person, n in units[i].persons.items():
                    if person is not None and people.get(person) is not None and not _fixed(people[person]):
                        votes[person] += n
            keep = next((p for p, _ in sorted(votes.items(), key=lambda v: (-v[1], v[0])) if p not in claimed), None)
            if keep is None:
                person = Person()
                session.add(person)
                session.flush()
                keep, new_people = person.id, new_people + 1
            claimed.add(keep)
            chosen[group] = keep
        # Relabel, unit by unit, only what changes.
        changes: dict[tuple[str, int | None], list[int]] = defaultdict(list)
        moved_from: dict[int, Counter[int]] = defaultdict(Counter)
        for i, (identity, target) in enumerate(assignment):
            unit = units[i]
            if unit.identity is not None:
                continue  # a fixed unit stays itself
            if identity is None:  # a provisional group
                assert target is not None
                person: int | None = chosen[target]
                label = unnamed_label(chosen[target])
            else:  # joins a fixed unit
                person, label = target, identity
            changes[(label, person)].extend(unit.entries)
            for old, n in unit.persons.items():
                if old is not None and old != person:
                    moved_from[old][person] += n  # type: ignore[index]
        for (label, person), entry_ids in changes.items():
            for start in range(0, len(entry_ids), WRITE_BATCH):
                chunk = entry_ids[start : start + WRITE_BATCH]
                result = session.execute(
                    update(Entry)
                    .where(
                        Entry.id.in_(chunk),
                        (Entry.person_id != person) | Entry.person_id.is_(None) | (Entry.identity != label),
                    )
                    .values(identity=label, person_id=person)
                    # No Entry is loaded in this session; the default would look through every Person it holds for
                    # each statement: 1e5 sightings took minutes.
                    .execution_options(synchronize_session=False)
                )
                moved += result.rowcount or 0
        # A provisional person left without crops: merged into where most of them went.
        remaining = {
            p for (p,) in session.execute(select(Entry.person_id).where(Entry.person_id.is_not(None)).distinct())
        }
        now = datetime.now(UTC)
        for old, targets in moved_from.items():
            person = people.get(old)
            if person is not None and not _fixed(person) and old not in remaining and targets:
                target = sorted(targets.items(), key=lambda t: (-t[1], t[0]))[0][0]
                person.status, person.merged_into, person.updated_at = PERSON_MERGED, target, now
                retired += 1
    result = Regrouped(len(units), group_count, moved, new_people, retired, time.monotonic() - began)
    logger.info(
        "re-grouped %d units into %d groups in %.1f s: %d entries moved, %d new people, %d retired",
        result.units,
        result.groups,
        result.seconds,
        result.moved,
        result.new_people,
        result.retired_people,
    )
    return result
