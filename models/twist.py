"""The TWIST network: backbone + projection head, with the shared multi-crop forward (`models/multicrop.py`).
Output: one logits tensor per view."""
from __future__ import annotations

from models.head import ProjectionHead
from models.multicrop import MultiCropModel, resolution_groups

__all__ = ["TwistModel", "resolution_groups"]


class TwistModel(MultiCropModel):
    def __init__(self, arch: str = "resnet50", head_hidden: int = 4096, head_dim: int = 4096,
                 head_bn: str = "bn"):
        super().__init__(arch)
        self.head = ProjectionHead(self.feature_dim, head_hidden, head_dim, head_bn)

    @classmethod
    def from_config(cls, mcfg) -> "TwistModel":
        return cls(mcfg.arch, mcfg.head_hidden, mcfg.head_dim, mcfg.head_bn)
