"""Sightings: crops enrolled without a name, grouped online into people (``POST /sightings``).

A request carries crops of many tracklets (a tracker's output: one camera, one track id). Each tracklet is
matched as one unit, by its template (the mean of its crops' templates, or weighted by box area x confidence),
and joins, in this order:

1. the person or identity its track already belongs to: the same camera and track id seen within
   ``track_gap_s`` (the crops of one track are one person, whichever request brought them);
2. the nearest identity under the join threshold, or provisional person under the stricter provisional one,
   among the gallery's nearest entries and the request's earlier tracklets, unless that person has another track
   on the same camera overlapping this one in time (two tracks at once on one camera are two people) or was
   seen at another camera more recently than the transit table (``app.transit``) allows;
3. else a new provisional person.

The cost of a join is one batched FAISS search and a few indexed SQL reads, never O(gallery). Joins are decided
before the write and re-read inside its transaction (a person named or merged meanwhile is followed), so a
request commits all of its tracklets or none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import PERSON_MERGED, PERSON_NAMED, UNNAMED_PREFIX, Entry, Person
from app.gallery import BeforeInsert, Gallery, NewEntry, StoredCrop
from app.search import calibrated_thresholds, weights_threshold
from app.transit import Span, TransitTable

JOIN_CANDIDATES = 20  # nearest entries looked at per tracklet: the nearest identities, not the nearest crops
Aggregation = Literal["mean", "quality"]
Joined = Literal["track", "match", "new"]


def join_threshold(settings: Settings, provenance: dict[str, Any], trained: bool) -> tuple[float | None, str | None]:
    """(the distance under which a tracklet joins someone, where it comes from): REID_JOIN_THRESHOLD, else the
    weights' calibrated query threshold, else none (nothing is matched by appearance)."""
    if settings.join_threshold is not None:
        return settings.join_threshold, "REID_JOIN_THRESHOLD"
    if trained:
        calibrated = weights_threshold(provenance, settings.threshold_fmr)
        if calibrated is not None:
            return calibrated
    return None, None


def provisional_threshold(
    settings: Settings, provenance: dict[str, Any], trained: bool, threshold: float | None
) -> float | None:
    """The distance under which a tracklet joins a provisional person online: the weights' threshold at
    REID_PROVISIONAL_JOIN_FMR (calibrated, or from their false-match curve), never above ``threshold`` (the join
    threshold). Weights with neither at that rate give their strictest calibrated threshold above it, and weights
    with no calibration the join threshold.

    Why stricter than the join threshold: online, a sighting is compared with every person at once, so the chance
    that some stranger lies under a threshold grows with their number; at the query's FMR 1e-2, CUHK03 val's crops
    sent one by one put strangers together in 4 of 5 online pairs (docs/RESULTS.md). A wrongly joined sighting
    stays wrong until re-grouping; a missed join is two provisional people that re-grouping puts together."""
    if threshold is None:
        return None
    if not trained:
        return threshold
    rate = settings.provisional_join_fmr
    at_rate = weights_threshold(provenance, rate)
    # No curve to read the rate off: the strictest calibrated threshold above it.
    above = [distance for fmr, distance in calibrated_thresholds(provenance) if fmr > rate]
    distance = at_rate[0] if at_rate is not None else (above[0] if above else None)
    return threshold if distance is None else min(threshold, distance)


def is_provisional(identity: str | None) -> bool:
    """Whether a candidate is a provisional person (of the gallery, or started earlier in this request)."""
    return identity is None or identity.startswith(UNNAMED_PREFIX)


def unnamed_label(person_id: int) -> str:
    return f"{UNNAMED_PREFIX}{person_id}"


@dataclass(frozen=True)
class Sighting:
    """One crop's facts from the tracker."""

    camera: str
    captured_at: datetime
    track: str | None = None
    confidence: float | None = None
    box: tuple[float, float, float, float] | None = None  # x, y, w, h in the frame, pixels


@dataclass
class Tracklet:
    """Crops of one track on one camera in one request (a crop without a track is a tracklet alone)."""

    camera: str
    track: str | None
    indices: list[int]  # into the request's files
    start: datetime
    end: datetime


@dataclass
class Decision:
    """Where a tracklet goes: an existing identity (``identity``, with its ``person_id`` when it is a person), or
    a new person (``new_person`` numbers the request's new people; filled with ids inside the transaction)."""

    joined: Joined
    identity: str | None = None
    person_id: int | None = None
    new_person: int | None = None
    distance: float | None = None
    entries: list[int] = field(default_factory=list)


