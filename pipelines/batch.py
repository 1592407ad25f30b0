"""What every backend yields."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    views: list[torch.Tensor]   # globals first; each (N, 3, S, S), normalized, channels-last, training dtype
    labels: torch.Tensor        # (N,) int64 — ground truth, used only for monitoring/evaluation
    indices: torch.Tensor       # (N,) int64 — dataset index of each sample
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable files met
    #                             while making this batch, each replaced by a readable sample (filecheck.py)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class EncodedImages:
    """A batch's encoded files as ONE flat uint8 tensor plus offsets, the form in which DataLoader workers hand
    undecoded bytes to the main process: one shared-memory block per batch instead of one per image (a batch of
    128 separate tensors costs 128 file descriptors in flight and ~10x the main process's receiving time).
    `split()` gives the per-image tensors back as views of the flat buffer, without a copy."""

    def __init__(self, data: torch.Tensor, offsets: torch.Tensor):
        self.data, self.offsets = data, offsets

    @classmethod
    def pack(cls, items: list[torch.Tensor]) -> "EncodedImages":
        sizes = torch.tensor([0] + [int(t.numel()) for t in items], dtype=torch.long)
        return cls(torch.cat([t.reshape(-1) for t in items]) if items else torch.empty(0, dtype=torch.uint8),
                   sizes.cumsum(0))

    def split(self) -> list[torch.Tensor]:
        o = self.offsets.tolist()
        return [self.data[a:b] for a, b in zip(o[:-1], o[1:])]

    def __len__(self) -> int:
        return int(self.offsets.numel()) - 1

    def pin_memory(self) -> "EncodedImages":
        """Left pageable: the decoder parses the bytes on the host and stages them itself."""
        return self
