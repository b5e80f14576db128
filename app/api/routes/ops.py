"""Operations: liveness (``/health``, never behind the key), readiness (``/ready``, O(1)) and ``/metrics``."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from app.api.deps import State, StateDep
from app.errors import problem, problem_responses
from app.schemas import Health, Ready

health_router = APIRouter(tags=["operations"])  # never behind the key: liveness probes carry none
router = APIRouter(tags=["operations"])
NO_WEIGHTS_WARNING = "no trained weights loaded (REID_WEIGHTS unset): matches are meaningless"


THREAD_POOL_PROBE_S = 3.0  # a thread for a no-op: a pool that cannot give one this fast is wedged, not busy


async def liveness_failure(state: State) -> str | None:
    """Why this process should be restarted, or None: a database that failed for good, the gallery's worker
    stopped or stuck, or no thread of the pool that every database call and decode runs in."""
    if state.fatal is not None:
        return state.fatal
    gallery = state.gallery
    if gallery is not None:
        if gallery.worker.fatal is not None:
            return f"the database failed: {gallery.worker.fatal}"
        silence = max(300.0, 10 * gallery.worker.poll_interval_s)  # a resync of a large gallery is one turn
        if not gallery.worker.alive(silence):
            return f"the gallery's background worker stopped or has not turned for {silence:g} s"
    try:
        await asyncio.wait_for(run_in_threadpool(lambda: None), THREAD_POOL_PROBE_S)
    except TimeoutError:
        return f"no worker thread became free within {THREAD_POOL_PROBE_S:g} s: the thread pool is exhausted"
    return None


@health_router.get("/health", response_model=Health, responses=problem_responses(413, 503, 504))
async def health(state: StateDep) -> Any:
    """Liveness: 200 while the process can work (starting included); 503 ``not_live`` with the reason when it
    needs a restart."""
    failure = await liveness_failure(state)
    if failure is not None:
        return problem(503, "not_live", failure)
    e, s = state.embedder, state.settings
    weights = e.weights_path if e else s.weights  # before the lifespan has run: what REID_WEIGHTS names
    return Health(
        status="ok",
        ready=state.ready,
        trained_weights=bool(e and e.trained),
        warning=None if e is not None and e.trained else NO_WEIGHTS_WARNING,
        weights=str(weights) if weights else None,
        backbone=e.config.backbone if e else s.backbone,
        feat_dim=e.feat_dim if e else 0,
        mask_generator=bool(e and e.has_mask_generator),
        provenance=e.provenance if e else {},
        device=str(e.device) if e else s.device,
        backend=e.backend_name if e else s.backend,
        backends={role: sel.as_dict() for role, sel in e.selections.items()} if e else {},
        fingerprint=e.fingerprint if e else "",
        gallery_size=len(state.gallery) if state.gallery else 0,
        auth=s.auth,
    )


@router.get("/ready", response_model=Ready, responses=problem_responses(401, 413, 503, 504))
async def ready(state: StateDep) -> Any:
    """200 once the model has run and the gallery is open on this database (its epoch and the change at the index's
    watermark unchanged: not restored or failed over under it), its index agreeing with its columns. Each probe
    costs three primary-key reads, whatever the size of the gallery. A database that is down answers 503
    ``database_unavailable``; one that changed under the index, 503 until the index is rebuilt from it."""
    gallery = state.gallery
    if not state.ready or gallery is None or not await run_in_threadpool(gallery.ready):
        return problem(503, "not_ready", "model not warmed up or index not matching the database yet")
    return Ready(ready=True)


@router.get("/metrics", response_class=Response, responses=problem_responses(401, 413, 504))
async def metrics(state: StateDep) -> Response:
    if state.gallery is not None:
        state.metrics.resyncs.set(state.gallery.resyncs)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
