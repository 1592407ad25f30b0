import itertools
import math

import numpy as np
import pytest
import torch

from evaluation.metrics import (KNN_SIM_BUDGET, cluster_metrics, hungarian_accuracy, knn_accuracy, knn_chunk_size,
                            knn_classify, topk_accuracy)

try:
    import sklearn.metrics as skm
except ImportError:  # pragma: no cover
    skm = None


# ------------------------------------------------------------------ reference kNN
def _ref_knn_scores(train, train_y, test, k, T, C):
    """Brute-force python weighted kNN: list of per-test class score lists."""
    tr = [[float(v) for v in row] for row in train]
    te = [[float(v) for v in row] for row in test]
    norm = lambda r: [v / math.sqrt(sum(x * x for x in r)) for v in r]
    tr, te = [norm(r) for r in tr], [norm(r) for r in te]
    out = []
    for q in te:
        sims = sorted(((sum(a * b for a, b in zip(q, r)), i) for i, r in enumerate(tr)), reverse=True)
        scores = [0.0] * C
        for s, i in sims[:min(k, len(tr))]:
            scores[int(train_y[i])] += math.exp(s / T)
        out.append(scores)
    return out


def _angle(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_knn_weighted_vote_differs_from_majority():
    # query at 0 deg; one class-1 point at 0 deg (sim 1), two class-0 points at +-60 deg (sim 0.5)
    train = torch.tensor([_angle(0), _angle(60), _angle(-60), _angle(180)])
    train_y = torch.tensor([1, 0, 0, 2])
    test = torch.tensor([_angle(0)]) * 3.0           # scale must not matter (L2-normalised)
    # T small: exp(1/.07) >> 2 exp(.5/.07) -> class 1 wins against majority
    assert knn_classify(train, train_y, test, ks=(3,), temperature=0.07)[3].tolist() == [1]
    # T large: weights ~ uniform -> majority class 0
    assert knn_classify(train, train_y, test, ks=(3,), temperature=10.0)[3].tolist() == [0]
    # k=1 is nearest neighbour
    assert knn_classify(train, train_y, test, ks=(1,))[1].tolist() == [1]
    # crossover: exp(1/T) = 2 exp(0.5/T)  <=>  T = 0.5 / ln 2
    T0 = 0.5 / math.log(2)
    assert knn_classify(train, train_y, test, ks=(3,), temperature=T0 * 0.9)[3].tolist() == [1]
    assert knn_classify(train, train_y, test, ks=(3,), temperature=T0 * 1.1)[3].tolist() == [0]


@pytest.mark.parametrize("chunk_size", [3, 7, 1024])
def test_knn_matches_bruteforce(chunk_size):
    g = torch.Generator().manual_seed(0)
    C, ntr, nte = 6, 40, 17
    train = torch.randn(ntr, 8, generator=g, dtype=torch.float64)
    train_y = torch.randint(0, C, (ntr,), generator=g)
    test = torch.randn(nte, 8, generator=g, dtype=torch.float64)
    ks = (1, 5, 20, 100)                                      # 100 > bank size: clamped
    T = 0.1
    preds = knn_classify(train, train_y, test, ks=ks, temperature=T, num_classes=C, chunk_size=chunk_size)
    assert set(preds) == set(ks)
    for k in ks:
        ref = _ref_knn_scores(train, train_y, test, k, T, C)
        exp = [max(range(C), key=lambda c: (s[c], -c)) for s in ref]
        assert preds[k].dtype == torch.long and preds[k].shape == (nte,)
        assert preds[k].tolist() == exp, k
    # clamped k equals k = bank size
    assert torch.equal(preds[100], knn_classify(train, train_y, test, ks=(ntr,), temperature=T,
                                                num_classes=C)[ntr])


def test_knn_accuracy_top1_top5_against_reference():
    g = torch.Generator().manual_seed(1)
    C, ntr, nte = 10, 60, 25
    train = torch.randn(ntr, 5, generator=g)
    train_y = torch.randint(0, C, (ntr,), generator=g)
    test = torch.randn(nte, 5, generator=g)
    test_y = torch.randint(0, C, (nte,), generator=g)
    ks, T = (3, 10, 500), 0.2
    acc = knn_accuracy(train, train_y, test, test_y, ks=ks, temperature=T, chunk_size=4)
    assert set(acc) == {f"knn_top{t}_k{k}" for t in (1, 5) for k in ks}
    for k in ks:
        ref = _ref_knn_scores(train, train_y, test, k, T, C)
        top1 = top5_sure = top5_tied = 0
        for s, y in zip(ref, test_y.tolist()):
            order = sorted(range(C), key=lambda c: (-s[c], c))
            top1 += order[0] == y
            if s[y] > 0:
                top5_sure += y in order[:5]
            elif sum(v > 0 for v in s) < 5:   # label tied at score 0 on the top-5 border: order unspecified
                top5_tied += 1
        assert acc[f"knn_top1_k{k}"] == pytest.approx(100.0 * top1 / nte)
        assert 100.0 * top5_sure / nte - 1e-9 <= acc[f"knn_top5_k{k}"] <= 100.0 * (top5_sure + top5_tied) / nte + 1e-9
        if k >= ntr:                           # all neighbours vote: every class scored, no ambiguity
            assert top5_tied == 0
        assert acc[f"knn_top5_k{k}"] >= acc[f"knn_top1_k{k}"]


def test_knn_top5_handbuilt():
    # 7 classes at distinct angles; query nearest to class 0, class ranking by angle distance
    angles = [0, 10, 20, 30, 40, 50, 60]
    train = torch.tensor([_angle(a) for a in angles])
    train_y = torch.arange(7)
    test = torch.tensor([_angle(-1)] * 7)
    test_y = torch.arange(7)               # true labels 0..6; scores decrease with label
    acc = knn_accuracy(train, train_y, test, test_y, ks=(7,), temperature=0.5)
    assert acc["knn_top1_k7"] == pytest.approx(100.0 / 7)
    assert acc["knn_top5_k7"] == pytest.approx(500.0 / 7)
    # only neighbours count: with k=2 classes 0,1 have scores, top-5 still contains labels 0..4 (ties -> low ids)
    acc2 = knn_accuracy(train, train_y, test[:2], test_y[:2], ks=(2,), temperature=0.5)
    assert acc2["knn_top5_k2"] == pytest.approx(100.0)


def test_knn_top5_fewer_than_5_classes():
    g = torch.Generator().manual_seed(2)
    train, test = torch.randn(30, 4, generator=g), torch.randn(9, 4, generator=g)
    train_y, test_y = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (9,), generator=g)
    acc = knn_accuracy(train, train_y, test, test_y, ks=(5,))
    assert acc["knn_top5_k5"] == pytest.approx(100.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_knn_cuda_matches_cpu():
    g = torch.Generator().manual_seed(3)
    train, test = torch.randn(500, 16, generator=g), torch.randn(100, 16, generator=g)
    y = torch.randint(0, 10, (500,), generator=g)
    cpu = knn_classify(train, y, test, ks=(20,), chunk_size=32)[20]
    gpu = knn_classify(train.cuda(), y.cuda(), test.cuda(), ks=(20,), chunk_size=32)[20]
    assert gpu.is_cuda and torch.equal(cpu, gpu.cpu())


# ---------------------------------------------------------------------- Hungarian
def test_hungarian_permuted_labels_is_one():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 7, 200)
    perm = rng.permutation(7) + 100
    assert hungarian_accuracy(torch.as_tensor(perm[target]), torch.as_tensor(target)) == 1.0


