"""Loader-only throughput and memory of data backends over several epochs, side by side in one run.

    python tools/profiler.py memory --config configs/demo.yaml --data data/demo --backends torch,dali \
        --epochs 3 [key=value ...]

Per backend and epoch: batches and samples seen (a skipped or short epoch shows here), samples/s with every view
produced (and synchronised on a GPU), this process's resident memory after the epoch (DataLoader worker
processes are not included) and, on a GPU, the device memory in use by the whole process from NVML/nvidia-smi
(DALI allocates outside torch's allocator, so torch's own counters miss it).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch


from engine.config import ConfigError, load_config
from pipelines import build_pipeline


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def gpu_used_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                              f"--id={device.index or 0}"], capture_output=True, text=True, timeout=30)
        return float(out.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def bench(cfg, epochs: int, device: torch.device) -> list[dict]:
    pipe = build_pipeline(cfg, cfg.data.train_split, device=device)
    rows = []
    for epoch in range(epochs):
        pipe.set_epoch(epoch)
        t0, n, steps = time.perf_counter(), 0, 0
        for batch in pipe:
            n += len(batch)
            steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        rows.append({"epoch": epoch, "steps": steps, "expected_steps": len(pipe), "samples": n,
                     "samples_per_s": n / dt, "rss_mib": rss_mib(), "gpu_used_mib": gpu_used_mib(device)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="profiler.py memory", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--backends", default="torch,dali")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev, 0) if dev == "cuda" else torch.device("cpu")
    for backend in args.backends.split(","):
        try:
            cfg = load_config(args.config, [*args.overrides, f"data.backend={backend}"] +
                              ([f"data.path={args.data}"] if args.data else []))
        except ConfigError as exc:
            print(f"profiler.py memory: {exc}", file=sys.stderr)
            return 2
        for r in bench(cfg, args.epochs, device):
            gpu = f"  gpu {r['gpu_used_mib']:.0f} MiB" if r["gpu_used_mib"] is not None else ""
            print(f"{backend:6s} epoch {r['epoch']}: {r['steps']}/{r['expected_steps']} steps, {r['samples']} samples, "
                  f"{r['samples_per_s']:8.1f} samples/s, rss {r['rss_mib']:7.1f} MiB{gpu}", flush=True)
    return 0

