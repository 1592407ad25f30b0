import math

import pytest
import torch

from methods.twist.loss import twist_loss, view_pairs
from tests.conftest import fit_noisy_views


def reference(logits, lam1, lam2, tau, eps):
    """Hand-written float64 TWIST objective, one pair at a time, straight from the official formulas."""
    def sm(x):
        e = [[math.exp(v - max(row)) for v in row] for row in x]
        return [[v / sum(row) for v in row] for row in e]

    def kl(p, q):
        return sum(sum(a * (math.log(a + eps) - math.log(b + eps)) for a, b in zip(pr, qr))
                   for pr, qr in zip(p, q)) / len(p)

    def eh(q):
        return sum(-sum(a * math.log(a + eps) for a in row) for row in q) / len(q)

    def he(q):
        m = [sum(col) / len(q) for col in zip(*q)]
        return -sum(a * math.log(a + eps) for a in m)

    L = [x.double().tolist() for x in logits]
    P = [sm(x) for x in L]
    Q = [sm([[v / tau for v in row] for row in x]) for x in L]
    pairs = [(i, j) for i in range(2) for j in range(i + 1, len(L))]
    acc = {"kl": 0.0, "eh": 0.0, "he": 0.0}
    for i, j in pairs:
        acc["kl"] += 0.5 * (kl(P[i], P[j]) + kl(P[j], P[i]))
        acc["eh"] += 0.5 * (eh(Q[i]) + eh(Q[j]))
        acc["he"] += 0.5 * (he(Q[i]) + he(Q[j]))
    acc = {k: v / len(pairs) for k, v in acc.items()}
    acc["total"] = acc["kl"] + (1 + lam1) * acc["eh"] - lam2 * acc["he"]
    return acc


@pytest.mark.parametrize("views,lam1,lam2,tau", [(2, 0.0, 1.0, 1.0), (5, -0.6, 1.0, 1.0), (4, 0.3, 0.7, 0.5)])
def test_matches_float64_reference(views, lam1, lam2, tau):
    g = torch.Generator().manual_seed(views)
    logits = [torch.randn(6, 7, generator=g, dtype=torch.float64) * 2 for _ in range(views)]
    out = twist_loss(logits, lam1=lam1, lam2=lam2, tau=tau, eps=1e-5)
    ref = reference(logits, lam1, lam2, tau, 1e-5)
    for k in ("kl", "eh", "he", "total"):
        assert out[k].item() == pytest.approx(ref[k], rel=1e-5, abs=1e-6), k


def test_pairs_are_globals_against_everything():
    assert view_pairs(2) == [(0, 1)]
    assert view_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert (2, 3) not in view_pairs(8)


def test_collapse_is_penalised():
    n, k = 32, 8
    # collapsed: every sample confidently in class 0; diverse: each sample confidently in its own class
    collapsed = torch.full((n, k), -5.0)
    collapsed[:, 0] = 5.0
    diverse = torch.full((n, k), -5.0)
    diverse[torch.arange(n), torch.arange(n) % k] = 5.0
    # uniform: no confidence at all
    uniform = torch.zeros(n, k)
    l_col = twist_loss([collapsed, collapsed.clone()])["total"]
    l_div = twist_loss([diverse, diverse.clone()])["total"]
    l_uni = twist_loss([uniform, uniform.clone()])["total"]
    assert l_div < l_col - 1.0
    assert l_div < l_uni - 1.0
    assert l_div.item() == pytest.approx(-math.log(k), abs=0.05)  # optimum: sharp and balanced


def test_loss_decreases_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 8), torch.nn.BatchNorm1d(8, affine=False))
    losses = fit_noisy_views(net, lambda out: twist_loss(list(out.chunk(4)))["total"], steps=60)
    assert losses[-1] < losses[0] - 0.5


def test_bf16_inputs_are_computed_in_fp32():
    logits = [torch.randn(8, 5).bfloat16() for _ in range(3)]
    out = twist_loss(logits)
    assert out["total"].dtype == torch.float32
    ref = twist_loss([x.float() for x in logits])
    assert out["total"].item() == pytest.approx(ref["total"].item(), abs=1e-6)


def test_needs_two_views():
    with pytest.raises(ValueError, match="at least 2 views"):
        twist_loss([torch.randn(4, 3)])
