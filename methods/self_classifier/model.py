"""The Self-Classifier network (arXiv 2103.10994), as the official code builds it:

    backbone -> MLP (Linear-BN-LeakyReLU ... Linear) -> L2-normalised embedding -> one or several classifiers

Each classifier is a linear layer without bias under weight normalisation (weight = g * v / ||v|| per class row)
with g set to 1, so a logit is the cosine between the embedding and the class direction (scaled by g). The
official ImageNet run uses 4 classifiers of 1000, 2000, 4000 and 8000 classes over a 128-d embedding, with an
MLP of 2 linear layers (`--num-hidden 2`: Linear(2048, 4096)-BN-LeakyReLU-Linear(4096, 128)).

The model's output over V views is a list over classifiers of lists over views: out[k][v] is (N, C_k).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.multicrop import MultiCropModel
from methods.self_classifier.nn_queue import NNQueue


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation; `weight_g` starts at 1 (the official
    `nn.utils.weight_norm(nn.Linear(dim, C, bias=False))` followed by `weight_g.fill_(1)`, same parameter names).
    `fixed_norm=True` keeps g at 1 (not trained), making the layer a pure cosine classifier."""

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool = False):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default init
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fixed_norm)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def build_mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> tuple[nn.Module, int]:
    """(mlp, output dim). `layers` counts Linear layers (official --num-hidden): 0 = identity (the embedding is
    the backbone feature), 1 = one Linear, n >= 2 = (n - 1) x [Linear-BN-LeakyReLU] then Linear. Linear weights
    start from a truncated normal (std 0.02), biases from 0, as in the official code."""
    if layers < 0:
        raise ValueError(f"self_classifier.mlp_layers must be >= 0, got {layers}")
    if layers == 0:
        return nn.Identity(), in_dim
    dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        mods.append(nn.Linear(a, b))
        if i < layers - 1:
            mods += [nn.BatchNorm1d(b), nn.LeakyReLU(inplace=True)]  # official default: LeakyReLU (slope 0.01)
    for m in mods:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*mods), out_dim


class SelfClassifierHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 4096, dim: int = 128, mlp_layers: int = 2,
                 classes: tuple[int, ...] = (1000,), fixed_norm: bool = False):
        super().__init__()
        if not classes or any(c <= 0 for c in classes):
            raise ValueError(f"self_classifier.classes must be a non-empty list of positive sizes, got {classes}")
        self.mlp, emb_dim = build_mlp(in_dim, hidden, dim, mlp_layers)
        self.classifiers = nn.ModuleList(WeightNormLinear(emb_dim, c, fixed_norm) for c in classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), p=2, dim=1, eps=1e-7)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.embed(x)
        return [cls(z) for cls in self.classifiers]


class SelfClassifierModel(MultiCropModel):
    """`queue_len` > 0 adds the nearest-neighbour queue (`methods/self_classifier/nn_queue.py`): in training, given the
    batch's dataset `indices`, view 1's embedding is swapped for its nearest neighbour once the queue is full."""

    def __init__(self, arch: str = "resnet50", hidden: int = 4096, dim: int = 128, mlp_layers: int = 2,
                 classes: tuple[int, ...] = (1000, 2000, 4000, 8000), fixed_norm: bool = False,
                 queue_len: int = 0, stem: str = "imagenet", depth: int = 0):
        super().__init__(arch, stem=stem, depth=depth)
        self.head = SelfClassifierHead(self.feature_dim, hidden, dim, mlp_layers, tuple(classes), fixed_norm)
        emb_dim = dim if mlp_layers > 0 else self.feature_dim
        self.nn_queue = NNQueue(queue_len, emb_dim) if queue_len > 0 else None

    @classmethod
    def from_config(cls, cfg) -> "SelfClassifierModel":
        s = cfg.self_classifier
        return cls(cfg.model.arch, s.hidden_dim, s.dim, s.mlp_layers, s.classes, s.fixed_norm, s.queue_len,
                   cfg.model.stem, cfg.model.depth)

    def forward(self, views: list[torch.Tensor] | torch.Tensor, indices: torch.Tensor | None = None):
        if isinstance(views, torch.Tensor):
            views = [views]
        z = self.head.embed(self.features(views))
        if self.training and self.nn_queue is not None and indices is not None:
            z = self.nn_queue.swap_first_view(z, indices)
        return self.split_views([c(z) for c in self.head.classifiers], len(views))

    def split_views(self, out: list[torch.Tensor], num_views: int) -> list[list[torch.Tensor]]:
        return [list(o.chunk(num_views)) for o in out]

    @property
    def num_classifiers(self) -> int:
        return len(self.head.classifiers)

    def classifier_logits(self, feats: torch.Tensor, index: int = 0) -> torch.Tensor:
        self.check_classifier(index)
        return self.head.classifiers[index](self.head.embed(feats))
