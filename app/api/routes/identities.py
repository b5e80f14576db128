"""``/identities``: the enrolled identities and their entry counts; delete one whole."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api.deps import GalleryDep, ReadyDep
from app.errors import ApiError, problem_responses
from app.schemas import DeleteResult, IdentityOut

router = APIRouter(
    prefix="/identities",
    tags=["identities"],
    responses=problem_responses(401, 413, 422, 503, 504),
)


@router.get("", response_model=list[IdentityOut])
async def list_identities(gallery: GalleryDep) -> list[IdentityOut]:
    rows = await run_in_threadpool(gallery.identities)
    return [IdentityOut(identity=i, entries=n) for i, n in rows]


@router.delete("/{identity}", response_model=DeleteResult, responses=problem_responses(404))
async def delete_identity(state: ReadyDep, gallery: GalleryDep, identity: str) -> DeleteResult:
    ids = await run_in_threadpool(gallery.ids_of_identity, identity)
    if not ids:
        raise ApiError(404, "identity_not_found", f"no entries with identity {identity!r}")
    await run_in_threadpool(gallery.delete, ids)
    state.metrics.size.set(len(gallery))
    return DeleteResult(deleted=len(ids))
