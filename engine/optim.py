"""Optimizers and schedules. Schedules are pure functions of the step (nanoGPT's get_lr style)."""
from __future__ import annotations

import torch
import torch.nn as nn

from methods.schedule import cosine


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, final: float = 0.0,
          start: float = 0.0) -> float:
    """Linear warmup from `start` (default 0) at step 0 to `peak` at `warmup_steps`, then cosine to `final` at
    `total_steps`. As the official TWIST adjust_learning_rate (lr * step / warmup_steps: 0 at step 0);
    Self-Classifier's np.linspace(start, peak, warmup_steps) reaches the peak one step earlier."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)


NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token")   # ViT embeddings the official code leaves undecayed


def split_decay_groups(model: nn.Module, decay_all: bool = False) -> tuple[list, list]:
    """(weights, no_decay): biases, norm parameters (ndim <= 1) and ViT position embeddings / class tokens get
    neither weight decay nor LARS adaptation, as in the official TWIST code; `decay_all` puts every parameter
    in the first group (official Self-Classifier)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or any(n in name for n in NO_DECAY_NAMES)
        (no_decay if skip and not decay_all else decay).append(p)
    return decay, no_decay


class LARS(torch.optim.Optimizer):
    """LARS (You et al.) as the official TWIST `lars.py` (OpenSelfSup's LARS): for groups with
    `lars_exclude=False` the per-tensor trust ratio is eta*|w| / (|g| + wd*|w|) (sum of norms, not the norm of
    g + wd*w), and the step d = (g + wd*w) * trust enters the momentum buffer.

    `lr_in_momentum=True` (TWIST's lars.py): buf = m*buf + lr*d; w -= buf.
    `lr_in_momentum=False` (apex LARC wrapping SGD, as Self-Classifier): buf = m*buf + d; w -= lr*buf.
    The two differ only while lr changes (warmup, cosine). They also differ where a norm is zero, and each mode
    follows its own file there:
    - lars.py (TWIST): trust = eta*|w| / (|g| + wd*|w|) as written: 0 when |w| = 0 (no new step; the momentum
      buffer still moves the weight), eta/wd when |g| = 0. Where the denominator is 0 the step g + wd*w is 0 too;
      lars.py raises ZeroDivisionError there (Python floats), this class takes the zero step.
    - apex LARC (Self-Classifier): trust = eta*|w| / (|g| + wd*|w| + eps), eps = 1e-8; when either norm is 0 the
      gradient passes through unscaled and without weight decay (LARC adds wd*w only inside that branch, and
      takes the decay away from SGD), i.e. step g: trust 1 for |w| = 0, trust 0 on g + wd*w for |g| = 0.

    No host syncs, and every per-tensor op is a foreach op on same-shaped lists (torch's fast multi-tensor path):
    the per-tensor trust ratios scale one flat copy of the steps instead of a list of 0-dim tensors, which
    torch._foreach_mul_ would apply one tensor at a time."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 eta: float = 0.001, lr_in_momentum: bool = True, larc_eps: float = 1e-8):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False,
                        lr_in_momentum=lr_in_momentum, larc_eps=larc_eps)   # larc_eps: LARC mode only
        super().__init__(params, defaults)
        self._segments: dict = {}  # (device, numels) -> index of each flat element's tensor; built once

    def __setstate__(self, state):   # optimizer states saved before larc_eps existed
        super().__setstate__(state)
        for g in self.param_groups:
            g.setdefault("larc_eps", 1e-8)

    def _segment_index(self, params) -> torch.Tensor:
        numels = tuple(p.numel() for p in params)
        key = (params[0].device, numels)
        if key not in self._segments:
            counts = torch.tensor(numels, device=params[0].device)
            self._segments[key] = torch.repeat_interleave(torch.arange(len(numels), device=params[0].device),
                                                          counts, output_size=sum(numels))
        return self._segments[key]

    def _trust_scaled(self, params, steps, grads, g: dict, lr_factor: float) -> list:
        """steps[i] * lr_factor * trust_i, as views of one flat tensor (sync-free, a fixed number of kernels)."""
        wd = g["weight_decay"]
        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        if g["lr_in_momentum"]:   # lars.py
            den = g_norm + wd * w_norm
            trust = torch.where(den > 0, g["eta"] * w_norm / den, torch.zeros_like(w_norm))
        else:                     # apex LARC
            trust = torch.where((w_norm > 0) & (g_norm > 0),
                                g["eta"] * w_norm / (g_norm + wd * w_norm + g["larc_eps"]),
                                (w_norm == 0).to(w_norm.dtype))
        flat = torch.cat([s.reshape(-1) for s in steps])
        flat.mul_((trust * lr_factor).to(flat.dtype)[self._segment_index(params)])
        return [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in params]), params)]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            steps = torch._foreach_add(grads, params, alpha=g["weight_decay"]) if g["weight_decay"] else grads
            inner = g["lr"] if g["lr_in_momentum"] else 1.0
            if g["lars_exclude"]:
                steps = torch._foreach_mul(steps, inner) if inner != 1.0 else steps
            else:
                steps = self._trust_scaled(params, steps, grads, g, inner)
            bufs = []
            for p in params:
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                bufs.append(state["mu"])
            torch._foreach_mul_(bufs, g["momentum"])
            torch._foreach_add_(bufs, steps)
            torch._foreach_add_(params, bufs, alpha=-1.0 if g["lr_in_momentum"] else -g["lr"])
        return loss


def build_optimizer(ocfg, model: nn.Module, method: str = "twist", decay_all: bool = False) -> torch.optim.Optimizer:
    """The decayed group is always param_groups[0] (the weight-decay schedule touches only it). LARS follows the
    method's official optimizer: TWIST's lars.py, or apex LARC around SGD for Self-Classifier."""
    decay, no_decay = split_decay_groups(model, decay_all)
    if ocfg.name == "lars":
        groups = [dict(params=decay, weight_decay=ocfg.weight_decay, lars_exclude=False),
                  dict(params=no_decay, weight_decay=0.0, lars_exclude=True)]
        return LARS(groups, lr=0.0, momentum=ocfg.momentum, eta=ocfg.lars_eta,
                    lr_in_momentum=method != "self_classifier")
    groups = [dict(params=decay, weight_decay=ocfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if ocfg.name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=ocfg.momentum)
    if ocfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0)
    raise ValueError(f"optim.name '{ocfg.name}' is not one of lars, sgd, adamw")


class Schedule:
    """lr and weight decay for a step, from the config and the run's length. With a self-labeling phase
    (`sl_start_epoch`), that phase has its own warmup to `self_label.lr` (scaled like lr) and cosine."""

    def __init__(self, ocfg, steps_per_epoch: int, epochs: int, global_batch: int, sl_start_epoch: int = 0,
                 slcfg=None):
        from engine.config_schema import SelfLabelConfig
        slcfg = slcfg or SelfLabelConfig()
        self.total = steps_per_epoch * epochs
        self.sl_start = steps_per_epoch * sl_start_epoch if 0 < sl_start_epoch < epochs else None
        self.sl_peak = slcfg.lr * global_batch / 256.0
        self.sl_warmup = int(round(slcfg.warmup_epochs * steps_per_epoch))
        self.final_ratio = ocfg.min_lr_ratio
        self.warmup = int(round(ocfg.warmup_epochs * steps_per_epoch))
        self.peak = ocfg.lr * global_batch / 256.0
        self.final = self.peak * ocfg.min_lr_ratio
        self.start = self.peak * ocfg.warmup_start_ratio
        self.wd = (ocfg.weight_decay, ocfg.weight_decay_end)

    def lr(self, step: int) -> float:
        if self.sl_start is None:
            return lr_at(step, self.total, self.warmup, self.peak, self.final, self.start)
        if step < self.sl_start:  # as the official code: the TWIST cosine ends where self-labeling starts
            return lr_at(step, self.sl_start, self.warmup, self.peak, self.final, self.start)
        return lr_at(step - self.sl_start, self.total - self.sl_start, self.sl_warmup, self.sl_peak,
                     self.sl_peak * self.final_ratio)

    def weight_decay(self, step: int) -> float:
        return cosine(step, self.total, *self.wd)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr(step)
        for i, g in enumerate(optimizer.param_groups):
            g["lr"] = lr
            if i == 0:
                g["weight_decay"] = self.weight_decay(step)
        return lr
