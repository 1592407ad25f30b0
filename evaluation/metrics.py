"""Evaluation metrics: top-k accuracy, weighted kNN (InstDisc/DINO style) and clustering scores.

All functions are pure: torch tensors (any device) in, python floats / dicts out
(kNN predictions are returned as long tensors on the features' device).
Clustering metrics use numpy/scipy only and follow scikit-learn's definitions.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln


# ------------------------------------------------------------------------- top-k
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """{'top{k}': % of samples whose label is among the k highest scores} (percent, 0..100).

    k is clamped to the number of classes (top-5 of a 3-class problem is top-3 = 100%). Ties between equal
    scores go to the lower class id, as in `torch.topk` on CPU.
    """
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"topk_accuracy: expected logits (N, C) and labels (N,), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    n, c = logits.shape
    labels = labels.to(logits.device, torch.long)
    kmax = min(max(int(k) for k in ks), c)
    top = logits.topk(kmax, dim=1).indices if n else logits.new_zeros((0, kmax), dtype=torch.long)
    hit = top == labels[:, None]
    return {f"top{k}": 100.0 * float(hit[:, :min(int(k), c)].any(dim=1).sum()) / max(n, 1) for k in ks}


# ----------------------------------------------------------------------------- kNN
KNN_SIM_BUDGET = 1 << 27  # similarities held at once (512 MiB in fp32): bounds memory for ImageNet-size banks


def knn_chunk_size(n_train: int, budget: int = KNN_SIM_BUDGET) -> int:
    """Queries per chunk so that chunk x n_train similarities stay within `budget` elements."""
    return max(1, min(budget // max(n_train, 1), 65536))


def _knn_class_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                      ks: Sequence[int], temperature: float, num_classes: int,
                      chunk_size: int, shards=None) -> Iterator[Tuple[slice, Dict[int, torch.Tensor]]]:
    """Yield (test slice, {k: class scores (B, C) float32}) chunk by chunk. `shards` (optional, e.g.
    `evaluation.knn_shards.KnnShards`): the bank is this rank's part of one bank split across ranks; `shards.total`
    gives the whole bank's size and `shards.merge` turns each rank's nearest neighbours into the whole bank's."""
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError("features must be 2-D (N, D)")
    n_train = train_feats.shape[0]
    n_bank = shards.total(n_train) if shards is not None else n_train
    if n_bank == 0:
        raise ValueError("empty kNN bank")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"k must be >= 1, got {tuple(ks)}")
    device = train_feats.device
    bank = F.normalize(train_feats, dim=1)
    labels = train_labels.to(device=device, dtype=torch.long).view(-1)
    kmax = min(max(int(k) for k in ks), n_bank)
    for start in range(0, test_feats.shape[0], chunk_size):
        sl = slice(start, min(start + chunk_size, test_feats.shape[0]))
        q = F.normalize(test_feats[sl].to(device=device, dtype=bank.dtype), dim=1)
        sims = (q @ bank.t()).float()                                  # (B, N_train)
        top_sim, top_idx = sims.topk(min(kmax, n_train), dim=1, largest=True, sorted=True)
        nb_labels = labels[top_idx]                                     # (B, kmax)
        if shards is not None:
            top_sim, nb_labels = shards.merge(top_sim, nb_labels, kmax)
        weights = (top_sim / temperature).exp()                         # (B, kmax)
        out = {}
        for k in ks:
            kk = min(int(k), n_bank)
            scores = torch.zeros(q.shape[0], num_classes, device=device, dtype=torch.float32)
            scores.scatter_add_(1, nb_labels[:, :kk], weights[:, :kk])
            out[int(k)] = scores
        yield sl, out


