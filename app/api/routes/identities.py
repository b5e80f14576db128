"""``/identities``: the enrolled identities and their entry counts; delete one whole."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import GalleryDep, ReadyDep
from app.api.inputs import MAX_IDENTITY_LENGTH, check_identity
from app.errors import ApiError, problem_responses
from app.gallery import Gallery
from app.schemas import DeleteResult, IdentityOut

router = APIRouter(
    prefix="/identities",
    tags=["identities"],
    responses=problem_responses(401, 413, 422, 503, 504),
)


DEFAULT_PAGE = 100  # a gallery of 10^6 identities is not one answer; X-Total-Count says how many pages follow
MAX_PAGE = 1000
TOTAL_COUNT_HEADER = {
    "X-Total-Count": {"description": "number of identities in the gallery", "schema": {"type": "integer"}}
}


def identity_page(gallery: Gallery, offset: int, limit: int) -> tuple[int, list[IdentityOut]]:
    """(number of identities, the page of them by name, each with its first entry as thumbnail)."""
    page = gallery.identities(offset, limit)
    return gallery.identity_count(), [IdentityOut(identity=name, entries=n, thumbnail=first) for name, n, first in page]


# Paged with `offset` / `limit`; the answer keeps today's list shape, the total goes in X-Total-Count.
@router.get(
    "",
    response_model=list[IdentityOut],
    responses={200: {"description": "identities by name", "headers": TOTAL_COUNT_HEADER}},
)
async def list_identities(
    gallery: GalleryDep,
    response: Response,
    offset: Annotated[int, Query(ge=0, le=2**31, description="first identity, by name")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="page size")] = DEFAULT_PAGE,
) -> list[IdentityOut]:
    total, page = await run_in_threadpool(identity_page, gallery, offset, limit)
    response.headers["X-Total-Count"] = str(total)
    return page


@router.delete("/{identity}", response_model=DeleteResult, responses=problem_responses(404))
async def delete_identity(
    state: ReadyDep,
    gallery: GalleryDep,
    identity: Annotated[str, Path(max_length=MAX_IDENTITY_LENGTH, description="identity label", examples=["0001"])],
) -> DeleteResult:
    check_identity(identity)
    ids = await run_in_threadpool(gallery.ids_of_identity, identity)
    if not ids:
        raise ApiError(404, "identity_not_found", f"no entries with identity {identity!r}")
    await run_in_threadpool(gallery.delete, ids)
    state.metrics.size.set(len(gallery))
    return DeleteResult(deleted=len(ids))
