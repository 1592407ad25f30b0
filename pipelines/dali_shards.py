"""The `dali` backend's reader for converted tar shards (`fn.readers.webdataset`).

Layout (written by `tools/convert.py --format shards`): `ROOT/SPLIT/*.tar`, each with an index file of the same
name ending `.idx` in DALI's `wds2idx` format (first line `v1.2 <num_samples>`); a sample's members share a key:
`KEY.jpg` (the image), `KEY.cls` (label, ASCII) and `KEY.i64` (label and dataset index, two little-endian int64).
The reader takes `jpg` and the typed `i64`, so every batch carries labels and dataset indices.

Order: each epoch permutes the shard list with (train.seed, epoch); DALI splits the samples of that list into
`world` contiguous ranges (`shard_id=rank`; `stick_to_shard=True` keeps any wrap-around inside the rank's range)
and shuffles within a buffer of `data.dali_shuffle_buffer` samples. The shuffle is therefore local: shards should
be written in a random sample order. Every rank yields ceil(N / world) samples per epoch (the shorter ranges
repeat a sample). A mid-epoch resume yields the remaining number of steps, drawn afresh from the epoch's order.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

EXTS = ("jpg", "i64")


def find_shard_dir(root, split: str) -> Path | None:
    """`root/split` when it is a folder of tar shards with index files, else None."""
    d = Path(root) / split
    return d if d.is_dir() and any(d.glob("*.idx")) else None


def _count(index: Path) -> tuple[int, set[str]]:
    """Samples in a v1.2 index file, and the member extensions of its first sample."""
    with open(index) as f:
        head, first = f.readline().split(), f.readline().split()
    if len(head) != 2 or head[0] != "v1.2" or not head[1].isdigit():
        raise ValueError(f"shard index '{index}' is not a DALI v1.2 index; re-run tools/convert.py --format shards")
    return int(head[1]), set(first[0::4])


class ShardSource:
    def __init__(self, directory, shuffle_buffer: int = 4096):
        directory = Path(directory)
        self.tars = sorted(directory.glob("*.tar"))
        self.indices = [t.with_suffix(".idx") for t in self.tars]
        missing = [t.name for t, i in zip(self.tars, self.indices) if not i.is_file()]
        if missing or not self.tars:
            raise FileNotFoundError(f"shard folder '{directory}': " + (f"no index file for {missing[:3]}" if missing
                                    else "no .tar shards") + "; re-run tools/convert.py --format shards")
        self.counts = []
        for index in self.indices:
            n, exts = _count(index)
            if n and not set(EXTS) <= exts:
                raise ValueError(f"shard index '{index}' lists members {sorted(exts)}; the dali backend needs "
                                 f"{list(EXTS)} (re-run tools/convert.py --format shards)")
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
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
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
