import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from methods.self_classifier.model import SelfClassifierHead
from methods.self_classifier.loss import num_terms, self_classifier_loss
from tests.conftest import fit_noisy_views


def reference(outputs, row_tau, col_tau, eps):
    """Hand-written float64 Self-Classifier loss, one (target i, prediction j) pair at a time, from the paper's
    and the official code's definitions."""
    def softmax(v):
        m = max(v)
        e = [math.exp(a - m) for a in v]
        return [a / sum(e) for a in e]

    total, terms = 0.0, 0
    for cls in outputs:
        views = [x.double().tolist() for x in cls]
        n, c = len(views[0]), len(views[0][0])
        targets, logps = [], []
        for x in views:
            cols = [softmax([x[r][k] / col_tau for r in range(n)]) for k in range(c)]   # softmax over the batch
            t = [[cols[k][r] for k in range(c)] for r in range(n)]
            targets.append([[a / max(sum(row), eps) for a in row] for row in t])      # L1 per row
            p = [softmax([a / row_tau for a in row]) for row in x]                     # softmax over classes
            colsum = [sum(p[r][k] for r in range(n)) for k in range(c)]
            logps.append([[math.log(n / c * p[r][k] / max(colsum[k], eps) + eps) for k in range(c)]
                          for r in range(n)])
        for i in range(len(views)):
            for j in range(len(views)):
                if i == j or (i >= 2 and j >= 2):
                    continue
                ce = -sum(sum(a * b for a, b in zip(targets[i][r], logps[j][r])) for r in range(n)) / n
                total, terms = total + ce, terms + 1
    return total / terms


def random_outputs(seed, views, classes, n=6, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, c, generator=g, dtype=dtype) * scale for _ in range(views)] for c in classes]


@pytest.mark.parametrize("views,classes,row_tau,col_tau,eps", [
    (2, (5,), 0.1, 0.05, 1e-12), (4, (5, 9), 0.1, 0.05, 1e-12), (5, (3,), 0.5, 0.2, 1e-8), (8, (4, 7), 0.1, 0.05, 0.0)])
def test_matches_float64_reference(views, classes, row_tau, col_tau, eps):
    outputs = random_outputs(views, views, classes)
    ref = reference(outputs, row_tau, col_tau, eps)
    out = self_classifier_loss(outputs, row_tau, col_tau, eps)
    assert out["total"].dtype == torch.float64
    assert out["total"].item() == pytest.approx(ref, rel=1e-10)
    assert out["total"].item() == pytest.approx(sum(out[f"ce{k}"].item() for k in range(len(classes))) / len(classes))
    f32 = self_classifier_loss([[x.float() for x in cls] for cls in outputs], row_tau, col_tau, eps)
    assert f32["total"].item() == pytest.approx(ref, rel=1e-5)


def test_term_count_skips_local_local_pairs():
    assert num_terms(2) == 2                      # (0,1), (1,0)
    assert num_terms(4) == 4 * 3 - 2              # all ordered pairs but (2,3), (3,2)
    assert num_terms(8) == 26


def test_collapse_scores_worse_than_diverse():
    n, c = 40, 8
    collapsed = torch.full((n, c), -5.0)
    collapsed[:, 0] = 5.0                         # every sample confidently in class 0
    diverse = torch.full((n, c), -5.0)
    diverse[torch.arange(n), torch.arange(n) % c] = 5.0  # confident and balanced over the classes
    l_col = self_classifier_loss([[collapsed, collapsed.clone(), collapsed.clone()]])["total"]
    l_div = self_classifier_loss([[diverse, diverse.clone(), diverse.clone()]])["total"]
    # identical rows make target and prediction uniform: log C; when the other classes' probabilities underflow
    # below eps, the column normalisation's eps floor makes the collapse cost even more
    same = torch.randn(1, c).expand(n, c)
    assert self_classifier_loss([[same, same.clone()]])["total"].item() == pytest.approx(math.log(c), rel=1e-5)
    assert l_col.item() > math.log(c)
    assert l_div.item() < 0.05
    half = diverse.clone()
    half[:, c // 2:] = -5.0                       # only half the classes used
    half[torch.arange(n), torch.arange(n) % (c // 2)] = 5.0
    l_half = self_classifier_loss([[half, half.clone()]])["total"]
    assert l_div < l_half < l_col


def test_loss_decreases_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    head = SelfClassifierHead(in_dim=10, hidden=32, dim=8, mlp_layers=2, classes=(4, 6))
    losses = fit_noisy_views(head, lambda out: self_classifier_loss([list(o.chunk(4)) for o in out])["total"],
                             steps=40)
    assert losses[-1] < losses[0] - 0.3


def test_low_precision_inputs_are_computed_in_fp32():
    outputs = random_outputs(1, 3, (5,), dtype=torch.float32)
    bf16 = [[x.bfloat16() for x in cls] for cls in outputs]
    out = self_classifier_loss(bf16)["total"]
    assert out.dtype == torch.float32
    ref = self_classifier_loss([[x.float() for x in cls] for cls in bf16])["total"]
    assert out.item() == pytest.approx(ref.item(), abs=1e-6)


def test_needs_two_views():
    with pytest.raises(ValueError, match="2 views"):
        self_classifier_loss([[torch.randn(4, 3)]])


# -- DDP: 2 processes (gloo) against one process on the concatenated batch ------------------------------------
N, V, WORLD = 6, 4, 2


def _setup(seed=0):
    torch.manual_seed(seed)
    head = SelfClassifierHead(in_dim=12, hidden=16, dim=8, mlp_layers=1, classes=(5, 7))  # no BN: exact grads
    feats = [torch.randn(WORLD * N, 12) for _ in range(V)]
    return head, feats


def _loss(head, feats):
    out = head(torch.cat(feats))
    return self_classifier_loss([list(o.chunk(len(feats))) for o in out])


def _ddp_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        head, feats = _setup()
        ddp = torch.nn.parallel.DistributedDataParallel(head)
        local = [f[rank * N:(rank + 1) * N] for f in feats]
        out = ddp(torch.cat(local))
        loss = self_classifier_loss([list(o.chunk(V)) for o in out])
        loss["total"].backward()  # DDP averages the gradients over ranks
        torch.save({"loss": {k: v.detach() for k, v in loss.items()},
                    "grads": {k: p.grad for k, p in head.named_parameters()}}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_loss_and_gradients_equal_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    head, feats = _setup()
    ref = _loss(head, feats)
    ref["total"].backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"{rank}.pt")
        for k, v in ref.items():
            assert got["loss"][k].item() == pytest.approx(v.item(), rel=1e-6), (rank, k)
        for name, p in head.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-7, msg=f"{rank} {name}")
