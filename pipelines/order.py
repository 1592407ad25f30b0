"""The order of samples: which sample each rank sees at each step of each epoch, and the seed of each batch's
augmentation. One copy of these rules for every backend (torch, pil, ffcv, dali) and for evaluation's feature
batches, so that all of them visit the same samples in the same order and a resumed run continues exactly.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The per-epoch shuffle's random generator (sample permutations; tar-shard order)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def steps_per_epoch(samples_per_rank: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch on one rank."""
    return samples_per_rank // batch_size if drop_last else math.ceil(samples_per_rank / batch_size)


class EpochSampler(Sampler):
    """Per-epoch shuffle from (seed, epoch), sharded across ranks (padded by wrapping so every rank has the same
    length, like DistributedSampler). `start` skips the first samples of this rank's epoch (mid-epoch resume)."""

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0):
        self.n, self.rank, self.world, self.shuffle, self.seed = n, rank, world, shuffle, seed
        self.per_rank = math.ceil(n / world)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = epoch_generator(self.seed, self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        order = (order * math.ceil(total / self.n))[:total]
        return order[self.rank:total:self.world]

    def __iter__(self):
        return iter(self.indices()[self.start:])


def batch_seed(seed: int, epoch: int, rank: int, idx) -> int:
    """Seed of a batch's augmentation: a function of the run seed, epoch, rank and the batch's sample indices,
    so it does not depend on which worker made the batch."""
    h = ((seed * 1_000_003 + epoch) * 10_007 + rank) % (2 ** 61 - 1)
    for i in idx.tolist() if isinstance(idx, torch.Tensor) else idx:
        h = ((h ^ int(i)) * 1_099_511_628_211) % (2 ** 61 - 1)
    return h


class EpochSteps:
    """`set_epoch`/`len()` of a pipeline that batches an `EpochSampler` (needs sampler, batch_size, drop_last)."""

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's order; `start_step` resumes mid-epoch at that batch."""
        self.epoch, self.start_step = epoch, start_step
        self.sampler.set_epoch(epoch, start_step * self.batch_size)

    def __len__(self) -> int:
        return max(0, steps_per_epoch(self.sampler.per_rank, self.batch_size, self.drop_last) - self.start_step)



