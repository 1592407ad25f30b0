"""TWIST's two late-recipe objectives (official code semantics).

- `twist_teacher_loss`: with a momentum encoder (the ViT recipes), the teacher sees the two global views and
  KL(teacher_i || student_j) is averaged over all j != i; the entropy terms are averaged over every student view.
- `self_label_loss`: after `mme_epochs`, the more confident global view (the "weak anchor", from the teacher when
  there is one) labels the other global view and every local view; cross-entropy only on samples whose anchor
  confidence exceeds the batch's `quantile` of max-probabilities; summed over views and divided by (views - 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.dist import global_means
from methods.twist.loss import _entropy, _entropy_of_mean, _local_entropy, _local_kl, _mean_entropy


def twist_teacher_loss(teacher: list[torch.Tensor], student: list[torch.Tensor], lam1: float = 0.0,
                       lam2: float = 1.0, tau: float = 1.0, eps: float = 1e-5) -> dict[str, torch.Tensor]:
    tp = [F.softmax(t.detach().float() / tau, dim=-1) for t in teacher]
    sp = [F.softmax(s.float() / tau, dim=-1) for s in student]
    pairs = [(i, j) for i in range(len(tp)) for j in range(len(sp)) if i != j]
    g = global_means([*(_local_kl(tp[i], sp[j], eps) for i, j in pairs), *(_local_entropy(p, eps) for p in sp),
                      *(p.mean(dim=0) for p in sp)])          # one all-reduce for every batch mean
    n, v = len(pairs), len(sp)
    kl = sum(g[:n]) / n
    eh = sum(g[n:n + v]) / v
    he = sum(_entropy(m, eps) for m in g[n + v:]) / v
    return {"kl": kl, "eh": eh, "he": he, "total": kl + (1.0 + lam1) * eh - lam2 * he}


def confidence_threshold(max_probs: torch.Tensor, quantile: float) -> torch.Tensor:
    """The max-probability ranked at `quantile` from the top of the batch (official: sort descending, take
    index int(quantile * B)); 0 when quantile is 0 (every sample is above it)."""
    if quantile == 0:
        return max_probs.new_zeros(())
    ranked = max_probs.sort(descending=True).values
    return ranked[min(int(quantile * ranked.numel()), ranked.numel() - 1)]


def _masked_ce(weak: torch.Tensor, strong: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    max_prob, target = F.softmax(weak.float(), dim=1).max(dim=1)
    mask = (max_prob > threshold).float()
    ce = F.cross_entropy(strong.float(), target, reduction="none")
    return (ce * mask).sum() / mask.sum().clamp_min(1.0)   # mean over confident samples; 0 if none


def self_label_loss(logits: list[torch.Tensor], quantile: float, tau: float = 1.0, eps: float = 1e-5,
                    anchors: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    probs = [F.softmax(x.float() / tau, dim=-1) for x in logits]
    anchors = [a.detach() for a in (anchors if anchors is not None else logits[:2])]
    aprob = [F.softmax(a.float() / tau, dim=-1).max(dim=1).values for a in anchors[:2]]
    threshold = confidence_threshold(torch.maximum(aprob[0], aprob[1]).detach(), quantile)
    first = (aprob[0] > aprob[1]).unsqueeze(1)
    weak = torch.where(first, anchors[0], anchors[1])
    strong = torch.where(first, logits[1], logits[0])
    total = _masked_ce(weak, strong, threshold)
    for x in logits[2:]:
        total = total + _masked_ce(weak, x, threshold)
    total = total / (len(logits) - 1)
    with torch.no_grad():
        eh = 0.5 * (_mean_entropy(probs[0], eps) + _mean_entropy(probs[1], eps))
        he = 0.5 * (_entropy_of_mean(probs[0], eps) + _entropy_of_mean(probs[1], eps))
    return {"ce": total.detach(), "eh": eh, "he": he, "threshold": threshold, "total": total}
