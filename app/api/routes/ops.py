"""Operations: liveness (``/health``, never behind the key), readiness (``/ready``, O(1)) and ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from app.api.deps import StateDep
from app.errors import problem, problem_responses
from app.schemas import Health, Ready

health_router = APIRouter(tags=["operations"])  # never behind the key: liveness probes carry none
router = APIRouter(tags=["operations"])
NO_WEIGHTS_WARNING = "no trained weights loaded (REID_WEIGHTS unset): matches are meaningless"


@health_router.get("/health", response_model=Health, responses=problem_responses(413, 504))
async def health(state: StateDep) -> Health:
    e, s = state.embedder, state.settings
    return Health(
        status="ok",
        ready=state.ready,
        trained_weights=bool(e and e.trained),
        warning=None if e is not None and e.trained else NO_WEIGHTS_WARNING,
        weights=str(s.weights) if s.weights else None,
        backbone=e.config.backbone if e else s.backbone,
        feat_dim=e.feat_dim if e else 0,
        mask_generator=bool(e and e.has_mask_generator),
        provenance=e.provenance if e else {},
        device=str(e.device) if e else s.device,
        backend=e.backend_name if e else s.backend,
        backends={role: sel.as_dict() for role, sel in e.selections.items()} if e else {},
        fingerprint=e.fingerprint if e else "",
        gallery_size=len(state.gallery) if state.gallery else 0,
    )


@router.get("/ready", response_model=Ready, responses=problem_responses(401, 413, 503, 504))
async def ready(state: StateDep) -> Any:
    """200 once the model has run and the gallery is open with its index agreeing with its columns; each probe
    then costs one indexed lookup of the change log's last number, whatever the size of the gallery. A database
    that is down answers 503 ``database_unavailable``."""
    gallery = state.gallery
    if not state.ready or gallery is None or not await run_in_threadpool(gallery.ready):
        return problem(503, "not_ready", "model not warmed up or index not matching the database yet")
    return Ready(ready=True)


@router.get("/metrics", response_class=Response, responses=problem_responses(401, 413, 504))
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
