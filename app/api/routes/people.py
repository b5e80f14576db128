"""``/people``: people seen but not enrolled, grouped from sightings; the operator's review (name, merge, split,
ignore), each person's timeline, and how many people passed some cameras."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, Field, WithJsonSchema
from starlette.concurrency import run_in_threadpool

from app import people
from app.api.deps import FORM_CAMERAS, Camera, GalleryDep, ReadyDep, utc
from app.api.inputs import MAX_IDENTITY_LENGTH, MAX_SAFE_INTEGER, check_camera, check_new_identity
from app.api.routes.identities import TOTAL_COUNT_HEADER
from app.errors import ApiError, problem_responses
from app.regroup import Linkage, regroup
from app.schemas import PeopleCount, PersonOut, RegroupOut, Timeline
from app.sightings import join_threshold

T = TypeVar("T")
router = APIRouter(prefix="/people", tags=["people"], responses=problem_responses(401, 413, 422, 503, 504))
PersonId = Annotated[int, Path(ge=1, le=2**63 - 1, description="person id")]


class NameIn(BaseModel):
    name: str = Field(
        min_length=1, max_length=MAX_IDENTITY_LENGTH, description="the identity to give", examples=["Ann"]
    )


class MergeIn(BaseModel):
    into: int = Field(ge=1, le=MAX_SAFE_INTEGER, description="the person whose sightings it joins", examples=[7])


class SplitIn(BaseModel):
    entries: list[Annotated[int, Field(ge=1, le=MAX_SAFE_INTEGER)]] = Field(
        min_length=1, max_length=10_000, description="sightings (entry ids) to move to a new person; whole tracks go"
    )


async def _run(function: Callable[..., T], *args: Any) -> T:
    """``function`` (one of ``app.people``'s) in the thread pool, its refusals as 404 and 409."""
    try:
        return await run_in_threadpool(function, *args)
    except people.PersonNotFound as exc:
        raise ApiError(404, "person_not_found", str(exc)) from None
    except people.InvalidDecision as exc:
        raise ApiError(409, "invalid_decision", str(exc)) from None


# A query's date-time is read as RFC 3339 text: pydantic would also take a number as seconds since 1970.
TIME = WithJsonSchema({"type": "string", "format": "date-time"})


def rfc3339(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return utc(datetime.fromisoformat(value))
    except ValueError:
        raise ApiError(422, "invalid_time", f"{name}={value[:40]!r} is not an RFC 3339 date-time") from None


@router.get("", response_model=list[PersonOut], responses={200: {"headers": TOTAL_COUNT_HEADER}})
async def list_people(
    gallery: GalleryDep,
    response: Response,
    status: Annotated[
        Literal["provisional", "named", "ignored", "merged"] | None,
        Query(description="only people of this status (default: all but merged)"),
    ] = None,
    order: Annotated[Literal["size", "recent"], Query(description="largest first, or last seen first")] = "size",
    offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> list[PersonOut]:
    total, page = await _run(people.list_people, gallery, status, order, offset, limit)
    response.headers["X-Total-Count"] = str(total)
    return page


@router.get("/count", response_model=PeopleCount)
async def count_people(
    gallery: GalleryDep,
    cameras: Annotated[
        list[Camera] | None, Query(max_length=100, description="only these cameras"), FORM_CAMERAS
    ] = None,
    after: Annotated[str | None, Query(description="seen at or after (RFC 3339)"), TIME] = None,
    before: Annotated[str | None, Query(description="seen before (RFC 3339)"), TIME] = None,
) -> PeopleCount:
    """How many distinct people (named or provisional, not ignored) were seen on these cameras in the window."""
    for camera in cameras or []:
        check_camera(camera)
    return await _run(people.count_people, gallery, cameras, rfc3339(after, "after"), rfc3339(before, "before"))


@router.post("/regroup", response_model=RegroupOut, responses=problem_responses(409))
async def regroup_people(state: ReadyDep) -> RegroupOut:
    """Re-group every sighting now (the service also does it every REID_REGROUP_INTERVAL_S): tracks and lone
    crops are linked along their nearest neighbours where they share most of them (k-reciprocal Jaccard distance
    under REID_REGROUP_EPS) and lie under the join threshold, keeping tracks whole, tracks seen at once on a camera
    apart, people split apart apart, and named and reviewed people as they are."""
    assert state.embedder is not None and state.gallery is not None
    threshold, _ = join_threshold(state.settings, state.embedder.provenance, state.embedder.trained)
    if threshold is None:
        raise ApiError(409, "no_join_threshold", "the weights carry no calibrated threshold: set REID_JOIN_THRESHOLD")
    done = await run_in_threadpool(
        regroup,
        state.gallery,
        threshold,
        Linkage.from_settings(state.settings),
        correct_averaging=state.settings.tracklet_spread_correction,
        transit=state.transit,
    )
    return RegroupOut(threshold=threshold, **dataclasses.asdict(done))


@router.get("/{person_id}", response_model=Timeline, responses=problem_responses(404))
async def get_person(
    gallery: GalleryDep,
    person_id: PersonId,
    gap_s: Annotated[float, Query(gt=0, le=86_400 * 30, description="a pause that ends a visit (s)")] = 300.0,
) -> Timeline:
    """The person and their timeline: visits per camera, by time."""
    return await _run(people.timeline, gallery, person_id, timedelta(seconds=gap_s))


@router.post("/{person_id}/name", response_model=PersonOut, responses=problem_responses(400, 404, 409))
async def name_person(gallery: GalleryDep, person_id: PersonId, body: NameIn) -> PersonOut:
    """Name the person: their sightings take the name as identity (a name already enrolled joins them to it)."""
    check_new_identity(body.name)
    return await _run(people.name_person, gallery, person_id, body.name)


@router.post("/{person_id}/merge", response_model=PersonOut, responses=problem_responses(400, 404, 409))
async def merge_person(gallery: GalleryDep, person_id: PersonId, body: MergeIn) -> PersonOut:
    """Merge this person into another: the answer is the person merged into."""
    return await _run(people.merge_people, gallery, person_id, body.into)


@router.post("/{person_id}/split", response_model=PersonOut, responses=problem_responses(400, 404, 409))
async def split_person(gallery: GalleryDep, person_id: PersonId, body: SplitIn) -> PersonOut:
    """Move sightings (and the rest of their tracks) to a new provisional person: the answer is the new one."""
    return await _run(people.split_person, gallery, person_id, body.entries)


@router.post("/{person_id}/ignore", response_model=PersonOut, responses=problem_responses(404, 409))
async def ignore_person(gallery: GalleryDep, person_id: PersonId) -> PersonOut:
    """Not a person: kept apart, so that later sightings of it join it, and not counted."""
    return await _run(people.ignore_person, gallery, person_id)