def test_hungarian_handworked_greedy_fails():
    # contingency (cluster x label): c0 -> [3 of l0, 2 of l1], c1 -> [3 of l0]
    # greedy c0->l0 gives 3; optimal c0->l1, c1->l0 gives 5/8
    pred = [0, 0, 0, 0, 0, 1, 1, 1]
    target = [0, 0, 0, 1, 1, 0, 0, 0]
    assert hungarian_accuracy(torch.tensor(pred), torch.tensor(target)) == pytest.approx(5 / 8)


def test_hungarian_rectangular():
    # more clusters than classes: unmatched cluster counts as wrong
    assert hungarian_accuracy(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 1, 1, 1, 1])) == pytest.approx(4 / 6)
    # fewer clusters than classes
    assert hungarian_accuracy(np.array([5, 5, 5, 5]), np.array([0, 0, 1, 2])) == pytest.approx(0.5)


# --------------------------------------------------------------------- NMI/AMI/ARI
def _mi_bruteforce(t, p):
    n = len(t)
    mi = 0.0
    for a in set(t):
        for b in set(p):
            nij = sum(1 for x, y in zip(t, p) if x == a and y == b)
            if nij:
                mi += nij / n * math.log(n * nij / (t.count(a) * p.count(b)))
    return mi


def _h(x):
    n = len(x)
    return -sum(x.count(v) / n * math.log(x.count(v) / n) for v in set(x))


def test_perfect_clustering():
    t = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    m = cluster_metrics(t + 10, t)
    for key in ("nmi", "ami", "ari", "acc"):
        assert m[key] == pytest.approx(1.0)
    assert m["clusters_used"] == 3


def test_handworked_small_case():
    target, pred = [0, 0, 1, 1], [0, 0, 0, 1]
    m = cluster_metrics(torch.tensor(pred), torch.tensor(target))
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h_t, h_p = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert m["nmi"] == pytest.approx(mi / (0.5 * (h_t + h_p)))
    assert m["nmi"] == pytest.approx(0.343712, abs=1e-6)
    # ARI: sum C(nij,2)=1, sum C(a,2)=2, sum C(b,2)=3, C(4,2)=6 -> expected 1, max 2.5 -> 0
    assert m["ari"] == pytest.approx(0.0, abs=1e-12)
    assert m["acc"] == pytest.approx(0.75)
    assert m["clusters_used"] == 2
    # ARI = (2 - 1.2) / (4.5 - 1.2) = 8/33
    m2 = cluster_metrics(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 0, 1, 1, 1]))
    assert m2["ari"] == pytest.approx(8 / 33)


