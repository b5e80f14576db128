"""People seen but not enrolled (reid_people), and the operator's review of them: list, open (a timeline per
camera), name, merge, split off, ignore; and how many distinct people passed some cameras in a window.

A decision only moves sightings between people by relabelling their entries (one UPDATE): the templates and the
index stay as they are, and search answers read the identity from the database, so every replica answers with
the new label at once. A named person's label is its name; the others' is ``unknown-<id>``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from app.db import PERSON_IGNORED, PERSON_MERGED, PERSON_NAMED, PERSON_PROVISIONAL, Entry, PeopleApart, Person
from app.gallery import Gallery
from app.schemas import CameraSeen, PeopleCount, PersonOut, Timeline, Visit
from app.sightings import unnamed_label

Order = Literal["size", "recent"]
STATUSES = (PERSON_PROVISIONAL, PERSON_NAMED, PERSON_IGNORED, PERSON_MERGED)


class PersonNotFound(LookupError):
    pass


class InvalidDecision(ValueError):
    pass


def _label(person: Person) -> str:
    return person.name if person.status == PERSON_NAMED and person.name else unnamed_label(person.id)


def _cameras(session: Session, person_ids: Sequence[int]) -> dict[int, list[CameraSeen]]:
    rows = session.execute(
        select(
            Entry.person_id,
            Entry.camera,
            func.count(Entry.id),
            func.min(Entry.captured_at),
            func.max(Entry.captured_at),
            func.max(Entry.id),
        )
        .where(Entry.person_id.in_(list(person_ids)))
        .group_by(Entry.person_id, Entry.camera)
    ).all()
    out: dict[int, list[CameraSeen]] = {}
    for person_id, camera, n, first, last, thumbnail in rows:
        out.setdefault(person_id, []).append(
            CameraSeen(camera=camera, sightings=n, first_seen=_utc(first), last_seen=_utc(last), thumbnail=thumbnail)
        )
    for seen in out.values():
        seen.sort(key=lambda c: c.last_seen, reverse=True)
    return out


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _summaries(session: Session, people: Sequence[Person]) -> list[PersonOut]:
    ids = [p.id for p in people]
    counts = {
        r[0]: r[1:]
        for r in session.execute(
            select(
                Entry.person_id,
                func.count(Entry.id),
                func.count(func.distinct(func.coalesce(Entry.camera, "") + "\x1f" + func.coalesce(Entry.track, ""))),
                func.min(Entry.captured_at),
                func.max(Entry.captured_at),
            )
            .where(Entry.person_id.in_(ids))
            .group_by(Entry.person_id)
        )
    }
    cameras = _cameras(session, ids)
    out = []
    for p in people:
        n, tracks, first, last = counts.get(p.id, (0, 0, None, None))
        out.append(
            PersonOut(
                id=p.id,
                identity=_label(p),
                status=p.status,  # type: ignore[arg-type]
                merged_into=p.merged_into,
                sightings=n,
                tracks=tracks,
                first_seen=_utc(first) if first else None,
                last_seen=_utc(last) if last else None,
                cameras=cameras.get(p.id, []),
            )
        )
    return out


def list_people(
    gallery: Gallery, status: str | None, order: Order, offset: int, limit: int
) -> tuple[int, list[PersonOut]]:
    """(how many people have this status, the page of them: largest first, or most recently seen first)."""
    with gallery.sessions() as session:
        where = [Person.status == status] if status else [Person.status != PERSON_MERGED]
        total = session.scalar(select(func.count(Person.id)).where(*where)) or 0
        stats = (
            select(Entry.person_id, func.count(Entry.id).label("n"), func.max(Entry.captured_at).label("last"))
            .where(Entry.person_id.is_not(None))
            .group_by(Entry.person_id)
            .subquery()
        )
        key = stats.c.n if order == "size" else stats.c.last
        people = session.scalars(
            select(Person)
            .outerjoin(stats, stats.c.person_id == Person.id)
            .where(*where)
            .order_by(case((key.is_(None), 1), else_=0), key.desc(), Person.id)
            .offset(offset)
            .limit(limit)
        ).all()
        return total, _summaries(session, people)


def get_person(gallery: Gallery, person_id: int) -> PersonOut:
    with gallery.sessions() as session:
        return _summaries(session, [_person(session, person_id)])[0]


def _person(session: Session, person_id: int) -> Person:
    person = session.get(Person, person_id)
    if person is None:
        raise PersonNotFound(f"no person with id {person_id}")
    return person


def timeline(gallery: Gallery, person_id: int, gap: timedelta) -> Timeline:
    """The person's sightings as visits: runs on one camera without a pause longer than ``gap``."""
    with gallery.sessions() as session:
        person = _person(session, person_id)
        rows = session.execute(
            select(Entry.id, Entry.camera, Entry.captured_at)
            .where(Entry.person_id == person_id)
            .order_by(Entry.captured_at, Entry.id)
        ).all()
        summary = _summaries(session, [person])[0]
    visits: list[Visit] = []
    for entry_id, camera, at in rows:
        at = _utc(at)
        last = visits[-1] if visits else None
        if last is not None and last.camera == camera and at - last.last_seen <= gap:
            last.last_seen, last.sightings = at, last.sightings + 1
            last.entries.append(entry_id)
        else:
            visits.append(Visit(camera=camera, first_seen=at, last_seen=at, sightings=1, entries=[entry_id]))
    return Timeline(person=summary, visits=visits)


