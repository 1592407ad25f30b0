"""LARS against float64 transcriptions of the official optimizers: TWIST's lars.py (bytedance/TWIST 796d36e,
LARS_OPENSELF) and apex's LARC wrapping torch SGD (what Self-Classifier's train.py uses with --lars --sgd)."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.optim import LARS


def twist_lars_step(params, grads, bufs, lr, wd, eta, mom, exclude):
    """bytedance/TWIST lars.py, LARS_OPENSELF.step for one group (dampening 0, no nesterov)."""
    for i, (p, d_p) in enumerate(zip(params, grads)):
        if exclude:
            local_lr = 1.0
        else:
            weight_norm = torch.norm(p).item()
            grad_norm = torch.norm(d_p).item()
            local_lr = eta * weight_norm / (grad_norm + wd * weight_norm)
        d_p = d_p.add(p, alpha=wd).mul(local_lr * lr)
        if bufs[i] is None:
            bufs[i] = torch.clone(d_p).detach()
        else:
            bufs[i].mul_(mom).add_(d_p)
        p.add_(-bufs[i])


def apex_larc_sgd_step(params, grads, bufs, lr, wd, eta, mom, eps=1e-8):
    """apex.parallel.LARC(clip=False) then torch.optim.SGD(momentum) with the group's weight decay moved into
    the gradient by LARC."""
    for i, (p, g) in enumerate(zip(params, grads)):
        g = g.clone()
        param_norm, grad_norm = torch.norm(p), torch.norm(g)
        if param_norm != 0 and grad_norm != 0:
            adaptive_lr = eta * param_norm / (grad_norm + param_norm * wd + eps)
            g += wd * p
            g *= adaptive_lr
        bufs[i] = g.clone() if bufs[i] is None else bufs[i].mul_(mom).add_(g)
        p.add_(bufs[i], alpha=-lr)


@pytest.mark.parametrize("lr_in_momentum", [True, False])
def test_lars_matches_the_official_optimizer_over_steps_with_a_changing_lr(lr_in_momentum):
    torch.manual_seed(0)
    shapes_w, shapes_b = [(6, 4), (3, 3, 2, 2), (5, 6)], [(6,), (3,)]
    ws = [torch.randn(s, dtype=torch.float64) for s in shapes_w]
    bs = [torch.randn(s, dtype=torch.float64) for s in shapes_b]
    wd, eta, mom = 0.05, 0.001, 0.9
    params = [t.clone().requires_grad_() for t in ws + bs]
    opt = LARS([dict(params=params[:3], weight_decay=wd, lars_exclude=False),
                dict(params=params[3:], weight_decay=0.0, lars_exclude=True)], momentum=mom, eta=eta,
               lr_in_momentum=lr_in_momentum)
    ref_w, ref_b = [t.clone() for t in ws], [t.clone() for t in bs]
    buf_w, buf_b = [None] * 3, [None] * 2
    for step, lr in enumerate([0.0, 2.0, 5.0, 8.0, 6.0, 3.0]):   # warmup from 0, then decay
        grads = [torch.randn_like(t) for t in ws + bs]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        if lr_in_momentum:
            twist_lars_step(ref_w, grads[:3], buf_w, lr, wd, eta, mom, exclude=False)
            twist_lars_step(ref_b, grads[3:], buf_b, lr, 0.0, eta, mom, exclude=True)
        else:  # Self-Classifier adapts every tensor; compare the decayed group, and the plain-SGD one
            apex_larc_sgd_step(ref_w, grads[:3], buf_w, lr, wd, eta, mom, eps=0.0)  # apex's 1e-8: not ours
            for i, (p, gr) in enumerate(zip(ref_b, grads[3:])):
                buf_b[i] = gr.clone() if buf_b[i] is None else buf_b[i].mul_(mom).add_(gr)
                p.add_(buf_b[i], alpha=-lr)
        for p, r in zip(params, ref_w + ref_b):
            torch.testing.assert_close(p.detach(), r, rtol=1e-9, atol=1e-12, msg=f"step {step}")
    assert not torch.allclose(params[0].detach(), ws[0])


def test_trust_ratio_uses_the_sum_of_norms():
    w = torch.full((4,), 2.0, dtype=torch.float64, requires_grad=True)   # |w| = 4
    w.grad = torch.tensor([3.0, 0, 0, 0], dtype=torch.float64)           # |g| = 3
    opt = LARS([dict(params=[w], weight_decay=0.5)], lr=1.0, momentum=0.0, eta=0.1)
    opt.step()
    trust = 0.1 * 4 / (3 + 0.5 * 4)                                      # not 0.1 * 4 / |g + 0.5 w|
    expected = 2.0 - trust * (torch.tensor([3.0, 0, 0, 0], dtype=torch.float64) + 1.0)
    torch.testing.assert_close(w.detach(), expected)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _step_ops(n):
    params = [torch.randn(4, 3, requires_grad=True) for _ in range(n)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = LARS([dict(params=params[: n // 2], weight_decay=0.1),
                dict(params=params[n // 2:], weight_decay=0.0, lars_exclude=True)], lr=0.5)
    opt.step()
    with _Ops() as mode:
        opt.step()
    views = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.split_with_sizes", "aten.alias"}
    return {k: v for k, v in mode.ops.items() if k not in views}


def test_step_is_sync_free_and_its_op_count_does_not_grow_with_the_number_of_tensors():
    few, many = _step_ops(4), _step_ops(24)
    assert few == many                             # foreach ops over the lists, no per-tensor kernels
    assert "aten._local_scalar_dense" not in few   # no .item(): no host sync
    assert few["aten._foreach_norm"] == 2
