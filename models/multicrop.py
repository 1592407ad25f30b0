"""The multi-crop forward shared by every method: backbone once per resolution group, head once over all views.

Views are grouped by resolution (consecutive views of equal size) and the backbone runs once per group, as in
DINO's MultiCropWrapper; the head then runs once over the features of all views. A method's model subclasses
`MultiCropModel`, sets `self.head`, and says how the head's output splits back into views (`split_views`) and
which outputs the `cluster` evaluation reads (`classifier_logits`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.backbones import build_backbone


def resolution_groups(views: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[(start, end), ...] spans of consecutive views that share a spatial size."""
    spans, start = [], 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[-2:] != views[start].shape[-2:]:
            spans.append((start, i))
            start = i
    return spans


class MultiCropModel(nn.Module):
    head: nn.Module

    def __init__(self, arch: str, drop_path: float = 0.0, stem: str = "imagenet", depth: int = 0):
        super().__init__()
        self.backbone, self.feature_dim = build_backbone(arch, drop_path, stem, depth)

    def features(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Backbone features of all views, concatenated in view order: (V*N, feature_dim)."""
        feats = [self.backbone(torch.cat(views[a:b])) for a, b in resolution_groups(views)]
        return torch.cat(feats) if len(feats) > 1 else feats[0]

    def forward(self, views: list[torch.Tensor] | torch.Tensor, indices: torch.Tensor | None = None):
        """`indices`: the batch's dataset indices, for methods whose forward uses them (Self-Classifier's
        nearest-neighbour queue); ignored here."""
        if isinstance(views, torch.Tensor):
            views = [views]
        return self.split_views(self.head(self.features(views)), len(views))

    def split_views(self, out, num_views: int):
        """Head output over all views -> one tensor per view (in view order)."""
        return list(out.chunk(num_views))

    @property
    def num_classifiers(self) -> int:
        return 1

    def check_classifier(self, index: int) -> None:
        if not 0 <= index < self.num_classifiers:
            raise ValueError(f"classifier {index} is out of range; this model has {self.num_classifiers} "
                             f"classifier(s), 0..{self.num_classifiers - 1}")

    def classifier_logits(self, feats: torch.Tensor, index: int = 0) -> torch.Tensor:
        """Class scores of classifier `index` for backbone features (what `evaluate.py cluster` argmaxes)."""
        self.check_classifier(index)
        return self.head(feats)
