"""``/mask``: the generated attention mask of an entry or an upload, as a PNG (mask, overlay, hidden)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.api.deps import EmbedderDep, EntryId, GalleryDep, ReadyDep, State, masks_of, no_mask, uploads
from app.api.routes.gallery import existing_entry
from app.errors import problem_responses
from app.rendering import View, render_mask

router = APIRouter(
    prefix="/mask",
    tags=["mask"],
    responses=problem_responses(401, 413, 422, 503, 504),
)

ViewQuery = Annotated[
    View,
    Query(
        description="mask: the mask as grey; overlay: heat map over the crop; hidden: the crop with the mask's "
        "top `mask_ratio` (0.3) of pixels hidden, exactly as training hid them"
    ),
]
PNG = {200: {"content": {"image/png": {}}, "description": "PNG at the crop's size"}}


async def _render(state: State, image: Image.Image, view: View) -> Response:
    [mask] = await masks_of(state, [image])
    assert state.embedder is not None
    body = await run_in_threadpool(render_mask, image, mask, view, state.embedder.config.mask_ratio)
    return Response(body, media_type="image/png")


@router.get("/{entry_id}", response_class=Response, responses=PNG | problem_responses(404, 409))
async def mask_of_entry(
    state: ReadyDep, gallery: GalleryDep, embedder: EmbedderDep, entry_id: EntryId, view: ViewQuery = "mask"
) -> Response:
    entry = await existing_entry(gallery, entry_id)
    if not embedder.has_mask_generator:
        raise no_mask()
    path = gallery.data_dir / entry.crop_path
    image = await run_in_threadpool(lambda: Image.open(path).convert("RGB"))
    return await _render(state, image, view)


@router.post("", response_class=Response, responses=PNG | problem_responses(400, 409, 415))
async def mask_of_upload(
    state: ReadyDep,
    embedder: EmbedderDep,
    file: Annotated[UploadFile, File(description="a crop")],
    view: ViewQuery = "mask",
) -> Response:
    if not embedder.has_mask_generator:
        raise no_mask()
    [upload] = await uploads(state, [file])
    return await _render(state, upload.image, view)
