"""P x K batches (Hermans et al. 2017; section 3.2 of the paper: P = 20 identities, K = 3 images, 60 a batch).

Use it as a plain sampler with the loader's batch size set to P * K::

    sampler = RandomIdentitySampler(dataset.train, num_pids=20, num_instances=3, seed=0, rank=rank, world_size=ws)
    loader = DataLoader(ImageDataset(dataset.train, transform), batch_size=20 * 3, sampler=sampler, drop_last=True)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for images, pids, camids, indices in loader: ...

Every consecutive block of P * K indices it yields is one batch: P distinct identities, K images each (where an
identity has fewer than K images, all of them topped up with repeats drawn with replacement). An epoch follows
torchreid's ``RandomIdentitySampler``: each identity's images are shuffled and cut into groups of K, and batches
take one group from each of P identities drawn at random among those with groups left, until fewer than P remain.
With ``max_batches`` an epoch stops after that many batches (a random share of the identities each epoch): short
epochs, so that a small budget can still give every stage whole epochs.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from training.data.base import Sample

logger = logging.getLogger(__name__)


class RandomIdentitySampler(torch.utils.data.Sampler[int]):
    """Yields dataset indices, P * K per batch; with ``world_size`` > 1 each rank gets every world_size-th batch."""

    def __init__(
        self,
        samples: Sequence[Sample],
        num_pids: int = 20,  # P
        num_instances: int = 3,  # K
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int = 0,  # 0 = every batch the data give
    ) -> None:
        if max_batches < 0:
            raise ValueError(f"max_batches must be >= 0 (0 = no cap), got {max_batches}")
        if num_pids < 1 or num_instances < 1:
            raise ValueError(f"num_pids and num_instances must be >= 1, got P={num_pids}, K={num_instances}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in 0..world_size-1 and world_size >= 1, got rank={rank}, world_size={world_size}"
            )
        self.num_pids = num_pids
        self.num_instances = num_instances
        self.batch_size = num_pids * num_instances
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_batches = max_batches
        self.epoch = 0
        index_by_pid: dict[int, list[int]] = defaultdict(list)
        for index, sample in enumerate(samples):
            index_by_pid[sample.pid].append(index)
        self.index_by_pid = dict(sorted(index_by_pid.items()))
        if len(self.index_by_pid) < num_pids:
            raise ValueError(
                f"a P x K batch needs at least P={num_pids} identities; the samples have {len(self.index_by_pid)}"
            )
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle: each epoch's order is a function of (seed, epoch) only, the same on every rank."""
        self.epoch = epoch

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All ranks' batches of ``epoch`` (default: the current one), before sharding."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        groups: dict[int, list[list[int]]] = {}
        for pid, indices in self.index_by_pid.items():
            k = self.num_instances
            chosen = list(rng.permutation(indices))
            if len(chosen) < k:  # every image once, then repeats drawn with replacement to make up K
                chosen += list(rng.choice(indices, size=k - len(chosen), replace=True))
            # Groups of K; a last incomplete group is dropped, as in torchreid.
            groups[pid] = [[int(i) for i in chosen[j : j + k]] for j in range(0, len(chosen) - k + 1, k)]
        batches: list[list[int]] = []
        available = [pid for pid in groups if groups[pid]]
        while len(available) >= self.num_pids:
            picked = rng.choice(len(available), size=self.num_pids, replace=False)
            batch: list[int] = []
            for i in sorted(picked):
                batch.extend(groups[available[i]].pop())
            batches.append(batch)
            available = [pid for pid in available if groups[pid]]
        if self.max_batches:
            batches = batches[: self.max_batches]
        # Every rank gets the same number of batches (DistributedDataParallel steps in lockstep).
        batches = batches[: len(batches) - len(batches) % self.world_size]
        self._cache = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches()[self.rank :: self.world_size]:
            yield from batch

    def __len__(self) -> int:
        return len(self.batches()) // self.world_size * self.batch_size
