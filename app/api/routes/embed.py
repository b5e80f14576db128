"""``/embed``: the templates of uploaded crops, for integrators who keep their own store."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from app.api.deps import EmbedderDep, ReadyDep, templates_of, uploads
from app.errors import problem_responses
from app.schemas import EmbedResponse, EmbedResult

router = APIRouter(
    prefix="/embed",
    tags=["embed"],
    responses=problem_responses(401, 413, 422, 503, 504),
)


@router.post("", response_model=EmbedResponse, responses=problem_responses(400, 415))
async def embed(
    state: ReadyDep,
    embedder: EmbedderDep,
    files: Annotated[list[UploadFile], File(min_length=1, description="crops to embed")],
) -> EmbedResponse:
    """The templates of uploaded crops."""
    loaded = await uploads(state, files)
    vectors = await templates_of(state, [u.image for u in loaded])
    return EmbedResponse(
        dim=embedder.feat_dim,
        results=[EmbedResult(filename=u.filename, embedding=v.tolist()) for u, v in zip(loaded, vectors, strict=True)],
    )