def knn_classify(train_feats, train_labels, test_feats, ks=(20, 200), temperature=0.07,
                 num_classes=None, chunk_size=None) -> Dict[int, torch.Tensor]:
    """Weighted kNN (cosine similarity, weight exp(sim/T), per-class weight sums, argmax).

    Features are L2-normalised internally; test samples are processed in chunks of
    ``chunk_size`` (default: `knn_chunk_size`) so at most chunk x N_train similarities live
    at once; k > bank size is clamped. Ties in class score go to the lowest class id.
    Returns {k: predicted labels (N_test,) long tensor on the features' device}.
    """
    if num_classes is None:
        num_classes = int(train_labels.max().item()) + 1
    n_test = test_feats.shape[0]
    chunk_size = chunk_size or knn_chunk_size(train_feats.shape[0])
    preds = {int(k): torch.empty(n_test, dtype=torch.long, device=train_feats.device) for k in ks}
    for sl, scores in _knn_class_scores(train_feats, train_labels, test_feats, ks, temperature,
                                        num_classes, chunk_size):
        for k, s in scores.items():
            preds[k][sl] = s.argmax(dim=1)
    return preds


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, ks=(20, 200), temperature=0.07,
                 chunk_size=None, shards=None) -> Dict[str, float]:
    """{'knn_top1_k{k}': %, 'knn_top5_k{k}': %} for each k (percent, 0..100).

    Top-5 uses the class scores; with fewer than 5 classes it is top-num_classes (= 100%). `shards`: the bank
    is split across ranks (every rank passes its part and the same test set; see `_knn_class_scores`); the
    result is the whole bank's, on every rank.
    """
    device = train_feats.device
    test_labels = test_labels.to(device=device, dtype=torch.long).view(-1)
    top_label = int(max(train_labels.max().item() if train_labels.numel() else 0, test_labels.max().item()))
    num_classes = (shards.max(top_label) if shards is not None else top_label) + 1
    top5 = min(5, num_classes)
    chunk_size = chunk_size or knn_chunk_size(train_feats.shape[0])
    if shards is not None:   # every rank must walk the same chunks: the smallest rank's choice
        chunk_size = shards.min(chunk_size)
    c1 = {int(k): 0 for k in ks}
    c5 = {int(k): 0 for k in ks}
    for sl, scores in _knn_class_scores(train_feats, train_labels, test_feats, ks, temperature,
                                        num_classes, chunk_size, shards):
        y = test_labels[sl]
        for k, s in scores.items():
            c1[k] += int((s.argmax(dim=1) == y).sum().item())
            c5[k] += int((s.topk(top5, dim=1).indices == y[:, None]).any(dim=1).sum().item())
    n = max(test_labels.numel(), 1)
    out = {}
    for k in c1:
        out[f"knn_top1_k{k}"] = 100.0 * c1[k] / n
        out[f"knn_top5_k{k}"] = 100.0 * c5[k] / n
    return out


# ----------------------------------------------------------------------- clustering
def _to_numpy_labels(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).reshape(-1)


def _contingency(target, pred) -> np.ndarray:
    """Contingency matrix (n_classes, n_clusters) over the *present* label values."""
    t = _to_numpy_labels(target)
    p = _to_numpy_labels(pred)
    if t.shape != p.shape:
        raise ValueError(f"pred and target differ in length: {p.shape} vs {t.shape}")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    c = np.zeros((ti.max() + 1 if ti.size else 0, pi.max() + 1 if pi.size else 0), dtype=np.int64)
    np.add.at(c, (ti, pi), 1)
    return c


def hungarian_accuracy(pred, target, surplus: str = "wrong") -> float:
    """Fraction in [0, 1] correct under the best one-to-one cluster -> label mapping.

    Works for #clusters != #classes (rectangular assignment). With more clusters than classes, the clusters left
    unmatched count as wrong (`surplus="wrong"`: TWIST's hungarian_evaluate, after SCAN) or each is mapped to its
    most frequent label (`surplus="best"`: Self-Classifier's cls_eval.py compute_metrics).
    """
    if surplus not in ("wrong", "best"):
        raise ValueError(f"surplus must be 'wrong' or 'best', got {surplus!r}")
    c = _contingency(target, pred)
    if c.size == 0:
        return 0.0
    rows, cols = linear_sum_assignment(c, maximize=True)
    correct = float(c[rows, cols].sum())
    if surplus == "best" and c.shape[1] > c.shape[0]:
        unmatched = np.setdiff1d(np.arange(c.shape[1]), cols)
        correct += float(c[:, unmatched].max(axis=0).sum())
    return correct / float(c.sum())