def tracklets_of(sightings: Sequence[Sighting]) -> list[Tracklet]:
    """Group a request's crops into tracklets, in order of each tracklet's first crop."""
    groups: dict[tuple[str, str] | int, Tracklet] = {}
    for i, s in enumerate(sightings):
        key: tuple[str, str] | int = (s.camera, s.track) if s.track is not None else i
        tracklet = groups.get(key)
        if tracklet is None:
            groups[key] = Tracklet(s.camera, s.track, [i], s.captured_at, s.captured_at)
        else:
            tracklet.indices.append(i)
            tracklet.start = min(tracklet.start, s.captured_at)
            tracklet.end = max(tracklet.end, s.captured_at)
    return list(groups.values())


def quality(s: Sighting) -> float:
    """Box area x detector confidence: larger, surer boxes show more of the person (1 when neither is given)."""
    area = s.box[2] * s.box[3] if s.box is not None else 1.0
    return max(area, 1e-6) * (s.confidence if s.confidence is not None else 1.0)


def template(vectors: np.ndarray, sightings: Sequence[Sighting], aggregation: Aggregation) -> np.ndarray:
    """One template for a tracklet's crops: their mean (the field's usual choice, like ``POST /query``'s
    track=mean) or their quality-weighted mean."""
    if aggregation == "mean":
        return vectors.mean(axis=0)
    return (vectors * _quality_weights(sightings)[:, None]).sum(axis=0).astype(np.float32)


def _quality_weights(sightings: Sequence[Sighting]) -> np.ndarray:
    """Each crop's share of a quality-weighted template (summing to 1)."""
    weights = np.array([quality(s) for s in sightings], np.float64)
    return weights / weights.sum()


def averaged_out(vectors: np.ndarray, sightings: Sequence[Sighting], aggregation: Aggregation) -> float:
    """The squared distance a tracklet's template lost to averaging its crops. The thresholds are calibrated on
    pairs of single crops, whose squared distance holds each crop's own scatter about its person; a mean of k
    crops keeps only 1/k of it (a weighted mean, the sum of the squared weights), so it lies nearer to everyone,
    strangers too. This adds the lost part back: the crops' scatter about their mean (unbiased) times 1 - 1/k."""
    k = len(vectors)
    if k < 2:
        return 0.0
    kept = 1.0 / k if aggregation == "mean" else float((_quality_weights(sightings) ** 2).sum())
    scatter = float(((vectors - vectors.mean(axis=0)) ** 2).sum() / (k - 1))
    return scatter * (1.0 - kept)


def _conflicts(session: Session, identity: str, tracklet: Tracklet) -> bool:
    """``identity`` has another track on this camera whose span overlaps the tracklet's: another person."""
    if tracklet.track is None:
        return False
    spans = (
        select(Entry.track)
        .where(
            Entry.identity == identity,
            Entry.camera == tracklet.camera,
            Entry.track.is_not(None),
            Entry.track != tracklet.track,
        )
        .group_by(Entry.track)
        .having(and_(func.min(Entry.captured_at) <= tracklet.end, func.max(Entry.captured_at) >= tracklet.start))
        .limit(1)
    )
    return session.execute(spans).first() is not None


def _continued_track(session: Session, tracklet: Tracklet, gap: timedelta) -> tuple[str, int | None] | None:
    """The identity (and person) of this camera's track seen within ``gap`` of the tracklet, if any."""
    if tracklet.track is None:
        return None
    row = session.execute(
        select(Entry.identity, Entry.person_id)
        .where(
            Entry.camera == tracklet.camera,
            Entry.track == tracklet.track,
            Entry.captured_at >= tracklet.start - gap,
            Entry.captured_at <= tracklet.end + gap,
        )
        .order_by(Entry.id.desc())
        .limit(1)
    ).first()
    return (row.identity, row.person_id) if row is not None else None


