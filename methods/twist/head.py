"""TWIST projection head: Linear-BN-act-Linear-BN-act-Linear, ending in a BatchNorm without affine.

The last BN standardises each of the K logits over the batch; that is what keeps the class distribution from
collapsing early. Its statistics are over bunches of consecutive ranks (`bunch`, the official default
`--lbn_type bn`: a SyncBatchNorm over `--bunch-size` 256 samples), per process (`bn`), over all ranks (`syncbn`, the
official `--lbn_type syncbn`), or skipped (`identity`). With a ViT backbone (or
`model.head_trunc_init`) the Linear weights start from trunc_normal(std 0.02) and the biases from 0, as officially.
"""
from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn

from models.dist import GroupBatchNorm1d, LocalBatchNorm1d, bunch_batch_norm


def last_norm(kind: str, dim: int, ranks_per_group: int = 1) -> nn.Module:
    if kind == "bn":                 # per process, also under DDP with model.sync_bn (no official counterpart:
                                     # the official lbn_type bn is model.head_bn=bunch)
        return LocalBatchNorm1d(dim, affine=False)
    if kind == "bunch":
        return bunch_batch_norm(dim, ranks_per_group)
    if kind == "syncbn":
        world = dist.is_available() and dist.is_initialized()
        return GroupBatchNorm1d(dim, group=dist.group.WORLD) if world else LocalBatchNorm1d(dim, affine=False)
    if kind == "identity":
        return nn.Identity()
    raise ValueError(f"model.head_bn '{kind}' is not one of bn, bunch, syncbn, identity")


class ProjectionHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 4096, out_dim: int = 4096, norm: str = "bn", act: str = "relu",
                 ranks_per_group: int = 1, trunc_init: bool = False):
        super().__init__()
        act_layer = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}[act]
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), act_layer(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), act_layer(),
        )
        self.last_linear = nn.Linear(hidden, out_dim)
        self.norm = last_norm(norm, out_dim, ranks_per_group)
        if trunc_init:  # official ViT initialisation (train.py _vit_init_weights), after nn.Linear's own
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.norm(self.last_linear(self.mlp(x)))
