"""Self-Classifier's nearest-neighbour augmentation (the paper's v2; official `utils.NNQueue` and the train loop of
`scripts/train_800ep.sh`, `--queue-len 262144`).

Every step, the embeddings of global view 1 from all ranks (detached) are pushed into a FIFO queue, with their
dataset indices. Once the queue has been filled, view 1's embedding is replaced *before* the push by its nearest
neighbour in the queue (largest dot product of the L2-normalised embeddings; the second nearest when the nearest
is the same image, which happens early in an epoch), so the classifiers compare a neighbouring image's embedding
with the other views. The replacement is a constant: no gradient flows into view 1's embedding from the loss.

Every rank pushes the same gathered embeddings, so the queues stay identical across ranks. The queue is part of
the model's state (buffers, plus the write position and the "full" flag as extra state), so checkpoints resume it
exactly. It runs eagerly under torch.compile (its Python-side position would otherwise force recompiles).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.dist import gather_batch


class NNQueue(nn.Module):
    def __init__(self, length: int, dim: int):
        super().__init__()
        if length <= 0 or dim <= 0:
            raise ValueError(f"self_classifier.queue_len must be > 0 to build a queue, got {length}")
        self.length = length
        self.register_buffer("embeddings", torch.zeros(length, dim))
        self.register_buffer("sample_indices", torch.zeros(length, dtype=torch.long))
        self.ptr, self.full = 0, False

    def get_extra_state(self) -> dict:
        return {"ptr": self.ptr, "full": self.full}

    def set_extra_state(self, state: dict) -> None:
        self.ptr, self.full = int(state["ptr"]), bool(state["full"])

    @torch.no_grad()
    def nearest(self, x: torch.Tensor, x_indices: torch.Tensor) -> torch.Tensor:
        """The queue entry nearest to each row of `x` (N, dim), skipping an entry of the same dataset index."""
        _, top = (x.float() @ self.embeddings.T).topk(2)
        same = self.sample_indices[top[:, 0]] == x_indices
        return self.embeddings[torch.where(same, top[:, 1], top[:, 0])]

    @torch.no_grad()
    def push(self, x: torch.Tensor, x_indices: torch.Tensor) -> None:
        """Write (n, dim) embeddings at the write position, wrapping around the end (n <= queue length)."""
        n, old = x.shape[0], self.ptr
        if n > self.length:
            raise ValueError(f"self_classifier.queue_len={self.length} is shorter than the global batch {n}; "
                             f"raise it")
        first = min(n, self.length - old)
        self.embeddings[old:old + first] = x[:first].float()
        self.sample_indices[old:old + first] = x_indices[:first]
        rest = n - first
        if rest:
            self.embeddings[:rest] = x[first:].float()
            self.sample_indices[:rest] = x_indices[first:]
        self.ptr = (old + n) % self.length
        self.full = self.full or old + n >= self.length

    @torch.compiler.disable
    def swap_first_view(self, z: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`z`: embeddings of all views, view-major ((V*N, dim), view 1 first); `indices`: (N,) dataset indices.
        Returns `z` with view 1 replaced by its nearest neighbours once the queue is full; pushes view 1 (all
        ranks) into the queue either way."""
        n = indices.shape[0]
        indices = indices.to(z.device)
        first = z[:n].detach()
        if self.full:
            z = torch.cat([self.nearest(first, indices).to(z.dtype), z[n:]])
        self.push(gather_batch(first.float()), gather_batch(indices))
        return z