@pytest.mark.parametrize("target,pred", [([0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0, 0]),
                                         ([0, 0, 0, 1, 1, 2, 3], [1, 1, 0, 0, 0, 1, 0]),
                                         ([0, 1, 1, 1, 1, 2, 2], [3, 3, 3, 1, 2, 2, 0])])
def test_ami_against_permutation_enumeration(target, pred):
    # EMI by definition: average MI over all permutations of the predicted labelling
    # (distinct arrangements of a multiset are equiprobable under a uniform random permutation)
    mis = [_mi_bruteforce(target, list(p)) for p in set(itertools.permutations(pred))]
    emi = float(np.mean(mis))
    mi = _mi_bruteforce(target, pred)
    norm = 0.5 * (_h(target) + _h(pred))
    m = cluster_metrics(np.array(pred), np.array(target))
    assert m["ami"] == pytest.approx((mi - emi) / (norm - emi), abs=1e-9)
    assert m["nmi"] == pytest.approx(mi / norm, abs=1e-12)


def test_independent_labelings_near_zero():
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 10, 20000), rng.integers(0, 10, 20000)
    m = cluster_metrics(torch.as_tensor(p), torch.as_tensor(t))
    assert m["nmi"] < 0.005
    assert abs(m["ami"]) < 0.003
    assert abs(m["ari"]) < 0.003


def test_degenerate_labelings():
    one = np.zeros(10, dtype=int)
    many = np.arange(10)
    assert cluster_metrics(one, one)["nmi"] == 1.0
    m = cluster_metrics(one, many)
    assert m["nmi"] == 0.0 and m["ami"] == pytest.approx(0.0, abs=1e-12) and m["clusters_used"] == 1
    assert m["acc"] == pytest.approx(0.1)


@pytest.mark.skipif(skm is None, reason="scikit-learn not installed; cross-check skipped "
                                        "(hand-worked tests above still run)")
@pytest.mark.parametrize("seed", range(8))
def test_cross_check_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400)) if seed < 6 else 3000
    kt, kp = int(rng.integers(1, 12)), int(rng.integers(1, 15))
    if seed >= 6:
        kt, kp = 40, 60                        # larger, rectangular contingency
    t = rng.integers(0, kt, n)
    if seed % 2:                               # correlated: noisy relabelling of the target
        p = np.where(rng.random(n) < 0.6, (t * 7 + 3) % kp, rng.integers(0, kp, n))
    else:                                      # independent
        p = rng.integers(0, kp, n)
    m = cluster_metrics(torch.as_tensor(p), torch.as_tensor(t))
    assert m["nmi"] == pytest.approx(skm.normalized_mutual_info_score(t, p), abs=1e-10)
    assert m["ami"] == pytest.approx(skm.adjusted_mutual_info_score(t, p), abs=1e-8)
    assert m["ari"] == pytest.approx(skm.adjusted_rand_score(t, p), abs=1e-10)
    assert m["clusters_used"] == len(np.unique(p))


# ------------------------------------------------------------------ top-k accuracy
def test_topk_accuracy_handbuilt():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0],    # label 1: top-1 hit
                           [0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.0],    # label 4: 5th -> top-5 hit only
                           [0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.0],    # label 1: 6th -> miss
                           [0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]])   # label 3: hit
    labels = torch.tensor([1, 4, 1, 3])
    acc = topk_accuracy(logits, labels)
    assert acc == {"top1": pytest.approx(50.0), "top5": pytest.approx(75.0)}
    assert topk_accuracy(logits, labels, ks=(1, 2, 6))["top6"] == pytest.approx(100.0)


def test_topk_accuracy_fewer_classes_than_k_and_empty():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    assert topk_accuracy(logits, torch.tensor([2, 2])) == {"top1": 50.0, "top5": 100.0}
    assert topk_accuracy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))["top1"] == 0.0
    with pytest.raises(ValueError, match="expected logits"):
        topk_accuracy(logits, torch.tensor([1]))


def test_knn_chunks_bound_the_similarity_matrix():
    assert knn_chunk_size(1_281_167) * 1_281_167 <= KNN_SIM_BUDGET   # ImageNet bank: ~100 queries a chunk
    assert knn_chunk_size(1_281_167) >= 1 and knn_chunk_size(10) == 65536 and knn_chunk_size(10**12) == 1
    g = torch.Generator().manual_seed(4)
    train, test = torch.randn(300, 8, generator=g), torch.randn(50, 8, generator=g)
    y, ty = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (50,), generator=g)
    assert knn_accuracy(train, y, test, ty, ks=(7,)) == knn_accuracy(train, y, test, ty, ks=(7,), chunk_size=3)