def plan(
    gallery: Gallery,
    tracklets: Sequence[Tracklet],
    templates: np.ndarray,
    threshold: float | None,
    track_gap: timedelta,
    provisional: float | None = None,
    averaged: Sequence[float] | None = None,
    transit: TransitTable | None = None,
) -> list[Decision]:
    """Decide where each tracklet goes (reads only; the write is ``commit``). With no threshold nothing is
    matched by appearance: each tracklet continues its track or starts a person. ``provisional`` (default:
    ``threshold``) bounds the joins of provisional people (``provisional_threshold``). ``averaged``: each
    template's ``averaged_out`` squared distance, added back to the distances compared with the thresholds.
    ``transit``: no tracklet joins someone seen at another camera more recently than anyone walks from there."""
    lost = list(averaged) if averaged is not None else [0.0] * len(tracklets)
    if provisional is None:
        provisional = threshold
    k = min(JOIN_CANDIDATES, len(gallery)) if threshold is not None else 0
    if k > 0:
        squared, ids = gallery.search(templates, k)
    else:
        squared, ids = np.empty((len(tracklets), 0), np.float32), np.empty((len(tracklets), 0), np.int64)
    decisions: list[Decision] = []
    new_people = 0
    with gallery.sessions() as session:
        hits = sorted({int(i) for i in ids.ravel() if i >= 0})
        rows = {
            r.id: (r.identity, r.person_id)
            for r in session.execute(select(Entry.id, Entry.identity, Entry.person_id).where(Entry.id.in_(hits)))
        }
        for t, tracklet in enumerate(tracklets):
            continued = _continued_track(session, tracklet, track_gap)
            if continued is not None:
                decisions.append(Decision("track", identity=continued[0], person_id=continued[1]))
                continue
            # Candidates: (distance, identity, person_id, new_person), the gallery's and this request's.
            candidates: list[tuple[float, str | None, int | None, int | None]] = []
            if threshold is not None:
                seen: set[str] = set()
                for entry_id, d2 in zip(ids[t].tolist(), squared[t].tolist(), strict=True):
                    if entry_id < 0 or entry_id not in rows:
                        continue
                    identity, person_id = rows[entry_id]
                    if identity not in seen:
                        seen.add(identity)
                        candidates.append((math.sqrt(max(d2, 0.0) + lost[t]), identity, person_id, None))
                for s, (earlier_tracklet, earlier_decision) in enumerate(zip(tracklets, decisions, strict=False)):
                    if _overlaps(earlier_tracklet, tracklet):
                        continue  # two tracks at once on one camera: two people
                    if _too_soon_in_request(tracklets, decisions, earlier_decision, tracklet, transit):
                        continue
                    distance = math.sqrt(float(((templates[s] - templates[t]) ** 2).sum()) + lost[s] + lost[t])
                    candidates.append(
                        (distance, earlier_decision.identity, earlier_decision.person_id, earlier_decision.new_person)
                    )
                candidates.sort(key=lambda c: c[0])
            decision = None
            for distance, identity, person_id, new_person in candidates:
                if threshold is None or distance > threshold:
                    break
                if provisional is not None and distance > provisional and is_provisional(identity):
                    continue  # a named identity farther away may still be under the join threshold
                if identity is not None and (
                    _conflicts(session, identity, tracklet) or _seen_too_soon(session, identity, tracklet, transit)
                ):
                    continue
                decision = Decision("match", identity, person_id, new_person, distance)
                break
            if decision is None:
                decision = Decision("new", new_person=new_people)
                new_people += 1
            decisions.append(decision)
    return decisions


def _overlaps(a: Tracklet, b: Tracklet) -> bool:
    return a.camera == b.camera and a.track != b.track and a.start <= b.end and b.start <= a.end


def _span(tracklet: Tracklet) -> Span:
    return Span(tracklet.camera, tracklet.start, tracklet.end)


def _too_soon_in_request(
    tracklets: Sequence[Tracklet],
    decisions: Sequence[Decision],
    target: Decision,
    tracklet: Tracklet,
    transit: TransitTable | None,
) -> bool:
    """A tracklet of this request already gone to ``target``'s person was seen too recently at another camera."""
    if transit is None:
        return False
    return any(
        transit.too_soon(_span(tracklets[u]), _span(tracklet))
        for u, decision in enumerate(decisions)
        if (decision.identity, decision.new_person) == (target.identity, target.new_person)
    )


def _seen_too_soon(session: Session, identity: str, tracklet: Tracklet, transit: TransitTable | None) -> bool:
    """``identity`` was seen at another camera more recently than anyone walks from there to the tracklet's."""
    near = transit.least_from(tracklet.camera) if transit is not None else {}
    if not near:
        return False
    assert transit is not None
    widest = max(near.values())
    rows = session.execute(
        select(Entry.camera, Entry.captured_at).where(
            Entry.identity == identity,
            Entry.camera.in_(sorted(near)),
            Entry.captured_at >= tracklet.start - widest,
            Entry.captured_at <= tracklet.end + widest,
        )
    )
    return any(transit.too_soon(_span(tracklet), Span(camera, at, at)) for camera, at in rows)


