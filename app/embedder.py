"""The networks at serving time: load once, pick and check a backend (``app.backends``), and share forward
passes between concurrent requests with a bounded micro-batcher (templates and masks alike)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.backends import Backend, ReferenceCrops, Selection, TorchBackend, reference_crops, select_backend
from app.config import Settings
from app.untrained import ensure_untrained_weights
from models import (
    ModelConfig,
    WeightsError,
    extractor_fingerprint,
    load_weights,
    preprocess_batch,
    read_metadata,
)
from models.devices import resolve_device
from models.unet import MaskGenerator

logger = logging.getLogger(__name__)

T = TypeVar("T")

# When the request being served must be answered (time.monotonic()); set by the timeout middleware. Work of a
# request past it is dropped from the batch queue instead of being run for nobody.
request_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("request_deadline", default=None)


class QueueFull(Exception):
    """The batch queue holds ``limit`` images already: the caller answers 503 with Retry-After."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"{queued} images are waiting for the network (limit {limit})")
        self.queued = queued
        self.limit = limit


@dataclass
class _Job(Generic[T]):
    images: list[Image.Image]
    future: asyncio.Future
    deadline: float | None


class MicroBatcher(Generic[T]):
    """Concurrent requests share forward passes. A request that finds nothing else queued runs at once; while a
    pass runs, the requests arriving meanwhile gather into the next one (up to ``max_size`` images; a batch
    that already has company waits at most ``max_wait_ms`` for more). At most ``max_queued`` images wait: past
    that ``submit`` raises QueueFull. A request cancelled or past its deadline before its pass starts is dropped.

    ``run(images) -> per-image results`` runs in the thread pool, one pass at a time."""

    def __init__(
        self, run: Callable[[list[Image.Image]], Sequence[T]], max_size: int, max_wait_ms: float, max_queued: int
    ) -> None:
        self.run = run
        self.max_size = max_size
        self.max_wait_ms = max_wait_ms
        self.max_queued = max_queued
        self.queued = 0  # images submitted and not yet started
        self.passes = 0  # forward passes run (for tests and metrics)
        self.dropped = 0  # jobs dropped because their request was gone
        self._queue: asyncio.Queue[_Job[T]] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._queue = None

    async def submit(self, images: list[Image.Image]) -> list[T]:
        if self._queue is None:  # not started (scripts, tests): a direct pass
            return list(await run_in_threadpool(self.run, images))
        if self.queued + len(images) > self.max_queued and self.queued > 0:
            raise QueueFull(self.queued, self.max_queued)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.queued += len(images)
        self._queue.put_nowait(_Job(images, future, request_deadline.get()))
        return await future  # cancelled with its request: the loop then skips the job

    def _live(self, job: _Job[T]) -> bool:
        """Take ``job`` off the count; False when nobody waits for it any more (cancelled, or past its deadline)."""
        self.queued -= len(job.images)
        if job.future.done():
            self.dropped += 1
            return False
        if job.deadline is not None and time.monotonic() > job.deadline:
            job.future.set_exception(TimeoutError("the request's time limit passed before its forward pass"))
            self.dropped += 1
            return False
        return True

    async def _loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        while True:
            jobs = [job for job in [await queue.get()] if self._live(job)]
            size = sum(len(j.images) for j in jobs)
            while not queue.empty() and size < self.max_size:  # company already waiting: no delay
                job = queue.get_nowait()
                if self._live(job):
                    jobs.append(job)
                    size += len(job.images)
            if len(jobs) > 1 and size < self.max_size and self.max_wait_ms > 0:
                deadline = time.monotonic() + self.max_wait_ms / 1000
                while size < self.max_size and (remaining := deadline - time.monotonic()) > 0:
                    try:
                        job = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        break
                    if self._live(job):
                        jobs.append(job)
                        size += len(job.images)
            if not jobs:
                continue
            images = [image for job in jobs for image in job.images]
            self.passes += 1
            try:
                results = await run_in_threadpool(self.run, images)
            except Exception as exc:  # hand the failure to every waiting request
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(list(results[start : start + len(job.images)]))
                start += len(job.images)


