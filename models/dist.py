"""Everything distributed the models need, in one place (models never import the engine): the world size,
differentiable collectives for losses over the global batch, and BatchNorm over groups of ranks.

`gather_batch` concatenates a tensor from all ranks for a loss that every rank then computes on the global batch.
Gradient flows only through this rank's own slice (the other ranks' slices are constants here; their gradients
are computed on their own ranks), multiplied by the world size, so that after DDP averages parameter gradients
over ranks they equal the gradient of the same loss on the global batch in one process. No collective runs in
the backward pass. `global_means` reduces a loss's batch means over ranks in one all-reduce.

Bunch BN (the official TWIST head's last layer): the K logits are normalised over `bunch_size` samples:
`bunch_size / batch_size` consecutive ranks form a group (256 / 128 -> pairs of GPUs). `GroupBatchNorm1d`
all-reduces the batch statistics within the group with a differentiable all-reduce; it works with gloo (CPU) and
NCCL alike, and its cost is negligible for a (N, K) logits tensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


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


def bunch_groups(world: int, ranks_per_group: int) -> list[list[int]]:
    if ranks_per_group < 1 or world % ranks_per_group:
        raise ValueError(f"model.bunch_size / data.batch_size = {ranks_per_group} ranks per BN bunch must divide "
                         f"the world size {world} (the official code asserts it too); set model.bunch_size to "
                         f"data.batch_size x a divisor of {world}, or start a multiple of {ranks_per_group} "
                         f"processes")
    return [list(range(g, g + ranks_per_group)) for g in range(0, world, ranks_per_group)]


def new_bunch_group(ranks_per_group: int):
    """This rank's process group (every rank must call this: group creation is collective)."""
    world = world_size()
    groups = [dist.new_group(ranks) for ranks in bunch_groups(world, ranks_per_group)]
    return groups[dist.get_rank() // ranks_per_group]


class LocalBatchNorm1d(nn.BatchNorm1d):
    """A BatchNorm1d whose statistics are per process by design (the official `--lbn_type bn`): the SyncBN
    conversion under DDP (`engine.step.convert_sync_bn`) leaves it alone."""


class GroupBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are computed over all ranks of `group` (CPU/gloo capable)."""

    def __init__(self, num_features: int, group=None, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = False):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.group is None or dist.get_world_size(self.group) == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce
        xf = x.float()
        c = xf.shape[1]
        count = xf.new_full((1,), float(xf.shape[0]))     # a fill on the device: no host-to-device copy
        stats = torch.cat([xf.sum(0), (xf * xf).sum(0), count])
        stats = all_reduce(stats, group=self.group)       # gradients flow back through the reduction
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c:2 * c] / count - mean * mean).clamp_min(0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * count / (count - 1).clamp_min(1))
        y = (xf - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def copy_module(module: nn.Module) -> nn.Module:
    """`copy.deepcopy` of a module whose norms hold process groups (bunch BN's `group`, SyncBatchNorm's
    `process_group`): a group is a handle to the ranks, not state, so the copy shares it (deepcopy would try to
    pickle it and fail). For the momentum teacher, a copy of the student under DDP."""
    import copy
    memo = {}
    if dist.is_available():
        for m in module.modules():
            for v in vars(m).values():
                if isinstance(v, dist.ProcessGroup):
                    memo[id(v)] = v
    return copy.deepcopy(module, memo)


def sync_bn_process_group(ranks_per_group: int):
    """The SyncBatchNorm process group of this rank: groups of `ranks_per_group` consecutive ranks (apex's
    create_syncbn_process_group, which the official Self-Classifier uses); None (all ranks) for 0."""
    if ranks_per_group <= 0:
        return None
    world = world_size()
    if ranks_per_group > world or world % ranks_per_group:
        raise ValueError(f"model.sync_bn_group={ranks_per_group} ranks must divide the world size {world}; "
                         f"change model.sync_bn_group (0 = all ranks)")
    return new_bunch_group(ranks_per_group)


def bunch_batch_norm(dim: int, ranks_per_group: int) -> nn.Module:
    """The head's last norm for `model.head_bn=bunch`: BN over the batches of `ranks_per_group` consecutive ranks
    (a differentiable all-reduce of the statistics: gloo on CPU, NCCL on GPU). A bunch larger than the world, or
    one that does not divide it, stops the run, as the official assertion does, rather than normalising over
    fewer samples than asked. A single process is the exception: it normalises over its own batch, so that a
    recipe can be rehearsed on one device (README, "Several nodes")."""
    world = world_size()
    if world == 1 or ranks_per_group <= 1:
        return LocalBatchNorm1d(dim, affine=False)
    return GroupBatchNorm1d(dim, group=new_bunch_group(ranks_per_group))
