"""The TWIST network: backbone + projection head, with a multi-crop forward.

Views are grouped by resolution (consecutive views of equal size) and the backbone runs once per group, as in
DINO's MultiCropWrapper; the head runs once over all features. Output: one logits tensor per view.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.backbones import build_backbone
from models.head import ProjectionHead


def resolution_groups(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[(start, end), ...] spans of consecutive views that share a spatial size."""
    spans, start = [], 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            spans.append((start, i))
            start = i
    return spans


class TwistModel(nn.Module):
    def __init__(self, arch: str = "resnet50", head_hidden: int = 4096, head_dim: int = 4096,
                 head_bn: str = "bn"):
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(arch)
        self.head = ProjectionHead(self.feature_dim, head_hidden, head_dim, head_bn)

    @classmethod
    def from_config(cls, mcfg) -> "TwistModel":
        return cls(mcfg.arch, mcfg.head_hidden, mcfg.head_dim, mcfg.head_bn)

    def features(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Backbone features of all views, concatenated in view order: (V*N, feature_dim)."""
        feats = [self.backbone(torch.cat(views[a:b])) for a, b in resolution_groups(views)]
        return torch.cat(feats) if len(feats) > 1 else feats[0]

    def forward(self, views: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        if isinstance(views, torch.Tensor):
            views = [views]
        logits = self.head(self.features(views))
        return list(logits.chunk(len(views)))
