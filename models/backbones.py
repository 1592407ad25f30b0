"""Backbones: torchvision ResNets with the classifier removed.

The backbone *is* a `torchvision.models.resnetXX` whose `fc` is an Identity, so its state_dict (minus `fc.*`)
loads with strict=True into the stock torchvision model — what detectron2 converters and linear-eval scripts
expect.
"""
from __future__ import annotations

import torch.nn as nn
import torchvision

_RESNETS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}


def build_backbone(arch: str) -> tuple[nn.Module, int]:
    """Return (backbone, feature_dim). The backbone maps (N,3,H,W) -> (N, feature_dim) for any H, W >= 32."""
    if arch not in _RESNETS:
        raise ValueError(f"model.arch '{arch}' is not supported; choose one of {', '.join(_RESNETS)}")
    net = _RESNETS[arch](weights=None)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def backbone_state_dict(backbone: nn.Module) -> dict:
    """The backbone's weights in torchvision naming, without the (absent) classifier."""
    return {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
