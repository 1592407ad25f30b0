"""The TWIST network: backbone + projection head, with the shared multi-crop forward (`models/multicrop.py`).
Output: one logits tensor per view."""
from __future__ import annotations

from methods.twist.head import ProjectionHead
from models.multicrop import MultiCropModel, resolution_groups

__all__ = ["TwistModel", "resolution_groups"]


class TwistModel(MultiCropModel):
    def __init__(self, arch: str = "resnet50", head_hidden: int = 4096, head_dim: int = 4096,
                 head_bn: str = "bn", head_act: str = "relu", ranks_per_group: int = 1, drop_path: float = 0.0,
                 head_trunc_init: bool = False, stem: str = "imagenet", depth: int = 0):
        super().__init__(arch, drop_path, stem, depth)
        trunc = head_trunc_init or arch.startswith("vit")   # official: args.backbone.startswith('vit') or ...
        self.head = ProjectionHead(self.feature_dim, head_hidden, head_dim, head_bn, head_act, ranks_per_group,
                                   trunc)

    @classmethod
    def from_config(cls, mcfg, batch_size: int = 0) -> "TwistModel":
        """`batch_size` (per process) sets the bunch-BN group: model.bunch_size / batch_size ranks."""
        ranks = mcfg.bunch_size // batch_size if batch_size else 1
        return cls(mcfg.arch, mcfg.head_hidden, mcfg.head_dim, mcfg.head_bn, mcfg.head_act, ranks, mcfg.drop_path,
                   mcfg.head_trunc_init, mcfg.stem, mcfg.depth)
