"""What every reader returns: torchreid's vocabulary (pid, camid) over plain lists of samples."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from models import to_rgb

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # a loader's collated (image, pid, camid, index)

@dataclass(frozen=True)
class Sample:
    path: Path
    pid: int  # person identity; 0 is a distractor in Market-1501 (kept in the gallery), junk (-1) is dropped
    camid: int  # camera index, 0-based


@dataclass
class ReidDataset:
    """A data set's three splits, as torchreid names them."""

    name: str
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        rows = [f"{self.name}: split | ids | images | cameras"]
        for split in ("train", "query", "gallery"):
            samples: list[Sample] = getattr(self, split)
            rows.append(
                f"  {split:<7} | {len({s.pid for s in samples}):>5} | {len(samples):>6} | "
                f"{len({s.camid for s in samples}):>3}"
            )
        return "\n".join(rows)


class ImageDataset(torch.utils.data.Dataset):
    """Samples -> (image tensor, pid, camid, index); the transform turns a PIL RGB image into a tensor.

    With ``prepare`` (a deterministic PIL -> tensor step, such as decoding and resizing), each image is prepared
    once and kept in memory, and ``transform`` (the random part) runs on the kept tensor every time: a small CPU
    spends about a fifth of a training step decoding and resizing JPEGs otherwise. Each loader worker keeps its
    own copy."""

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Any], torch.Tensor],
        prepare: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.prepare = prepare
        self._prepared: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        sample = self.samples[index]
        if self.prepare is None:
            return self.transform(self._read(sample)), sample.pid, sample.camid, index
        if index not in self._prepared:
            self._prepared[index] = self.prepare(self._read(sample))
        return self.transform(self._prepared[index]), sample.pid, sample.camid, index

    @staticmethod
    def _read(sample: Sample) -> Image.Image:
        with Image.open(sample.path) as file:
            # A copy: an RGB file comes back from to_rgb as the same lazy object, unusable once the file closes.
            return to_rgb(file).copy()
