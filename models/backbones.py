"""Backbones: torchvision ResNets (and the SwAV/TWIST widened ResNet-50 w2) with the classifier removed, and
timm ViTs with a dynamic image size (96 px local crops), their position embedding resized and their class token
drawn as in the official TWIST code (models/vit.py).

A ResNet backbone *is* a `torchvision.models.resnetXX` whose `fc` is an Identity, so its state_dict (minus
`fc.*`) loads with strict=True into the stock torchvision model — what detectron2 converters and linear-eval
scripts expect. `depth` > 0 (`model.depth`) builds a shallower network of the same family (fewer blocks per
ResNet stage, fewer ViT blocks) for rehearsals and smoke tests; its weights fit only a model of that depth.
"""
from __future__ import annotations

import torch.nn as nn
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

_RESNETS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
_RESNET_BLOCKS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3)),
                  "resnet50w2": (Bottleneck, (3, 4, 6, 3))}
# timm's vit_small_patch16_224 / vit_base_patch16_224 (their names and shapes; models/vit.py: official embeddings)
_VITS = {"vit_small": dict(embed_dim=384, num_heads=6), "vit_base": dict(embed_dim=768, num_heads=12)}
ARCHS = (*_RESNETS, "resnet50w2", *_VITS)


def resnet50_wide(widen: int = 2, layers: tuple[int, ...] = (3, 4, 6, 3)) -> ResNet:
    """ResNet-50 with every stage widened by `widen`, stem included (SwAV's and TWIST's resnet50w2: 4096-d
    features) — not torchvision's wide_resnet50_2, which widens only the bottleneck's inner convolutions.
    `layers`: blocks per stage."""
    net = ResNet(Bottleneck, list(layers))
    w = 64 * widen
    net.inplanes = w
    net.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(w)
    net.layer1 = net._make_layer(Bottleneck, w, layers[0])
    net.layer2 = net._make_layer(Bottleneck, 2 * w, layers[1], stride=2)
    net.layer3 = net._make_layer(Bottleneck, 4 * w, layers[2], stride=2)
    net.layer4 = net._make_layer(Bottleneck, 8 * w, layers[3], stride=2)
    for m in net.modules():  # torchvision's initialisation for the rebuilt layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    net.fc = nn.Linear(8 * w * Bottleneck.expansion, 1000)
    return net


STEMS = ("imagenet", "cifar")


def small_image_stem(net: ResNet) -> ResNet:
    """The CIFAR ResNet stem (He et al.; SimCLR's and solo-learn's small-image backbones): a 3x3 stride-1 `conv1`
    and no max-pool, so 28-32 px images keep 4x more resolution into layer1. Everything else, names included,
    is the torchvision model's (only `conv1.weight` changes shape)."""
    width = net.conv1.out_channels
    net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return net


def _resnet(arch: str, depth: int) -> ResNet:
    """The ResNet `arch`; `depth` > 0 keeps at most that many blocks in each stage (the first block, which changes
    width and stride, always stays)."""
    if depth == 0:   # the stock constructors, exactly as before the option existed
        return _RESNETS[arch](weights=None) if arch in _RESNETS else resnet50_wide(2)
    block, layers = _RESNET_BLOCKS[arch]
    layers = tuple(min(depth, n) for n in layers)
    return ResNet(block, list(layers)) if arch in _RESNETS else resnet50_wide(2, layers)


def build_backbone(arch: str, drop_path: float = 0.0, stem: str = "imagenet",
                   depth: int = 0) -> tuple[nn.Module, int]:
    """Return (backbone, feature_dim). The backbone maps (N,3,H,W) -> (N, feature_dim). `stem="cifar"`: ResNets
    with the small-image stem (`small_image_stem`). `depth` > 0: at most that many blocks per ResNet stage, or
    that many ViT blocks (`model.depth`); 0: the architecture's own."""
    if depth < 0:
        raise ValueError(f"model.depth must be >= 0 (0: the architecture's own), got {depth}")
    if stem not in STEMS:
        raise ValueError(f"model.stem '{stem}' is not one of {', '.join(STEMS)}")
    if stem != "imagenet" and arch not in _RESNETS and arch != "resnet50w2":
        raise ValueError(f"model.stem={stem} applies to ResNets only, not model.arch={arch}; use model.stem=imagenet")
    if arch in _RESNETS or arch == "resnet50w2":
        net = _resnet(arch, depth)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return (small_image_stem(net) if stem == "cifar" else net), dim
    if arch in _VITS:
        from models.vit import OfficialEmbedViT
        net = OfficialEmbedViT(patch_size=16, depth=depth or 12, num_classes=0, drop_path_rate=drop_path,
                               **_VITS[arch])
        return net, net.embed_dim
    raise ValueError(f"model.arch '{arch}' is not supported; choose one of {', '.join(ARCHS)}")


def backbone_state_dict(backbone: nn.Module) -> dict:
    """The backbone's weights in torchvision/timm naming, without the (absent) classifier."""
    return {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
