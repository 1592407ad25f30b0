"""kNN over a feature bank split across ranks: each rank searches its own part, the ranks merge their top-k.

Memory per rank falls with the number of ranks (ImageNet: 1.28 M x 2048 fp32 features are 10 GB on one rank,
1.3 GB each on 8). Every rank passes the same queries; the result equals the kNN over the whole bank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from engine.distributed import all_gather_cat


class KnnShards:
    """The collective operations `evaluation.metrics.knn_accuracy(..., shards=KnnShards())` needs."""

    def _reduce(self, value: int, op) -> int:
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=op)
        return int(t.item())

    def total(self, n: int) -> int:
        return self._reduce(n, dist.ReduceOp.SUM)

    def max(self, value: int) -> int:
        return self._reduce(value, dist.ReduceOp.MAX)

    def min(self, value: int) -> int:
        return self._reduce(value, dist.ReduceOp.MIN)

    def merge(self, top_sim: torch.Tensor, top_labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (B, <=k) nearest similarities and labels -> the whole bank's (B, k), sorted. A rank with
        fewer than k samples pads with -inf similarities (never chosen: k <= the whole bank's size)."""
        b, have = top_sim.shape
        if have < k:
            top_sim = torch.cat([top_sim, top_sim.new_full((b, k - have), float("-inf"))], dim=1)
            top_labels = torch.cat([top_labels, top_labels.new_zeros((b, k - have))], dim=1)
        world = dist.get_world_size()
        sims = all_gather_cat(top_sim).view(world, b, k).transpose(0, 1).reshape(b, world * k)
        labels = all_gather_cat(top_labels).view(world, b, k).transpose(0, 1).reshape(b, world * k)
        best, where = sims.topk(k, dim=1, largest=True, sorted=True)
        return best, labels.gather(1, where)
