"""Throughput profiler: how fast each stage goes and which one is the bottleneck.

    python tools/profiler.py --config configs/rn50_multicrop.yaml --data /data/imagenet [--pipeline torch]
                            [--steps 50] [--warmup 10] [--json out.json] [--plot p.png] [key=value ...]

Measures, in one run and after warm-up (first-step/compile time reported separately):
- loader-only samples/s: every view produced and synchronised, nothing trained;
- model-only samples/s: the real training step (engine.step.TrainStep) on synthetic device-resident views of the
  same shapes and dtype — the ceiling;
- end-to-end samples/s: the real step fed by the real pipeline;
- isolated per-stage times, CPU cores busy (this process and its workers), peak GPU memory;
- a verdict: `bottleneck: data|model|overlap` with the ratio end-to-end / model-only and a hint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


from engine.config import ConfigError, load_config
from engine.distributed import init_distributed, shutdown
from engine.step import resolve_precision
from engine.trainer import build_training
from pipelines import build_pipeline
from pipelines.spec import MultiCropSpec

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds() -> float:
    """CPU time (user+sys) of this process and its live child processes (DataLoader workers), from /proc."""
    t = os.times()
    total = t.user + t.system
    try:
        for task in os.listdir("/proc/self/task"):
            children = Path(f"/proc/self/task/{task}/children").read_text().split()
            for pid in children:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / _TICK
    except OSError:
        pass
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall time and CPU cores busy over a measured interval (synchronising the device at both ends)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t0, self.c0 = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0
        self.cores = (cpu_seconds() - self.c0) / max(self.seconds, 1e-9)


def measure_loader(pipe, steps: int, warmup: int, device) -> dict:
    """Iterate `warmup + steps` batches of a fresh epoch; time the last `steps`."""
    pipe.set_epoch(0)
    it = iter(pipe)
    for _ in range(warmup):
        next(it)
    n = 0
    with Clock(device) as c:
        for _ in range(steps):
            n += len(next(it))
    return {"samples_per_s": n / c.seconds, "cores": c.cores, "seconds": c.seconds}


def synthetic_views(spec: MultiCropSpec, batch: int, dtype, device, channels_last: bool) -> list[torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [torch.randn(batch, 3, s, s, device=device).to(dtype, memory_format=fmt) for s in spec.view_sizes()]


def measure_step(step_fn, feed, steps: int, warmup: int, batch: int, device) -> dict:
    """Time the real training step; `feed()` returns the views for the next step."""
    t0 = time.perf_counter()
    step_fn(feed(), 0)
    sync(device)
    first = time.perf_counter() - t0
    for i in range(1, warmup):
        step_fn(feed(), i)
    with Clock(device) as c:
        for i in range(steps):
            step_fn(feed(), warmup + i)
    return {"samples_per_s": steps * batch / c.seconds, "cores": c.cores, "first_step_s": first}


def stage_times(step_fn, views, device, reps: int = 3) -> dict:
    """Isolated forward / backward / optimizer times (ms) of the real step, each synchronised."""
    out = {"forward_ms": 0.0, "backward_ms": 0.0, "optimizer_ms": 0.0}
    for r in range(reps):
        step_fn.begin(10_000 + r)
        with Clock(device) as f:
            losses = step_fn.forward(views)
        with Clock(device) as b:
            step_fn.backward(losses["total"])
        with Clock(device) as o:
            step_fn.update()
        out["forward_ms"] += 1e3 * f.seconds / reps
        out["backward_ms"] += 1e3 * b.seconds / reps
        out["optimizer_ms"] += 1e3 * o.seconds / reps
    return out


def verdict(loader: float, model: float, e2e: float, workers: int) -> tuple[str, float, str]:
    ratio = e2e / model if model > 0 else 0.0
    if loader < model:
        hint = (f"the pipeline delivers {loader:.0f} samples/s < the step's {model:.0f}: add data.workers "
                f"(now {workers}), move decode/augment to the GPU (data.decode_device=cuda), or try another backend")
        return "data", ratio, hint
    if ratio < 0.95:
        return "overlap", ratio, ("loader and step are each fast enough but not together: they compete for CPU "
                                  "cores or the GPU; fewer workers, pinned memory, or a larger batch")
    return "model", ratio, "the GPU step is the limit: a larger batch, torch.compile (train.compile=true), bf16"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--pipeline", default=None, help="torch | pil | dali | ffcv (default: the config's)")
    p.add_argument("--data", default=None, help="dataset root (default: the config's data.path)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None, help="draw the per-stage times as bars in this PNG (tools/plots.py)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    extra = ([f"data.backend={args.pipeline}"] if args.pipeline else []) + \
            ([f"data.path={args.data}"] if args.data else [])
    try:
        cfg = load_config(args.config, [*args.overrides, *extra])
    except ConfigError as exc:
        print(f"profiler.py: {exc}", file=sys.stderr)
        return 2
    info = init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_min)
    dev, bs = info.device, cfg.data.batch_size
    precision = resolve_precision(cfg.train.precision, dev)
    spec = MultiCropSpec.from_config(cfg.augment)
    try:
        pipe = build_pipeline(cfg, cfg.data.train_split, info.rank, info.world_size, dev,
                              dtype=precision.input_dtype)
        need = 2 * (args.warmup + args.steps)
        if len(pipe) < need:
            print(f"profiler.py: data.path '{cfg.data.path}' gives {len(pipe)} batches per epoch; the loader and "
                  f"end-to-end runs need {need} — lower --steps/--warmup or data.batch_size", file=sys.stderr)
            return 2
        loader = measure_loader(pipe, args.steps, args.warmup, dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        _, net, _, step_fn = build_training(cfg, info, len(pipe), precision)
        net.train()
        fixed = synthetic_views(spec, bs, precision.input_dtype, dev, cfg.train.channels_last)
        model = measure_step(step_fn, lambda: fixed, args.steps, args.warmup, bs, dev)
        stages = stage_times(step_fn, fixed, dev)
        pipe.set_epoch(1)
        batches = iter(pipe)
        e2e = measure_step(step_fn, lambda: next(batches).views, args.steps, args.warmup, bs, dev)
    finally:
        shutdown()
    bottleneck, ratio, hint = verdict(loader["samples_per_s"], model["samples_per_s"], e2e["samples_per_s"],
                                      cfg.data.workers)
    result = {
        "loader_samples_per_s": loader["samples_per_s"], "model_samples_per_s": model["samples_per_s"],
        "end_to_end_samples_per_s": e2e["samples_per_s"], "ratio": ratio, "bottleneck": bottleneck, "hint": hint,
        "loader_cpu_cores": loader["cores"], "end_to_end_cpu_cores": e2e["cores"],
        "first_step_s": model["first_step_s"], **stages,
        "gpu_mem_peak_gib": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "pipeline": cfg.data.backend, "batch_size": bs, "views": spec.view_sizes(), "precision": precision.name,
        "channels_last": cfg.train.channels_last, "compile": cfg.train.compile, "workers": cfg.data.workers,
        "world_size": info.world_size, "steps": args.steps, "warmup": args.warmup,
    }
    if info.is_main:
        report(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        if args.plot:
            from tools.plots import draw_profile
            draw_profile([result], args.plot)
    return 0


def report(r: dict) -> None:
    from rich.table import Table
    from engine.logging import console
    t = Table(title=f"fasttwist profile — {r['pipeline']} pipeline on {r['device']}, batch {r['batch_size']}, "
                    f"views {r['views']}, {r['precision']}")
    t.add_column("measure")
    t.add_column("value", justify="right")
    rows = [("loader-only samples/s", f"{r['loader_samples_per_s']:.1f}"),
            ("model-only samples/s (synthetic views)", f"{r['model_samples_per_s']:.1f}"),
            ("end-to-end samples/s", f"{r['end_to_end_samples_per_s']:.1f}"),
            ("end-to-end / model-only", f"{r['ratio']:.3f}"),
            ("CPU cores busy: loader / end-to-end", f"{r['loader_cpu_cores']:.2f} / {r['end_to_end_cpu_cores']:.2f}"),
            ("first step (incl. compile) s", f"{r['first_step_s']:.2f}"),
            ("forward / backward / optimizer ms", f"{r['forward_ms']:.1f} / {r['backward_ms']:.1f} / "
                                                  f"{r['optimizer_ms']:.1f}")]
    if r["gpu_mem_peak_gib"] is not None:
        rows.append(("GPU memory peak GiB (torch allocator)", f"{r['gpu_mem_peak_gib']:.2f}"))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    console.print(f"bottleneck: {r['bottleneck']} (end-to-end/model-only = {r['ratio']:.3f}) — {r['hint']}")


if __name__ == "__main__":
    sys.exit(main())
