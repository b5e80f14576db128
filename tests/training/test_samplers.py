"""The P x K sampler: batch composition, replacement, determinism, length, disjoint shards across ranks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from training.data import Sample
from training.samplers import RandomIdentitySampler


def _samples(counts: dict[int, int]) -> list[Sample]:
    return [Sample(Path(f"{pid}_{i}.jpg"), pid, i % 2) for pid, n in counts.items() for i in range(n)]


def _blocks(indices: list[int], size: int) -> list[list[int]]:
    assert len(indices) % size == 0
    return [indices[i : i + size] for i in range(0, len(indices), size)]


COUNTS = {pid: 1 + (pid * 7) % 9 for pid in range(30)}  # 1..9 images an identity, some below K


@pytest.mark.parametrize(("p", "k"), [(4, 3), (20, 3), (5, 4)])
def test_every_batch_is_p_distinct_ids_with_k_images(p: int, k: int) -> None:
    samples = _samples(COUNTS)
    sampler = RandomIdentitySampler(samples, num_pids=p, num_instances=k, seed=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert len(indices) == len(sampler) > 0
        for batch in _blocks(indices, p * k):
            pids = Counter(samples[i].pid for i in batch)
            assert len(pids) == p and set(pids.values()) == {k}
            for pid in pids:  # an id's images in one batch are distinct unless it has fewer than K
                mine = [i for i in batch if samples[i].pid == pid]
                assert len(set(mine)) == min(k, COUNTS[pid])


def test_ids_with_fewer_than_k_images_are_drawn_with_replacement() -> None:
    samples = _samples({0: 1, 1: 2, 2: 1, 3: 2})
    sampler = RandomIdentitySampler(samples, num_pids=4, num_instances=3)
    (batch,) = _blocks(list(sampler), 12)
    for pid, n in enumerate([1, 2, 1, 2]):
        mine = [i for i in batch if samples[i].pid == pid]
        assert len(mine) == 3 and set(mine) <= {i for i, s in enumerate(samples) if s.pid == pid}
        assert len(set(mine)) <= n


def test_epoch_uses_every_complete_group_as_torchreid_does() -> None:
    # 6 ids x 6 images, K = 3: 12 groups, P = 2 -> exactly 6 batches covering every image once.
    samples = _samples(dict.fromkeys(range(6), 6))
    sampler = RandomIdentitySampler(samples, num_pids=2, num_instances=3, seed=3)
    indices = list(sampler)
    assert len(sampler) == 36 and sorted(indices) == list(range(36))


def test_same_seed_and_epoch_give_the_same_order_and_others_do_not() -> None:
    samples = _samples(COUNTS)

    def order(seed: int, epoch: int) -> list[int]:
        sampler = RandomIdentitySampler(samples, num_pids=4, num_instances=3, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0) and order(5, 2) == order(5, 2)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_shares_of_the_same_batches(world_size: int) -> None:
    samples = _samples(COUNTS)
    single = RandomIdentitySampler(samples, num_pids=4, num_instances=3, seed=2)
    single.set_epoch(4)
    all_batches = _blocks(list(single), 12)
    shards = []
    for rank in range(world_size):
        sampler = RandomIdentitySampler(samples, num_pids=4, num_instances=3, seed=2, rank=rank, world_size=world_size)
        sampler.set_epoch(4)
        shards.append([tuple(b) for b in _blocks(list(sampler), 12)])
        assert len(sampler) == len(shards[-1]) * 12
    assert len({len(s) for s in shards}) == 1  # every rank steps the same number of times
    seen = [b for shard in shards for b in shard]
    assert len(seen) == len(set(seen))  # no batch on two ranks
    assert set(seen) <= {tuple(b) for b in all_batches}
    assert len(all_batches) - len(seen) < world_size  # at most world_size - 1 batches left out


def test_works_with_a_dataloader_of_p_times_k() -> None:
    samples = _samples(COUNTS)
    sampler = RandomIdentitySampler(samples, num_pids=4, num_instances=3)
    pids = torch.tensor([s.pid for s in samples])
    loader = torch.utils.data.DataLoader(pids, batch_size=12, sampler=sampler, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == len(sampler) // 12
    assert all(len(b.unique()) == 4 for b in batches)


def test_too_few_identities_or_bad_arguments_are_errors() -> None:
    samples = _samples({0: 4, 1: 4})
    with pytest.raises(ValueError, match="at least P=3 identities; the samples have 2"):
        RandomIdentitySampler(samples, num_pids=3)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        RandomIdentitySampler(samples, num_pids=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="K=0"):
        RandomIdentitySampler(samples, num_pids=2, num_instances=0)


def test_max_batches_makes_short_epochs_of_the_same_batches() -> None:
    samples = _samples(COUNTS)
    whole = RandomIdentitySampler(samples, num_pids=4, num_instances=3, seed=5)
    short = RandomIdentitySampler(samples, num_pids=4, num_instances=3, seed=5, max_batches=2)
    for epoch in range(3):
        whole.set_epoch(epoch)
        short.set_epoch(epoch)
        assert len(whole.batches()) > 2
        assert short.batches() == whole.batches()[:2]  # a prefix: the same P x K batches, cut short
        assert len(list(short)) == len(short) == 2 * 12
    with pytest.raises(ValueError, match="max_batches must be >= 0"):
        RandomIdentitySampler(samples, num_pids=4, max_batches=-1)
