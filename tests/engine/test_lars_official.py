"""LARS against float64 transcriptions of the official optimizers: TWIST's lars.py (bytedance/TWIST 796d36e,
LARS_OPENSELF) and apex's LARC wrapping torch SGD (what Self-Classifier's train.py L321 uses: trust_coefficient
0.001, clip=False, the default eps 1e-8), including tensors whose weight or gradient norm is zero."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.optim import LARS


def twist_lars_step(params, grads, bufs, lr, wd, eta, mom, exclude):
    """bytedance/TWIST 796d36e lars.py L88-117, LARS_OPENSELF.step's loop for one group (dampening 0, no
    nesterov). The norms are Python floats (.item()): a zero denominator raises ZeroDivisionError."""
    for i, (p, d_p) in enumerate(zip(params, grads)):
        if exclude:
            local_lr = 1.
        else:
            weight_norm = torch.norm(p).item()
            grad_norm = torch.norm(d_p).item()
            local_lr = eta * weight_norm / \
                (grad_norm + wd * weight_norm)
        actual_lr = local_lr * lr
        d_p = d_p.add(p, alpha=wd).mul(actual_lr)
        if bufs[i] is None:
            bufs[i] = torch.clone(d_p).detach()
        else:
            bufs[i].mul_(mom).add_(d_p, alpha=1 - 0)
        p.add_(-bufs[i])


def apex_larc_sgd_step(params, grads, bufs, lr, wd, eta, mom, eps=1e-8):
    """NVIDIA/apex 0bfb830 apex/parallel/LARC.py L78-107, LARC.step (clip=False): the group's weight decay is
    taken from SGD (group['weight_decay'] = 0) and added to the gradient only inside
    `if param_norm != 0 and grad_norm != 0:` (L92), then torch.optim.SGD (momentum, dampening 0)."""
    for i, (p, g) in enumerate(zip(params, grads)):
        g = g.clone()
        param_norm = torch.norm(p)
        grad_norm = torch.norm(g)
        if param_norm != 0 and grad_norm != 0:
            adaptive_lr = eta * (param_norm) / (grad_norm + param_norm * wd + eps)
            g += wd * p
            g *= adaptive_lr
        bufs[i] = torch.clone(g).detach() if bufs[i] is None else bufs[i].mul_(mom).add_(g, alpha=1 - 0)
        p.add_(bufs[i], alpha=-lr)


def _lars(params_w, params_b, wd, eta, mom, lr_in_momentum):
    groups = [dict(params=params_w, weight_decay=wd, lars_exclude=False)]
    if params_b:
        groups.append(dict(params=params_b, weight_decay=0.0, lars_exclude=True))
    return LARS(groups, momentum=mom, eta=eta, lr_in_momentum=lr_in_momentum)


def _step(opt, params, grads, lr):
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()


@pytest.mark.parametrize("lr_in_momentum", [True, False])
def test_lars_matches_the_official_optimizer_over_steps_with_a_changing_lr(lr_in_momentum):
    torch.manual_seed(0)
    shapes_w, shapes_b = [(6, 4), (3, 3, 2, 2), (5, 6)], [(6,), (3,)]
    ws = [torch.randn(s, dtype=torch.float64) for s in shapes_w]
    bs = [torch.randn(s, dtype=torch.float64) for s in shapes_b]
    wd, eta, mom = 0.05, 0.001, 0.9
    params = [t.clone().requires_grad_() for t in ws + bs]
    opt = _lars(params[:3], params[3:], wd, eta, mom, lr_in_momentum)
    ref_w, ref_b = [t.clone() for t in ws], [t.clone() for t in bs]
    buf_w, buf_b = [None] * 3, [None] * 2
    for step, lr in enumerate([0.0, 2.0, 5.0, 8.0, 6.0, 3.0]):   # warmup from 0, then decay
        grads = [torch.randn_like(t) for t in ws + bs]
        _step(opt, params, grads, lr)
        if lr_in_momentum:
            twist_lars_step(ref_w, grads[:3], buf_w, lr, wd, eta, mom, exclude=False)
            twist_lars_step(ref_b, grads[3:], buf_b, lr, 0.0, eta, mom, exclude=True)
        else:  # Self-Classifier adapts every tensor; compare the decayed group, and the plain-SGD one
            apex_larc_sgd_step(ref_w, grads[:3], buf_w, lr, wd, eta, mom)
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


def _run_both(ws, grads_per_step, lrs, wd, lr_in_momentum, mom=0.9, eta=0.001):
    """The project's LARS and the official transcription from the same weights and gradients; both results."""
    params = [t.clone().requires_grad_() for t in ws]
    opt = _lars(params, [], wd, eta, mom, lr_in_momentum)
    ref, bufs = [t.clone() for t in ws], [None] * len(ws)
    official = twist_lars_step if lr_in_momentum else apex_larc_sgd_step
    for grads, lr in zip(grads_per_step, lrs):
        _step(opt, params, grads, lr)
        official(ref, grads, bufs, lr, wd, eta, mom, *([False] if lr_in_momentum else []))
    return [p.detach() for p in params], ref


