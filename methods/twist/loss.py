"""The TWIST objective (arXiv 2110.07402), with the official code's semantics.

For every view pair (i, j) with i in {0, 1} (the global views) and j > i — globals against everything, no
local-local pairs — with p = softmax(logits) and q = softmax(logits / tau):

    kl = 1/2 (KL(p_i || p_j) + KL(p_j || p_i))                      consistency of the twin distributions
    eh = 1/2 (E_n[H(q_i)] + E_n[H(q_j)])                           per-sample entropy: sharp predictions
    he = 1/2 (H(E_n[q_i]) + H(E_n[q_j]))                           entropy of the batch mean: diverse classes
    total = kl + (1 + lam1) * eh - lam2 * he

averaged over the pairs. Logs use `log(x + eps)`. Under torch.distributed the batch means (E_n) are means over
the global batch: values are all-reduced, and gradients flow through the local part scaled so that, after
DDP's gradient averaging, they equal the gradient of the same formula on the global batch (the official
code's all_reduce-SUM semantics, without its world-size-dependent loss scale). All the batch means of a step
travel in one all-reduce (`models.dist.global_means`), not one per term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.dist import global_means


def global_mean(local_mean: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a per-rank batch mean (`global_means` of one tensor)."""
    return global_means([local_mean])[0]


def _local_kl(p: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """This rank's batch mean of KL(p || q)."""
    return (p * ((p + eps).log() - (q + eps).log())).sum(dim=1).mean()


def _local_entropy(q: torch.Tensor, eps: float) -> torch.Tensor:
    """This rank's batch mean of the per-sample entropy H(q)."""
    return -(q * (q + eps).log()).sum(dim=1).mean()


def _entropy(m: torch.Tensor, eps: float) -> torch.Tensor:
    return -(m * (m + eps).log()).sum()


def _kl(p: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    return global_mean(_local_kl(p, q, eps))


def _mean_entropy(q: torch.Tensor, eps: float) -> torch.Tensor:
    return global_mean(_local_entropy(q, eps))


def _entropy_of_mean(q: torch.Tensor, eps: float) -> torch.Tensor:
    return _entropy(global_mean(q.mean(dim=0)), eps)


def view_pairs(num_views: int, num_anchor: int = 2) -> list[tuple[int, int]]:
    """(i, j) pairs of the official 'sparse' interaction: each of the first `num_anchor` views against every
    later view."""
    return [(i, j) for i in range(min(num_anchor, num_views)) for j in range(i + 1, num_views)]


def twist_loss(logits: list[torch.Tensor], lam1: float = 0.0, lam2: float = 1.0, tau: float = 1.0,
               eps: float = 1e-5) -> dict[str, torch.Tensor]:
    if len(logits) < 2:
        raise ValueError(f"twist_loss needs at least 2 views, got {len(logits)}")
    logits = [x.float() for x in logits]  # the loss math stays in fp32 under autocast
    p = [F.softmax(x, dim=-1) for x in logits]
    q = p if tau == 1.0 else [F.softmax(x / tau, dim=-1) for x in logits]
    pairs = view_pairs(len(logits))
    # every batch mean the loss needs (KL both ways per pair; per view the mean entropy and the mean
    # distribution), reduced over ranks in one collective; per-view terms are shared by all pairs using the view
    directed = [(a, b) for i, j in pairs for a, b in ((i, j), (j, i))]
    v = len(q)
    g = global_means([*(_local_kl(p[a], p[b], eps) for a, b in directed), *(_local_entropy(x, eps) for x in q),
                      *(x.mean(dim=0) for x in q)])
    kl_d = dict(zip(directed, g[:len(directed)]))
    eh_v = g[len(directed):len(directed) + v]
    he_v = [_entropy(m, eps) for m in g[len(directed) + v:]]
    kl = sum(0.5 * (kl_d[i, j] + kl_d[j, i]) for i, j in pairs) / len(pairs)
    eh = sum(0.5 * (eh_v[i] + eh_v[j]) for i, j in pairs) / len(pairs)
    he = sum(0.5 * (he_v[i] + he_v[j]) for i, j in pairs) / len(pairs)
    total = kl + (1.0 + lam1) * eh - lam2 * he
    return {"kl": kl, "eh": eh, "he": he, "total": total}
