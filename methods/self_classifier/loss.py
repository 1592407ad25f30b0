"""The Self-Classifier objective (arXiv 2103.10994), with the official code's semantics.

For each classifier, with logits x_v of view v over the (global) batch, N samples and C classes:

    target_v = row_L1_normalise( softmax_over_batch(x_v / col_tau) )               (N, C), rows sum to 1
    logp_v   = log( N/C * column_L1_normalise( softmax_over_classes(x_v / row_tau) ) + eps )
    CE(i, j) = - mean_n sum_c target_i[n, c] * logp_j[n, c]

The loss is the mean of CE(i, j) over all ordered pairs i != j except local-local pairs (views 0 and 1 are the
global views) and over classifiers. The normalisations assert the uniform class prior: when every sample gets
the same class scores, both target and prediction become uniform (1/C) and the loss is log C; confident
predictions spread evenly over the classes score near 0. L1 normalisations divide by max(norm, eps)
(`F.normalize`).

Under torch.distributed the logits of all ranks are gathered first (`models.dist.gather_batch`, gradient
through the local part), so the batch softmax and column normalisation run over the global batch and every rank
computes the same loss value: the single-process loss on the concatenated batch. (The official code gathers with
an all-reduce in the backward pass and keeps only local rows in the cross-entropy; the value averaged over ranks
and the gradient are the same.)

Computation: CE is linear in the target, so for each prediction view j the targets it is compared with are summed
first: 2 products per view instead of one per pair (26 -> 8 for 2 + 6 views).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.dist import gather_batch, world_size

NUM_GLOBAL = 2


def num_terms(num_views: int, num_global: int = NUM_GLOBAL) -> int:
    """Ordered pairs (i, j), i != j, not both local."""
    g = min(num_global, num_views)
    local = num_views - g
    return num_views * (num_views - 1) - local * (local - 1)


def _classifier_loss(views: list[torch.Tensor], row_tau: float, col_tau: float, eps: float) -> torch.Tensor:
    n, c = views[0].shape
    targets = [F.normalize(F.softmax(x / col_tau, dim=0), p=1, dim=1, eps=eps) for x in views]
    g = min(NUM_GLOBAL, len(views))
    all_targets = torch.stack(targets).sum(0)
    global_targets = torch.stack(targets[:g]).sum(0)
    total = views[0].new_zeros(())
    for j, x in enumerate(views):
        pred = F.normalize(F.softmax(x / row_tau, dim=1), p=1, dim=0, eps=eps)
        logp = torch.log(pred * (n / c) + eps)
        paired = all_targets - targets[j] if j < g else global_targets  # sum of the targets CE'd with view j
        total = total - (paired * logp).sum() / n
    return total / num_terms(len(views))


def self_classifier_loss(outputs: list[list[torch.Tensor]], row_tau: float = 0.1, col_tau: float = 0.05,
                         eps: float = 1e-12) -> dict[str, torch.Tensor]:
    """`outputs[k][v]`: logits (n, C_k) of classifier k for view v on this rank. Returns {'total', 'ce0', ...}:
    the mean over classifiers and its per-classifier terms."""
    if not outputs or len(outputs[0]) < 2:
        raise ValueError("self_classifier_loss needs at least one classifier and 2 views")
    num_views = len(outputs[0])
    # math in at least fp32 (bf16/fp16 under autocast are upcast); one all_gather for every classifier and view
    flat = [x if x.dtype == torch.float64 else x.float() for cls in outputs for x in cls]
    if world_size() > 1:
        flat = torch.split(gather_batch(torch.cat(flat, dim=1)), [x.shape[1] for x in flat], dim=1)
    per_cls = [_classifier_loss(list(flat[k * num_views:(k + 1) * num_views]), row_tau, col_tau, eps)
               for k in range(len(outputs))]
    out = {f"ce{k}": v for k, v in enumerate(per_cls)}
    out["total"] = torch.stack(per_cls).mean()
    return out