def new_entries(
    tracklets: Sequence[Tracklet], decisions: Sequence[Decision], sightings: Sequence[Sighting]
) -> tuple[list[NewEntry], list[int]]:
    """The entries to insert, in the request's file order, and each file's tracklet."""
    of_file = [0] * len(sightings)
    for t, tracklet in enumerate(tracklets):
        for i in tracklet.indices:
            of_file[i] = t
    new = [
        NewEntry(
            identity=decisions[of_file[i]].identity or "",
            camera=s.camera,
            meta={},
            captured_at=s.captured_at,
            person_id=decisions[of_file[i]].person_id,
            track=s.track,
        )
        for i, s in enumerate(sightings)
    ]
    return new, of_file


def before_insert(decisions: Sequence[Decision], of_file: Sequence[int]) -> BeforeInsert:
    """The transaction's first step: new people get their rows (and so their ids and labels), and people joined
    are read again, so that one named or merged since ``plan`` is followed to where it is now."""

    def fill(session: Session, new: list[NewEntry]) -> None:
        created: dict[int, Person] = {}
        for decision in decisions:
            if decision.new_person is not None and decision.new_person not in created:
                created[decision.new_person] = Person()
        session.add_all(created.values())
        session.flush()
        for decision in decisions:
            if decision.new_person is not None:
                person = created[decision.new_person]
                decision.person_id, decision.identity = person.id, unnamed_label(person.id)
            elif decision.person_id is not None:
                decision.person_id, decision.identity = current(session, decision.person_id)
        for item, t in zip(new, of_file, strict=True):
            item.identity, item.person_id = decisions[t].identity or "", decisions[t].person_id

    return fill


def current(session: Session, person_id: int) -> tuple[int, str]:
    """A person's id and identity now: a merged person's sightings went to the person it was merged into."""
    for _ in range(64):  # merges chain; a cycle cannot be made by the API, the bound only guards a hand-edited one
        person = session.get(Person, person_id)
        if person is None:
            break
        if person.status == PERSON_MERGED and person.merged_into is not None:
            person_id = person.merged_into
            continue
        return person.id, person.name if person.status == PERSON_NAMED and person.name else unnamed_label(person.id)
    return person_id, unnamed_label(person_id)


def enroll(
    gallery: Gallery,
    sightings: Sequence[Sighting],
    crops: list[StoredCrop],
    vectors: np.ndarray,
    threshold: float | None,
    aggregation: Aggregation,
    track_gap: timedelta,
    *,
    provisional: float | None = None,
    correct_averaging: bool = True,
    transit: TransitTable | None = None,
    idempotency_key: str | None = None,
    request_sha256: str = "",
    answer: Callable[[list[Tracklet], list[Decision]], str] | None = None,
) -> tuple[list[Tracklet], list[Decision], str | None]:
    """Group the request's crops (held by ``Gallery.hold_crops``) into tracklets, decide where each goes, and enrol
    them all in one transaction; (tracklets, decisions with their entries, or the first answer of a replayed
    Idempotency-Key). The crops' holds are released either way."""
    tracklets = tracklets_of(sightings)
    members = [(vectors[t.indices], [sightings[i] for i in t.indices]) for t in tracklets]
    templates = np.stack([template(v, s, aggregation) for v, s in members]).astype(np.float32)
    averaged = [averaged_out(v, s, aggregation) for v, s in members] if correct_averaging else None
    try:
        decisions = plan(gallery, tracklets, templates, threshold, track_gap, provisional, averaged, transit)
    except BaseException:  # e.g. the index resyncing: the crops are not enrolled
        gallery.release_crops(crops)
        raise
    new, of_file = new_entries(tracklets, decisions, sightings)

    def answered(entries: list[Entry]) -> str:
        _fill_entries(decisions, of_file, entries)
        return answer(tracklets, decisions) if answer is not None else ""

    enrolled = gallery.enroll_held(
        new,
        crops,
        vectors,
        idempotency_key=idempotency_key,
        request_sha256=request_sha256,
        answer=answered,
        before_insert=before_insert(decisions, of_file),
    )
    if enrolled.replayed is not None:
        return tracklets, decisions, enrolled.replayed
    _fill_entries(decisions, of_file, enrolled.entries)
    return tracklets, decisions, None


def _fill_entries(decisions: Sequence[Decision], of_file: Sequence[int], entries: Sequence[Entry]) -> None:
    for decision in decisions:
        decision.entries = []
    for t, entry in zip(of_file, entries, strict=True):
        decisions[t].entries.append(entry.id)
