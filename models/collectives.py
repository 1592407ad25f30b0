"""Differentiable collectives for losses that need the whole global batch (models never import the engine).

`gather_batch` concatenates a tensor from all ranks for a loss that every rank then computes on the global batch.
Gradient flows only through this rank's own slice (the other ranks' slices are constants here; their gradients
are computed on their own ranks), multiplied by the world size, so that after DDP averages parameter gradients
over ranks they equal the gradient of the same loss on the global batch in one process. No collective runs in
the backward pass.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.world, ctx.rank, ctx.n = dist.get_world_size(), dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n] * ctx.world


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (world * n, ...) in rank order; identity in a single process. Every rank must
    pass the same shape."""
    if world_size() == 1:
        return x
    return _GatherBatch.apply(x)


def global_means(local_means: list[torch.Tensor]) -> list[torch.Tensor]:
    """Means over ranks of per-rank batch means, all in ONE all-reduce (a loss's few dozen scalars and vectors
    would otherwise cost a collective each). Value of each: the global mean. Gradient: identity w.r.t. the local
    mean (each rank's DDP gradient is then averaged, which yields the global-batch gradient). Element for
    element the same sums as one all-reduce per tensor; identity in a single process."""
    world = world_size()
    if world == 1 or not local_means:
        return list(local_means)
    flat = torch.cat([t.detach().reshape(-1).to(local_means[0].dtype) for t in local_means])
    dist.all_reduce(flat)
    out = []
    for t, total in zip(local_means, flat.split([t.numel() for t in local_means])):
        out.append(t + (total.view_as(t).to(t.dtype) / world - t.detach()))
    return out