def _entropy(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    if counts.size <= 1:
        return 0.0
    n = counts.sum()
    return float(-np.sum((counts / n) * (np.log(counts) - math.log(n))))


def _mutual_info(c: np.ndarray) -> float:
    a, b = c.sum(axis=1), c.sum(axis=0)
    if a.size == 1 or b.size == 1:
        return 0.0
    n = float(c.sum())
    i, j = np.nonzero(c)
    nij = c[i, j].astype(np.float64)
    outer = a[i].astype(np.float64) * b[j].astype(np.float64)
    mi = (nij / n) * (np.log(nij) - math.log(n)) + (nij / n) * (2.0 * math.log(n) - np.log(outer))
    mi = np.where(np.abs(mi) < np.finfo(np.float64).eps, 0.0, mi)
    return float(max(mi.sum(), 0.0))


def _expected_mutual_info(c: np.ndarray) -> float:
    """E[MI] under the hypergeometric permutation model (sklearn's expected_mutual_information)."""
    a = c.sum(axis=1).astype(np.int64)
    b = c.sum(axis=0).astype(np.int64)
    if a.size == 1 or b.size == 1:
        return 0.0
    n = int(c.sum())
    gln_a, gln_b = gammaln(a + 1), gammaln(b + 1)
    gln_na, gln_nb = gammaln(n - a + 1), gammaln(n - b + 1)
    gln_n = gammaln(n + 1)
    emi = 0.0
    for i in range(a.size):                       # vectorise over (j, nij) for each row
        start = np.maximum(a[i] + b - n, 1)
        end = np.minimum(a[i], b) + 1              # exclusive
        lens = np.maximum(end - start, 0)
        if lens.sum() == 0:
            continue
        j = np.repeat(np.arange(b.size), lens)
        offs = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        nij = (start[j] + offs).astype(np.float64)
        term2 = math.log(n) + np.log(nij) - math.log(a[i]) - np.log(b[j])
        gln = (gln_a[i] + gln_b[j] + gln_na[i] + gln_nb[j] - gammaln(nij + 1) - gln_n
               - gammaln(a[i] - nij + 1) - gammaln(b[j] - nij + 1) - gammaln(n - a[i] - b[j] + nij + 1))
        emi += float(np.sum((nij / n) * term2 * np.exp(gln)))
    return emi


def _ari(c: np.ndarray) -> float:
    n = int(c.sum())
    a = [int(v) for v in c.sum(axis=1)]    # python ints: no int64 overflow for large n
    b = [int(v) for v in c.sum(axis=0)]
    sum_sq = sum(int(v) * int(v) for v in c[c > 0])
    tp = sum_sq - n
    fn = sum(x * x for x in a) - sum_sq    # same class, different cluster (ordered pairs)
    fp = sum(x * x for x in b) - sum_sq    # same cluster, different class
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def cluster_metrics(pred, target, surplus: str = "wrong") -> Dict[str, float]:
    """{'nmi','ami','ari','acc','clusters_used'} following sklearn (arithmetic normalisation); `surplus`: how ACC
    scores clusters beyond the number of classes (`hungarian_accuracy`)."""
    c = _contingency(target, pred)
    n_classes, n_clusters = c.shape
    acc = hungarian_accuracy(pred, target, surplus)
    if n_classes == n_clusters == 1 or n_classes == n_clusters == 0:
        return {"nmi": 1.0, "ami": 1.0, "ari": 1.0, "acc": acc, "clusters_used": float(n_clusters)}
    mi = _mutual_info(c)
    h_true, h_pred = _entropy(c.sum(axis=1)), _entropy(c.sum(axis=0))
    norm = 0.5 * (h_true + h_pred)
    nmi = 0.0 if mi == 0 else mi / norm
    emi = _expected_mutual_info(c)
    den = norm - emi
    eps = np.finfo(np.float64).eps
    den = min(den, -eps) if den < 0 else max(den, eps)
    ami = (mi - emi) / den
    return {"nmi": float(nmi), "ami": float(ami), "ari": float(_ari(c)), "acc": acc,
            "clusters_used": float(n_clusters)}
