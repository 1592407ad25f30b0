"""Reference points for `evaluate.py --baseline`: what the protocols give without training.

- `init`: the checkpoint's architecture (backbone and head) at initialisation, built with the run's seed.
- `pixels`: the raw evaluation view (eval.resize -> eval.crop, normalised) flattened as the feature; the kNN
  protocol L2-normalises it. No head, so `cluster` does not apply; `linear` applies with --cached-features.
A trained checkpoint that does not beat both has learned nothing the pixels or the architecture did not give.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from engine.config import Config
from methods.registry import build_model

BASELINES = ("init", "pixels")


class PixelFeatures(nn.Module):
    """A stand-in for a model whose backbone returns the flattened input pixels."""

    def __init__(self, crop: int, channels: int = 3):
        super().__init__()
        self.backbone = nn.Flatten()
        self.feature_dim = channels * crop * crop


def parse_baselines(text: str | None) -> list[str]:
    """'init,pixels' -> ['init', 'pixels']; '' or None -> []. One-line ValueError for unknown names."""
    names = [b.strip() for b in (text or "").split(",") if b.strip()]
    bad = [b for b in names if b not in BASELINES]
    if bad:
        raise ValueError(f"--baseline: unknown baseline(s) {', '.join(bad)}; choose from {', '.join(BASELINES)}")
    return list(dict.fromkeys(names))


def baseline_model(name: str, cfg: Config) -> tuple[nn.Module, bool]:
    """(model, has_head) for baseline `name`."""
    if name == "init":
        torch.manual_seed(cfg.train.seed)   # the seed the run was built with
        return build_model(cfg), True
    return PixelFeatures(cfg.eval.crop), False


def applicable(name: str, protocol: str, cached_linear: bool) -> bool:
    """Which protocols a baseline takes: pixels have no head (no cluster) and no network to fine-tune (no semi;
    linear only on cached features)."""
    if name != "pixels":
        return True
    return protocol == "knn" or (protocol == "linear" and cached_linear)