def test_larc_mode_has_apex_eps_in_the_denominator():
    """Norms of ~1e-8 make apex's eps = 1e-8 change the trust ratio by about half (invisible at norm ~1)."""
    torch.manual_seed(1)
    ws = [1e-8 * torch.randn(5, 4, dtype=torch.float64)]
    grads = [[1e-8 * torch.randn(5, 4, dtype=torch.float64)] for _ in range(3)]
    ours, ref = _run_both(ws, grads, [1.0, 2.0, 1.5], wd=0.1, lr_in_momentum=False, eta=0.5)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=0)
    no_eps = [t.clone() for t in ws]
    bufs = [None]
    for g, lr in zip(grads, [1.0, 2.0, 1.5]):
        apex_larc_sgd_step(no_eps, g, bufs, lr, 0.1, 0.5, 0.9, eps=0.0)
    assert (ours[0] - no_eps[0]).abs().max() > 0.1 * (ws[0] - no_eps[0]).abs().max()   # eps is visible


def _zero_norm_case():
    """Weights: zero throughout the first steps (w0), nonzero with a zero gradient at steps 1 and 3 (w1), plain
    (w2). Gradients of w0 are nonzero, so the official trust is 0 (lars.py) or the step is g (LARC)."""
    torch.manual_seed(2)
    ws = [torch.zeros(3, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64) + 1,
          torch.randn(2, 5, dtype=torch.float64)]
    grads = []
    for step in range(5):
        g = [torch.randn_like(t) for t in ws]
        if step in (1, 3):
            g[1] = torch.zeros_like(ws[1])
        grads.append(g)
    return ws, grads


@pytest.mark.parametrize("lr_in_momentum", [True, False])
def test_zero_weight_and_zero_gradient_norms_follow_the_official_file(lr_in_momentum):
    ws, grads = _zero_norm_case()
    ours, ref = _run_both(ws, grads, [0.5, 2.0, 4.0, 3.0, 1.0], wd=0.05, lr_in_momentum=lr_in_momentum)
    for i, (p, r) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(p, r, rtol=1e-9, atol=1e-12, msg=f"tensor {i}")
    if lr_in_momentum:   # lars.py: a zero weight gets trust 0 and stays 0; LARC: it takes the plain gradient step
        assert ours[0].abs().max() == 0
    else:
        assert ours[0].abs().max() > 0


def test_larc_mode_with_both_norms_zero_leaves_the_tensor_alone():
    ws = [torch.zeros(4, dtype=torch.float64)]
    ours, ref = _run_both(ws, [[torch.zeros(4, dtype=torch.float64)]] * 2, [1.0, 1.0], wd=0.05,
                          lr_in_momentum=False)
    assert ours[0].abs().max() == 0 and ref[0].abs().max() == 0


@pytest.mark.parametrize("wd, w0", [(0.05, 0.0), (0.0, 1.0)])
def test_twist_mode_where_lars_py_divides_by_zero_takes_the_zero_step(wd, w0):
    """|g| + wd*|w| = 0 (zero gradient, and a zero weight or no decay): lars.py raises ZeroDivisionError; the step
    g + wd*w it would scale is 0, so the project adds nothing and the momentum buffer carries on."""
    torch.manual_seed(3)
    w = torch.full((5,), w0, dtype=torch.float64)
    first = [torch.randn(5, dtype=torch.float64)]
    with pytest.raises(ZeroDivisionError):
        twist_lars_step([w.clone()], [torch.zeros(5, dtype=torch.float64)], [None], 1.0, wd, 0.001, 0.9, False)
    p = w.clone().requires_grad_()
    opt = _lars([p], [], wd, 0.001, 0.9, True)
    _step(opt, [p], first, 1.0)                      # a buffer from an ordinary step (zero weight: trust 0)
    after_first, buf = p.detach().clone(), opt.state[p]["mu"].clone()
    _step(opt, [p], [torch.zeros(5, dtype=torch.float64)], 1.0)
    torch.testing.assert_close(p.detach(), after_first - 0.9 * buf, rtol=0, atol=0)
    assert torch.isfinite(p).all()


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


def test_optimizer_state_saved_without_larc_eps_loads_with_apex_eps():
    p = torch.ones(3, requires_grad=True)
    opt = LARS([dict(params=[p], weight_decay=0.1)], lr_in_momentum=False)
    state = opt.state_dict()
    for g in state["param_groups"]:
        del g["larc_eps"]                       # checkpoints from before this key
    opt.load_state_dict(state)
    assert opt.param_groups[0]["larc_eps"] == 1e-8
