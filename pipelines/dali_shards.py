"""The `dali` backend's reader for converted tar shards (`fn.readers.webdataset`).

Layout (`pipelines/shards.py`, written by `tools/convert.py --format shards`): `ROOT/SPLIT/*.tar`, each with an
index file in DALI's `wds2idx` v1.2 format; a sample's members share a key: `KEY.jpg` (the image), `KEY.cls`
(label, ASCII) and `KEY.i64` (label and dataset index, two little-endian int64). The reader takes `jpg` and the
typed `i64`, so every batch carries labels and dataset indices.

Order: each epoch permutes the shard list with (train.seed, epoch); DALI splits the samples of that list into
`world` contiguous ranges (`shard_id=rank`; `stick_to_shard=True` keeps any wrap-around inside the rank's range)
and shuffles within a buffer of `data.dali.shuffle_buffer` samples. The shuffle is therefore local; the converter
writes samples in a seeded random order, so shards mix classes. Every rank yields ceil(N / world) samples per epoch (the shorter ranges
repeat a sample). A mid-epoch resume yields the remaining number of steps, drawn afresh from the epoch's order.
"""
from __future__ import annotations

import math

import torch

from pipelines.order import epoch_generator
from pipelines.shards import read_index, shard_pairs

__all__ = ["ShardSource"]

EXTS = ("jpg", "i64")


class ShardSource:
    bad: list[tuple[str, str]] = []   # converted shards hold no unreadable files (tools/convert.py left them out)

    def __init__(self, directory, shuffle_buffer: int = 4096):
        pairs = shard_pairs(directory)
        self.tars, self.indices, self.counts = [t for t, _ in pairs], [i for _, i in pairs], []
        for index in self.indices:
            entries = read_index(index)
            n = len(next(iter(entries.values()))) if entries else 0
            missing = [e for e in EXTS if e not in entries or (entries[e][:, 0] < 0).any()]
            if n and missing:
                raise ValueError(f"shard index '{index}': samples without {missing} members; the dali backend "
                                 f"reads {list(EXTS)} (re-run tools/convert.py --format shards)")
            self.counts.append(n)
        self.n = sum(self.counts)
        self.shuffle_buffer = shuffle_buffer

    def per_rank(self, world: int) -> int:
        return math.ceil(self.n / world)

    def epoch_count(self, world: int, start: int) -> int:
        return self.per_rank(world) - start

    def order(self, epoch: int, shuffle: bool, seed: int) -> list[int]:
        if not shuffle:
            return list(range(len(self.tars)))
        g = epoch_generator(seed, epoch)
        return torch.randperm(len(self.tars), generator=g).tolist()

    def read(self, epoch: int, rank: int, world: int, shuffle: bool, seed: int, start: int):
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        order = self.order(epoch, shuffle, seed)
        encoded, meta = fn.readers.webdataset(
            paths=[str(self.tars[i]) for i in order], index_paths=[str(self.indices[i]) for i in order],
            ext=list(EXTS), dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
            num_shards=world, shard_id=rank, stick_to_shard=True, pad_last_batch=True,
            random_shuffle=shuffle, initial_fill=max(1, self.shuffle_buffer), name="reader")
        return encoded, meta

    def labels_indices(self, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        meta = meta.reshape(-1, 2).long()
        return meta[:, 0], meta[:, 1]
