import math

import pytest
import torch

from engine.config_schema import OptimConfig
from engine.optim import LARS, Schedule, build_optimizer, cosine, lr_at, split_decay_groups


def test_schedule_shape():
    peak = 2.0
    assert lr_at(0, 100, 10, peak) == 0.0                     # official: lr * step / warmup, 0 at step 0
    assert lr_at(5, 100, 10, peak) == pytest.approx(1.0)
    assert lr_at(9, 100, 10, peak) == pytest.approx(1.8)
    assert lr_at(10, 100, 10, peak) == pytest.approx(2.0)
    assert lr_at(55, 100, 10, peak) == pytest.approx(1.0)
    assert lr_at(100, 100, 10, peak, final=0.1) == pytest.approx(0.1)
    assert cosine(0, 10, 0.04, 0.4) == pytest.approx(0.04) and cosine(10, 10, 0.04, 0.4) == pytest.approx(0.4)


def test_schedule_scales_lr_with_global_batch_and_sets_wd_on_first_group_only():
    ocfg = OptimConfig(lr=0.5, weight_decay=1e-4, weight_decay_end=1e-3, warmup_epochs=1, min_lr_ratio=0.0)
    s = Schedule(ocfg, steps_per_epoch=10, epochs=5, global_batch=1024)
    assert s.peak == pytest.approx(2.0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    opt = build_optimizer(ocfg, net)
    s.apply(opt, 50)
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(1e-3)
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert all(g["lr"] == pytest.approx(0.0) for g in opt.param_groups)


def test_decay_groups_exclude_biases_and_norms():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    decay, no_decay = split_decay_groups(net)
    assert [p.shape for p in decay] == [torch.Size([4, 3, 3, 3])]
    assert len(no_decay) == 3


def test_lars_trains_a_tiny_regression():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = x @ torch.randn(8, 1)
    net = torch.nn.Linear(8, 1, bias=False)
    opt = build_optimizer(OptimConfig(name="lars", weight_decay=0.0), net)
    opt.param_groups[0]["lr"] = 20.0  # LARS steps are lr * eta * ||w||: large nominal lr
    first = None
    for _ in range(200):
        loss = ((net(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first and math.isfinite(loss.item())
