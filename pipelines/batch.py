"""What every backend yields."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    views: list[torch.Tensor]   # globals first; each (N, 3, S, S), normalized, channels-last, training dtype
    labels: torch.Tensor        # (N,) int64 — ground truth, used only for monitoring/evaluation
    indices: torch.Tensor       # (N,) int64 — dataset index of each sample

    def __len__(self) -> int:
        return int(self.labels.shape[0])