def _relabel(session: Session, person_ids: Sequence[int], identity: str, person_id: int) -> int:
    result = session.execute(
        update(Entry).where(Entry.person_id.in_(list(person_ids))).values(identity=identity, person_id=person_id)
    )
    return result.rowcount or 0


def _decide(gallery: Gallery, change: Callable[[Session], int]) -> PersonOut:
    """Run one review decision in one transaction, with the writers' locks (``Gallery.relabelling``)."""
    with gallery.relabelling() as session:
        person_id = change(session)
        session.flush()
        return _summaries(session, [_person(session, person_id)])[0]


def name_person(gallery: Gallery, person_id: int, name: str) -> PersonOut:
    """Its sightings take ``name`` as their identity (an existing identity's name joins them to it)."""

    def change(session: Session) -> int:
        person = _person(session, person_id)
        if person.status == PERSON_MERGED:
            raise InvalidDecision(f"person {person_id} was merged into person {person.merged_into}; name that one")
        person.status, person.name, person.updated_at = PERSON_NAMED, name, datetime.now(UTC)
        _relabel(session, [person_id], name, person_id)
        return person_id

    return _decide(gallery, change)


def merge_people(gallery: Gallery, person_id: int, into: int) -> PersonOut:
    """``person_id``'s sightings join ``into``; it stays as a record (status merged) so its id still resolves."""

    def change(session: Session) -> int:
        if person_id == into:
            raise InvalidDecision("a person cannot be merged into itself")
        source, target = _person(session, person_id), _person(session, into)
        for p in (source, target):
            if p.status == PERSON_MERGED:
                raise InvalidDecision(f"person {p.id} was already merged into person {p.merged_into}")
        _relabel(session, [person_id], _label(target), into)
        now = datetime.now(UTC)
        source.status, source.merged_into, source.updated_at = PERSON_MERGED, into, now
        target.updated_at, target.reviewed = now, True
        session.execute(update(Person).where(Person.merged_into == person_id).values(merged_into=into))
        return into

    return _decide(gallery, change)


def split_person(gallery: Gallery, person_id: int, entry_ids: Sequence[int]) -> PersonOut:
    """The given sightings leave the person for a new provisional one (whole tracks: a track is one person, so
    the other crops of a track named here go too)."""

    def change(session: Session) -> int:
        person = _person(session, person_id)
        rows = session.execute(
            select(Entry.id, Entry.camera, Entry.track).where(
                Entry.person_id == person_id, Entry.id.in_(list(entry_ids))
            )
        ).all()
        missing = sorted(set(entry_ids) - {r.id for r in rows})
        if missing:
            raise InvalidDecision(f"entries {missing[:10]} are not sightings of person {person_id}")
        tracks = {(r.camera, r.track) for r in rows if r.track is not None}
        moving = {r.id for r in rows}
        for camera, track in tracks:
            moving.update(
                session.scalars(
                    select(Entry.id).where(Entry.person_id == person_id, Entry.camera == camera, Entry.track == track)
                )
            )
        remaining = session.scalar(select(func.count(Entry.id)).where(Entry.person_id == person_id)) or 0
        if len(moving) >= remaining:
            raise InvalidDecision("a split must leave some sightings behind; to relabel all of them, name the person")
        new = Person(reviewed=True)
        session.add(new)
        session.flush()
        session.add(PeopleApart(person_a=person_id, person_b=new.id))  # re-grouping keeps them apart
        session.execute(
            update(Entry).where(Entry.id.in_(sorted(moving))).values(identity=unnamed_label(new.id), person_id=new.id)
        )
        person.updated_at, person.reviewed = datetime.now(UTC), True
        return new.id

    return _decide(gallery, change)


def ignore_person(gallery: Gallery, person_id: int) -> PersonOut:
    """Not a person (a mannequin, a poster, a bad detection): kept, so that later sightings of it join it, but
    listed apart and not counted."""

    def change(session: Session) -> int:
        person = _person(session, person_id)
        if person.status == PERSON_MERGED:
            raise InvalidDecision(f"person {person_id} was merged into person {person.merged_into}")
        person.status, person.name, person.updated_at = PERSON_IGNORED, None, datetime.now(UTC)
        _relabel(session, [person_id], unnamed_label(person_id), person_id)
        return person_id

    return _decide(gallery, change)


def count_people(
    gallery: Gallery, cameras: Sequence[str] | None, after: datetime | None, before: datetime | None
) -> PeopleCount:
    """Distinct people seen on ``cameras`` in [after, before): named identities and provisional people, not
    ignored ones. Each identity counts once."""
    with gallery.sessions() as session:
        query = (
            select(func.count(func.distinct(Entry.identity)))
            .select_from(Entry)
            .outerjoin(Person, Person.id == Entry.person_id)
            .where((Person.status.is_(None)) | (Person.status != PERSON_IGNORED))
        )
        if cameras:
            query = query.where(Entry.camera.in_(list(cameras)))
        if after is not None:
            query = query.where(Entry.captured_at >= after)
        if before is not None:
            query = query.where(Entry.captured_at < before)
        people = session.scalar(query) or 0
    return PeopleCount(people=people, cameras=list(cameras) if cameras else None, after=after, before=before)