@dataclass
class Embedder:
    config: ModelConfig
    extractor: torch.nn.Module  # fp32 PyTorch: the reference every backend is checked against
    mask_generator: MaskGenerator | None
    device: torch.device
    provenance: dict[str, Any]
    trained: bool
    fingerprint: str = ""  # models.extractor_fingerprint of the extractor: the template space's identity
    weights_path: Path | None = None  # the file served: REID_WEIGHTS, or the untrained one in the data folder
    backend: Backend | None = None  # what serves the extractor; None until load_backends()
    mask_backend: Backend | None = None
    selections: dict[str, Selection] = field(default_factory=dict)  # role -> how its backend was chosen
    batch_max_size: int = 32
    batch_max_wait_ms: float = 5.0
    batch_max_queued: int = 256
    inference_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=256))  # the latest passes
    templates: MicroBatcher[np.ndarray] | None = None
    masks: MicroBatcher[np.ndarray] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Embedder:
        """The networks of ``settings.weights`` (or the untrained one kept in the data folder, said loudly), with
        their backends."""
        device = resolve_device(settings.device)
        if settings.weights is not None:
            read_metadata(settings.weights)  # fails fast, with the file named, before any tensor
            model = load_weights(settings.weights, device)
            embedder = cls(model.config, model.extractor, model.mask_generator, device, model.provenance, True)
            embedder.weights_path = settings.weights
        else:
            path = ensure_untrained_weights(settings.data_dir, settings.backbone, settings.pretrained)
            try:
                model = load_weights(path, device)
            except WeightsError as exc:
                raise WeightsError(
                    f"{exc}. It holds the untrained weights an earlier start built: delete it to build new ones "
                    "(entries enrolled under it will not match them)"
                ) from exc
            logger.warning(
                "NO TRAINED WEIGHTS (REID_WEIGHTS unset): serving %s with %s, kept in %s; matches are NOT meaningful",
                model.config.backbone,
                model.provenance.get("source", "untrained weights"),
                path,
            )
            embedder = cls(model.config, model.extractor, None, device, model.provenance, False)
            embedder.weights_path = path
        embedder.fingerprint = model.fingerprint
        embedder.batch_max_size = settings.batch_max_size
        embedder.batch_max_wait_ms = settings.batch_max_wait_ms
        embedder.batch_max_queued = settings.batch_queue_size
        embedder.load_backends(
            settings.backend,
            settings.data_dir / "onnx",
            settings.cuda_dtype,
            settings.cuda_graph_batch_list,
            crops_dir=settings.calibration_dir or settings.data_dir / "crops",
            candidates=settings.backend_candidate_list,
            min_cosine_reduced=settings.parity_min_cosine_reduced,
            min_nn_agreement=settings.parity_min_nn_agreement,
        )
        return embedder

    def load_backends(
        self,
        kind: str,
        cache_dir: Path,
        dtype: str = "auto",
        graph_batches: Sequence[int] = (),
        crops_dir: Path | None = None,
        candidates: Sequence[str] | None = None,
        **bars: float,
    ) -> None:
        """Choose and check the backends of both networks (raises BackendError when a named one is refused).
        ``crops_dir``'s crops are the parity check's set and INT8's calibration (``app.backends.crops``); ``bars``:
        ``min_cosine_reduced`` and ``min_nn_agreement`` of ``select_backend``."""
        crops: ReferenceCrops | None = None
        if kind != "torch" or self.device.type == "cuda":  # the CPU reference alone needs no check
            crops = reference_crops(crops_dir, self.config)
            logger.info("backend check set: %s", crops.source if crops else "no real crops (the noise batch)")
        options: dict[str, Any] = {"crops": crops, "dtype": dtype, "graph_batches": graph_batches, **bars}
        if candidates is not None:
            options["candidates"] = candidates
        networks = {"extractor": (self.extractor, self.fingerprint)}
        if self.mask_generator is not None:
            networks["mask_generator"] = (
                self.mask_generator,
                extractor_fingerprint(self.config, self.mask_generator.state_dict()),
            )
        for role, (module, fingerprint) in networks.items():
            self.selections[role] = select_backend(kind, module, role, self.config, fingerprint, cache_dir, **options)
        self.backend = self.selections["extractor"].backend
        if "mask_generator" in self.selections:
            self.mask_backend = self.selections["mask_generator"].backend

    @property
    def feat_dim(self) -> int:
        return self.config.feat_dim

    @property
    def has_mask_generator(self) -> bool:
        return self.mask_generator is not None

    @property
    def backend_name(self) -> str:
        return self.backend.name if self.backend is not None else "torch (not loaded)"

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return preprocess_batch(images, self.config)  # (B, 3, H, W)

    def _extractor_backend(self) -> Backend:
        if self.backend is None:
            self.backend = TorchBackend(self.extractor, self.device)
        return self.backend

    def embed_sync(self, images: list[Image.Image]) -> np.ndarray:
        """(n, feat_dim) float32 templates, in one forward pass of the serving backend."""
        batch = self.preprocess(images)
        start = time.perf_counter()
        out = self._extractor_backend()(batch)
        self.inference_seconds.append(time.perf_counter() - start)
        return np.ascontiguousarray(out, dtype=np.float32)

    def masks_sync(self, images: list[Image.Image]) -> list[np.ndarray]:
        """The generated masks, each at its image's own size, (H, W) in [0, 1]; one forward pass for all."""
        if self.mask_generator is None:
            raise RuntimeError("no mask generator")
        if self.mask_backend is None:
            self.mask_backend = TorchBackend(self.mask_generator, self.device)
        masks = torch.from_numpy(self.mask_backend(self.preprocess(images)))  # (B, 1, h, w)
        out = []
        for image, mask in zip(images, masks, strict=True):
            resized = torch.nn.functional.interpolate(mask[None], size=(image.height, image.width), mode="bilinear")
            out.append(resized[0, 0].clamp(0, 1).numpy())
        return out

    def mask_sync(self, image: Image.Image) -> np.ndarray:
        """The generated mask of one image at its own size, (H, W) in [0, 1]."""
        return self.masks_sync([image])[0]

    def warm_up(self) -> None:
        """One pass of each network; with CUDA graphs, one per batch bucket, so that no request pays a capture."""
        blank = Image.new("RGB", (self.config.input_width, self.config.input_height))
        for n in getattr(self.backend, "graph_batches", ()) or (1,):
            self.embed_sync([blank] * n)
        if self.mask_generator is not None:
            for n in getattr(self.mask_backend, "graph_batches", ()) or (1,):
                self.masks_sync([blank] * n)

    # -- dynamic micro-batching: concurrent requests share one forward pass -------------------------

    def start(self) -> None:
        # embed_sync is looked up at each pass, so that a test may replace it on the instance.
        self.templates = MicroBatcher(
            lambda images: list(self.embed_sync(images)),
            self.batch_max_size,
            self.batch_max_wait_ms,
            self.batch_max_queued,
        )
        self.templates.start()
        if self.mask_generator is not None:
            self.masks = MicroBatcher(
                lambda images: self.masks_sync(images),
                self.batch_max_size,
                self.batch_max_wait_ms,
                self.batch_max_queued,
            )
            self.masks.start()

    async def stop(self) -> None:
        for batcher in (self.templates, self.masks):
            if batcher is not None:
                await batcher.stop()

    async def embed(self, images: list[Image.Image]) -> np.ndarray:
        """(n, feat_dim) templates, through the micro-batcher once started."""
        if self.templates is None:
            return await run_in_threadpool(self.embed_sync, images)
        return np.stack(await self.templates.submit(images)).astype(np.float32, copy=False)

    async def generate_masks(self, images: list[Image.Image]) -> list[np.ndarray]:
        """The masks of ``images``, through the mask generator's micro-batcher once started."""
        if self.masks is None:
            return await run_in_threadpool(self.masks_sync, images)
        return await self.masks.submit(images)
