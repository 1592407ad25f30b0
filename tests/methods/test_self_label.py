import math

import pytest
import torch

from methods.twist.hooks import MomentumTeacher
from methods.twist.self_label import confidence_threshold, self_label_loss, twist_teacher_loss


def softmax(row, tau=1.0):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def test_teacher_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    s = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    eps = 1e-5
    T = [[softmax(r) for r in x.tolist()] for x in t]
    S = [[softmax(r) for r in x.tolist()] for x in s]
    kl = [sum(sum(a * (math.log(a + eps) - math.log(b + eps)) for a, b in zip(pr, qr))
              for pr, qr in zip(T[i], S[j])) / 4 for i in range(2) for j in range(3) if i != j]
    eh = [sum(-sum(a * math.log(a + eps) for a in r) for r in S[v]) / 4 for v in range(3)]
    he = []
    for v in range(3):
        m = [sum(c) / 4 for c in zip(*S[v])]
        he.append(-sum(a * math.log(a + eps) for a in m))
    ref = sum(kl) / len(kl) + 0.4 * sum(eh) / 3 - sum(he) / 3
    out = twist_teacher_loss(t, s, lam1=-0.6, lam2=1.0)
    assert out["total"].item() == pytest.approx(ref, rel=1e-6)
    assert len(kl) == 4  # (0,1), (0,2), (1,0), (1,2): never a view against itself


def test_threshold_is_the_quantile_from_the_top():
    p = torch.tensor([0.9, 0.2, 0.5, 0.7, 0.3])
    assert confidence_threshold(p, 0.5).item() == pytest.approx(0.5)   # sorted desc: .9 .7 .5 .3 .2 -> index 2
    assert confidence_threshold(p, 0.0).item() == 0.0
    assert confidence_threshold(p, 1.0).item() == pytest.approx(0.2)


def test_self_label_loss_matches_hand_computation():
    # 3 samples, 3 classes, 2 globals + 1 local
    g0 = torch.tensor([[4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    g1 = torch.tensor([[0.0, 2.0, 0.0], [0.0, 3.0, 0.0], [0.2, 0.0, 0.0]], dtype=torch.float64)
    loc = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    quantile = 0.5
    P0 = [max(softmax(r)) for r in g0.tolist()]
    P1 = [max(softmax(r)) for r in g1.tolist()]
    best = sorted([max(a, b) for a, b in zip(P0, P1)], reverse=True)
    thr = best[int(quantile * 3)]
    weak = [g0[i] if P0[i] > P1[i] else g1[i] for i in range(3)]
    strong = [g1[i] if P0[i] > P1[i] else g0[i] for i in range(3)]

    def ce(targets_from, inputs):
        terms = []
        for w, x in zip(targets_from, inputs):
            pw = softmax(w.tolist())
            if max(pw) > thr:
                k = pw.index(max(pw))
                terms.append(-math.log(softmax(x.tolist())[k]))
        return sum(terms) / len(terms) if terms else 0.0
    ref = (ce(weak, strong) + ce(weak, list(loc))) / 2
    out = self_label_loss([g0, g1, loc], quantile)
    assert out["total"].item() == pytest.approx(ref, rel=1e-6)
    assert out["threshold"].item() == pytest.approx(thr)


def test_self_label_gradient_flows_to_strong_views_only():
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 4, generator=g, requires_grad=True) for _ in range(4)]
    self_label_loss(views, 0.25)["total"].backward()
    assert views[2].grad.abs().sum() > 0 and views[3].grad.abs().sum() > 0
    assert (views[0].grad.abs().sum() + views[1].grad.abs().sum()) > 0  # each global is the strong view somewhere


def test_momentum_teacher_ema_and_views():
    student = torch.nn.Linear(3, 2)
    teacher = MomentumTeacher(student)
    t0 = [p.clone() for p in teacher.net.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(0.9)
    for old, new, s in zip(t0, teacher.net.parameters(), student.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * s)
        assert not new.requires_grad
    seen = []
    teacher.net.forward = lambda v: seen.append(len(v))
    teacher([torch.zeros(1)] * 5)
    assert seen == [2]  # the teacher sees the two global views only
