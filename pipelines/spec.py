"""The augmentation recipe as data: every backend compiles this one spec into its own ops.

A `MultiCropSpec` is an ordered tuple of `ViewGroup`s. Views are produced group by group, so the
output order is: all views of group 0, then group 1, ... The official TWIST recipe has three
groups: global view 1 (blur always), global view 2 (rare blur + solarize), and N local views.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewGroup:
    """One group of views that share size and augmentation probabilities."""

    count: int = 1
    size: int = 224
    scale: tuple[float, float] = (0.4, 1.0)           # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)       # aspect ratio, sampled log-uniformly
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)      # sigma in output pixels, uniform (PIL-radius semantics)
    solarize_p: float = 0.0
    is_global: bool = True

    def __post_init__(self):
        if self.count < 0 or self.size <= 0:
            raise ValueError(f"ViewGroup: count must be >= 0 and size > 0, got count={self.count} size={self.size}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"ViewGroup: scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"ViewGroup: {name} must be a probability in [0, 1], got {p}")


@dataclass(frozen=True)
class MultiCropSpec:
    groups: tuple[ViewGroup, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def num_views(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def num_global(self) -> int:
        return sum(g.count for g in self.groups if g.is_global)

    def view_sizes(self) -> list[int]:
        """Output size of every view, in output order."""
        return [g.size for g in self.groups for _ in range(g.count)]

    def view_groups(self) -> list[ViewGroup]:
        """The group of every view, in output order."""
        return [g for g in self.groups for _ in range(g.count)]

    @classmethod
    def twist(cls, global_size: int = 224, local_size: int = 96, num_local: int = 6,
              global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), jitter=(0.4, 0.4, 0.2, 0.1),
              jitter_p: float = 0.8, gray_p: float = 0.2, mean=IMAGENET_MEAN, std=IMAGENET_STD,
              global_blur_p=(1.0, 0.1), global_solarize_p=(0.0, 0.2)) -> "MultiCropSpec":
        """The official TWIST multi-crop recipe (global 1: blur 1.0; global 2: blur 0.1, solarize 0.2;
        locals: blur 0.5). `global_blur_p`/`global_solarize_p` give the two global views' probabilities
        (Self-Classifier's official recipe: blur (0.1, 1.0), solarize (0.0, 0.2))."""
        common = dict(jitter=tuple(jitter), jitter_p=jitter_p, gray_p=gray_p)
        g1 = ViewGroup(count=1, size=global_size, scale=tuple(global_scale), blur_p=global_blur_p[0],
                       solarize_p=global_solarize_p[0], **common)
        g2 = replace(g1, blur_p=global_blur_p[1], solarize_p=global_solarize_p[1])
        groups = [g1, g2]
        if num_local > 0:
            groups.append(ViewGroup(count=num_local, size=local_size, scale=tuple(local_scale), blur_p=0.5,
                                    solarize_p=0.0, is_global=False, **common))
        return cls(groups=tuple(groups), mean=tuple(mean), std=tuple(std))

    @classmethod
    def from_config(cls, aug) -> "MultiCropSpec":
        """Build from an `AugmentConfig`-like object (duck-typed: pipelines never import the engine)."""
        return cls.twist(global_size=aug.global_size, local_size=aug.local_size, num_local=aug.num_local,
                         global_scale=aug.global_scale, local_scale=aug.local_scale, jitter=aug.jitter,
                         jitter_p=aug.jitter_p, gray_p=aug.gray_p, mean=aug.mean, std=aug.std,
                         global_blur_p=aug.global_blur_p, global_solarize_p=aug.global_solarize_p)

    def with_scales(self, global_scale, local_scale) -> "MultiCropSpec":
        """Same recipe with other crop scales (the self-labeling phase uses harder crops)."""
        groups = tuple(replace(g, scale=tuple(global_scale if g.is_global else local_scale)) for g in self.groups)
        return replace(self, groups=groups)
