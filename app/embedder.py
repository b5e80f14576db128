"""The networks at serving time: load once, embed with dynamic micro-batching, generate masks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from starlette.concurrency import run_in_threadpool

from app.config import Settings
from models import ModelConfig, build_eval_transform, build_extractor, load_weights, read_metadata
from models.unet import MaskGenerator

logger = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"REID_DEVICE={name!r} but CUDA is not available; use auto or cpu")
    return torch.device(name)


@dataclass
class Embedder:
    config: ModelConfig
    extractor: torch.nn.Module
    mask_generator: MaskGenerator | None
    device: torch.device
    provenance: dict[str, Any]
    trained: bool
    batch_max_size: int = 32
    batch_max_wait_ms: float = 5.0
    inference_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=256))  # the latest passes
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _queue: asyncio.Queue | None = None
    _task: asyncio.Task | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Embedder:
        device = pick_device(settings.device)
        if settings.weights is not None:
            read_metadata(settings.weights)  # fails fast, with the file named, before any tensor
            model = load_weights(settings.weights, device)
            embedder = cls(model.config, model.extractor, model.mask_generator, device, model.provenance, True)
        else:
            config = ModelConfig(backbone=settings.backbone)
            extractor = build_extractor(config, settings.pretrained).to(device).eval()
            source = f"ImageNet trunk from {settings.pretrained}" if settings.pretrained else "random initial weights"
            logger.warning(
                "NO TRAINED WEIGHTS (REID_WEIGHTS unset): serving %s with %s; matches are NOT meaningful",
                config.backbone,
                source,
            )
            embedder = cls(config, extractor, None, device, {"source": source}, False)
        embedder.batch_max_size = settings.batch_max_size
        embedder.batch_max_wait_ms = settings.batch_max_wait_ms
        return embedder

    @property
    def feat_dim(self) -> int:
        return self.config.feat_dim

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        transform = build_eval_transform(self.config)
        return torch.stack([transform(image) for image in images])

    def embed_sync(self, images: list[Image.Image]) -> np.ndarray:
        """(n, feat_dim) float32 templates, in one forward pass."""
        batch = self.preprocess(images).to(self.device)
        start = time.perf_counter()
        with self._lock, torch.inference_mode():
            out = self.extractor(batch).float().cpu().numpy()
        self.inference_seconds.append(time.perf_counter() - start)
        return np.ascontiguousarray(out, dtype=np.float32)

    def mask_sync(self, image: Image.Image) -> np.ndarray:
        """The generated mask at the image's own size, (H, W) in [0, 1]."""
        if self.mask_generator is None:
            raise RuntimeError("no mask generator")
        batch = self.preprocess([image]).to(self.device)
        with self._lock, torch.inference_mode():
            mask = self.mask_generator(batch)  # (1, 1, h, w)
            mask = torch.nn.functional.interpolate(mask.float(), size=(image.height, image.width), mode="bilinear")
        return mask[0, 0].clamp(0, 1).cpu().numpy()

    def warm_up(self) -> None:
        self.embed_sync([Image.new("RGB", (self.config.input_width, self.config.input_height))])
        if self.mask_generator is not None:
            self.mask_sync(Image.new("RGB", (self.config.input_width, self.config.input_height)))

    # -- dynamic micro-batching: concurrent requests share one forward pass -------------------------

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._batch_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def embed(self, images: list[Image.Image]) -> np.ndarray:
        if self._queue is None:
            return await run_in_threadpool(self.embed_sync, images)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((images, future))
        return await future

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        while True:
            jobs = [await self._queue.get()]
            size = len(jobs[0][0])
            deadline = time.monotonic() + self.batch_max_wait_ms / 1000
            while size < self.batch_max_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
                jobs.append(job)
                size += len(job[0])
            images = [image for job_images, _ in jobs for image in job_images]
            try:
                vectors = await run_in_threadpool(self.embed_sync, images)
            except Exception as exc:  # hand the failure to every waiting request
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for job_images, future in jobs:
                if not future.done():
                    future.set_result(vectors[start : start + len(job_images)])
                start += len(job_images)
