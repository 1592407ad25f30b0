"""Counted work of one training step, and what a recipe costs in total: an estimate, not a measurement.

    python tools/profiler.py flops --config configs/fmnist_full.yaml [--samples N] [--batch 8]
                                   [--anchor-config configs/rn50_multicrop.yaml --anchor-rate 1144
                                    --anchor-overrides augment.num_local=6]

Counts, on the CPU, per sample of the recipe's views (the model's forward, the method's loss inputs, e.g. a
momentum teacher, the loss and the backward, exactly as engine/step.py runs them):
- FLOPs with torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions, 2 per multiply-add);
- aten operator calls per step, which bound an eager GPU step from below by launch overhead for small models
  (each is at least one kernel launch of a few microseconds, whatever the batch).
The recipe's total is FLOPs per sample x samples per epoch (`--samples`, default: the train split of data.path)
x train.epochs. With an anchor (a recipe whose step was measured on a GPU, at `--anchor-rate` samples/s) the
achieved FLOP/s of that GPU is the anchor's FLOPs x its rate, and the recipe's time at the same efficiency follows.
"""
from __future__ import annotations

import argparse

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from engine.config import ConfigError, load_config
from methods.registry import get_method
from pipelines.sources import list_split
from pipelines.spec import MultiCropSpec


class OpCounter(TorchDispatchMode):
    """Counts aten operator calls (views and metadata-only ops included: an upper bound on kernel launches)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def step_work(cfg, batch: int) -> dict:
    """FLOPs (forward alone, and forward + loss + backward) per sample and aten calls per step of `cfg`'s
    training step at `batch` samples, fp32 on the CPU (the count does not depend on the precision)."""
    torch.manual_seed(0)
    method = get_method(cfg.method)
    model = method.build(cfg).train()
    hooks = method.hooks(cfg, model, 1)
    sizes = MultiCropSpec.from_config(cfg.augment).view_sizes()
    views = [torch.randn(batch, 3, s, s) for s in sizes]
    with FlopCounterMode(display=False) as fwd:
        with torch.no_grad():
            model(views)
    with FlopCounterMode(display=False) as full, OpCounter() as ops:
        outputs = model(views)
        losses = method.loss(outputs, cfg, hooks.loss_inputs(views, 0))
        losses["total"].backward()
    return {"views": sizes, "forward_gflops_per_sample": fwd.get_total_flops() / batch / 1e9,
            "step_gflops_per_sample": full.get_total_flops() / batch / 1e9, "aten_calls_per_step": ops.calls}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="profiler.py flops", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="recipe to count")
    p.add_argument("--samples", type=int, default=None, help="training samples per epoch (default: the train "
                   "split of the config's data.path)")
    p.add_argument("--batch", type=int, default=8, help="samples per counted step (FLOPs per sample do not depend "
                   "on it; BatchNorm needs more than 1)")
    p.add_argument("--anchor-config", default=None, help="a recipe whose training step was measured on a GPU")
    p.add_argument("--anchor-overrides", default="", help="comma-separated key=value for the anchor as measured")
    p.add_argument("--anchor-rate", type=float, default=None, help="the anchor's measured samples/s")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    if (args.anchor_config is None) != (args.anchor_rate is None):
        p.error("--anchor-config and --anchor-rate go together")
    try:
        cfg = load_config(args.config, args.overrides)
        anchor = load_config(args.anchor_config, [o for o in args.anchor_overrides.split(",") if o]) \
            if args.anchor_config else None
    except ConfigError as exc:
        p.error(str(exc))
    samples = args.samples
    if samples is None:
        try:
            samples = len(list_split(cfg.data.path, cfg.data.train_split)[0])
        except (OSError, ValueError) as exc:
            p.error(f"counting the train split of data.path '{cfg.data.path}' failed ({exc}); pass --samples N")
    work = step_work(cfg, args.batch)
    total = work["step_gflops_per_sample"] * 1e9 * samples * cfg.train.epochs
    steps = samples // cfg.data.batch_size * cfg.train.epochs
    print(f"{args.config}: views {work['views']}, forward {work['forward_gflops_per_sample']:.3g} GFLOPs/sample, "
          f"forward+loss+backward {work['step_gflops_per_sample']:.3g} GFLOPs/sample, "
          f"{work['aten_calls_per_step']} aten calls per step")
    print(f"total: {samples} samples x {cfg.train.epochs} epochs = {total / 1e15:.3g} PFLOP in {steps} steps "
          f"of {cfg.data.batch_size}")
    if anchor is not None:
        a = step_work(anchor, args.batch)
        achieved = a["step_gflops_per_sample"] * 1e9 * args.anchor_rate
        print(f"anchor {args.anchor_config}: views {a['views']}, {a['step_gflops_per_sample']:.3g} GFLOPs/sample at "
              f"{args.anchor_rate:g} samples/s = {achieved / 1e12:.3g} TFLOP/s achieved")
        print(f"estimate at the anchor's efficiency: {total / achieved:.3g} s of compute "
              f"(+ launch overhead: {work['aten_calls_per_step']} aten calls x {steps} steps x ~5 us = "
              f"{work['aten_calls_per_step'] * steps * 5e-6:.3g} s if not overlapped)")
    return 0
