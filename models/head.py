"""TWIST projection head: Linear-BN-ReLU-Linear-BN-ReLU-Linear, ending in a BatchNorm without affine.

The last BN standardises each of the K logits over the batch; that is what keeps the class distribution from
collapsing early. Its statistics can be per process (`bn`), over all processes (`syncbn`), or skipped
(`identity`); bunch BN over groups of ranks plugs in here later.
"""
from __future__ import annotations

import torch.nn as nn


def last_norm(kind: str, dim: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm1d(dim, affine=False)
    if kind == "syncbn":
        return nn.SyncBatchNorm(dim, affine=False)
    if kind == "identity":
        return nn.Identity()
    raise ValueError(f"model.head_bn '{kind}' is not one of bn, syncbn, identity")


class ProjectionHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 4096, out_dim: int = 4096, norm: str = "bn"):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        )
        self.last_linear = nn.Linear(hidden, out_dim)
        self.norm = last_norm(norm, out_dim)

    def forward(self, x):
        return self.norm(self.last_linear(self.mlp(x)))
