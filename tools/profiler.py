"""Throughput profiler: how fast each stage goes and which one is the bottleneck. The project's one benchmarking
tool; its subcommands `loaders`, `memory`, `ops`, `files` and `flops` hold the other measurements of
BENCHMARKS.md (below).

    python tools/profiler.py --config configs/rn50_multicrop.yaml --data /data/imagenet [--pipeline torch]
                            [--steps 50] [--warmup 10] [--json out.json] [--plot p.png] [key=value ...]
    python tools/profiler.py ... --pipeline torch,pil --plot p.png    several backends, one after the other, in one
                                 figure: one bar per backend, the baseline (pil) hatched; --compare a.json,b.json
                                 adds results saved earlier with --json
    python tools/profiler.py --plot p.png --compare a.json,b.json      only draw results saved with --json
    python tools/profiler.py loaders OUT ...    conversion + loader-only throughput of every backend (BENCHMARKS.md)
    python tools/profiler.py memory --config ... --data ... --backends torch,dali   loader memory over epochs
    python tools/profiler.py ops [--compiled] [--triton] [--cuda]   the augmentation engine's launches and bytes
    python tools/profiler.py files --data ROOT [--threads 1,16]   listing + bad-file check at start-up
    python tools/profiler.py flops --config ... [--anchor-config ... --anchor-rate R]   counted work, an estimate

Measures, in one run and after warm-up (first-step/compile time reported separately):
- loader-only samples/s: every view produced and synchronised, nothing trained;
- model-only samples/s: the real training step (engine.step.TrainStep) on synthetic device-resident views of the
  same shapes and dtype — the ceiling;
- end-to-end samples/s: the real step fed by the real pipeline;
- isolated per-stage times, CPU cores busy (this process and its workers), peak GPU memory;
- on CUDA: the pipeline's own GPU memory (torch's allocator peak during the loader run, and the device's used
  memory from NVML, which also sees DALI's allocations outside torch), and host syncs per step (model-only and
  end-to-end, decode included) counted with torch.cuda.set_sync_debug_mode("warn");
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


from engine.cli import entry_point
from engine.config import load_config
from engine.distributed import init_distributed, shutdown
from engine.precision import resolve_precision
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


def device_used_bytes(device: torch.device) -> int | None:
    """Memory in use on the whole GPU (every allocator: torch's, DALI's, nvJPEG's) from NVML, or nvidia-smi when
    the NVML bindings are absent; None on CPU or when neither answers."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        import pynvml
        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    except Exception:  # bindings missing or NVML unavailable: ask the command-line tool
        import subprocess
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  "-i", str(index)], capture_output=True, text=True, timeout=10).stdout
            return int(float(out.split()[0]) * 2 ** 20)
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None


class SyncCounter:
    """Counts host synchronisations torch performs on CUDA inside the block (torch.cuda.set_sync_debug_mode
    "warn" warns once per sync); `count` stays None on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.count = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            import warnings
            self._catch = warnings.catch_warnings(record=True)
            self._seen = self._catch.__enter__()
            warnings.simplefilter("always")
            self._mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(self._mode)
            self._catch.__exit__(*exc)
            self.count = sum("synchroniz" in str(w.message) for w in self._seen)


def measure_loader(pipe, steps: int, warmup: int, device) -> dict:
    """Iterate `warmup + steps` batches of a fresh epoch; time the last `steps`. On CUDA also the pipeline's
    GPU memory: torch's allocator peak over the run and the device's used memory (NVML) above what it was
    before the first batch (DALI allocates outside torch); the peak is not reset before it is read."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    used0 = device_used_bytes(device)
    pipe.set_epoch(0)
    it = iter(pipe)
    for _ in range(warmup):
        next(it)
    n = 0
    with Clock(device) as c, SyncCounter(device) as syncs:   # the clock's own syncs stay outside
        for _ in range(steps):
            n += len(next(it))
    out = {"samples_per_s": n / c.seconds, "cores": c.cores, "seconds": c.seconds,
           "syncs_per_batch": None if syncs.count is None else syncs.count / steps,
           "torch_peak_gib": None, "device_gib": None}
    if device.type == "cuda":
        out["torch_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        used1 = device_used_bytes(device)
        if used0 is not None and used1 is not None:
            out["device_gib"] = (used1 - used0) / 2 ** 30
    return out


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
    with Clock(device) as c, SyncCounter(device) as syncs:   # the clock's own syncs stay outside
        for i in range(steps):
            step_fn(feed(), warmup + i)
    return {"samples_per_s": steps * batch / c.seconds, "cores": c.cores, "first_step_s": first,
            "syncs_per_step": None if syncs.count is None else syncs.count / steps}


def stage_times(step_fn, views, device, reps: int = 3) -> dict:
    """Forward (with the loss) / backward / optimizer times (ms) of the real step: its sections, each
    synchronised (engine.step.Sections), averaged over `reps` steps."""
    step_fn.section.ms = {}
    try:
        for r in range(reps):
            step_fn(views, 10_000 + r)
        ms = step_fn.section.ms
    finally:
        step_fn.section.ms = None
    return {f"{name}_ms": ms.get(name, 0.0) / reps for name in ("forward", "backward", "optimizer")}


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


def profile_phases(cfg, info, steps: int, warmup: int, stage_reps: int = 3):
    """`profile` one phase at a time: yields ("loader" | "model" | "end_to_end", its figures) as each finishes, so
    a caller with deadlines (tools/gpu_check.py) keeps what finished. Raises ValueError when the data gives fewer
    batches per epoch than `warmup + steps` (the loader and end-to-end runs each use a fresh epoch)."""
    dev, bs = info.device, cfg.data.batch_size
    precision = resolve_precision(cfg.train.precision, dev)
    spec = MultiCropSpec.from_config(cfg.augment)
    pipe = build_pipeline(cfg, cfg.data.train_split, info.rank, info.world_size, dev, dtype=precision.input_dtype)
    if len(pipe) < warmup + steps:
        raise ValueError(f"data.path '{cfg.data.path}' gives {len(pipe)} batches per epoch; the loader and "
                         f"end-to-end runs need {warmup + steps} each — lower --steps/--warmup or data.batch_size")
    loader = measure_loader(pipe, steps, warmup, dev)
    yield "loader", {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "pipeline": cfg.data.backend, "batch_size": bs, "views": spec.view_sizes(), "precision": precision.name,
        "channels_last": cfg.train.channels_last, "compile": cfg.train.compile, "workers": cfg.data.workers,
        "world_size": info.world_size, "steps": steps, "warmup": warmup,
        "loader_samples_per_s": loader["samples_per_s"], "loader_cpu_cores": loader["cores"],
        "pipeline_gpu_mem_torch_gib": loader["torch_peak_gib"], "pipeline_gpu_mem_device_gib": loader["device_gib"],
        "loader_syncs_per_batch": loader["syncs_per_batch"]}
    if dev.type == "cuda":                 # the pipeline's memory is read above; from here on, the model's
        torch.cuda.reset_peak_memory_stats(dev)
    _, net, _, step_fn = build_training(cfg, info, len(pipe), precision)
    net.train()
    fixed = synthetic_views(spec, bs, precision.input_dtype, dev, cfg.train.channels_last)
    model = measure_step(step_fn, lambda: fixed, steps, warmup, bs, dev)
    yield "model", {"model_samples_per_s": model["samples_per_s"], "first_step_s": model["first_step_s"],
                    "model_syncs_per_step": model["syncs_per_step"], **stage_times(step_fn, fixed, dev, stage_reps),
                    "gpu_mem_peak_gib": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None}
    pipe.set_epoch(1)
    batches = iter(pipe)
    e2e = measure_step(step_fn, lambda: next(batches).views, steps, warmup, bs, dev)
    bottleneck, ratio, hint = verdict(loader["samples_per_s"], model["samples_per_s"], e2e["samples_per_s"],
                                      cfg.data.workers)
    yield "end_to_end", {"end_to_end_samples_per_s": e2e["samples_per_s"], "ratio": ratio, "bottleneck": bottleneck,
                         "hint": hint, "end_to_end_cpu_cores": e2e["cores"],
                         "end_to_end_syncs_per_step": e2e["syncs_per_step"]}


def profile(cfg, info, steps: int, warmup: int, stage_reps: int = 3) -> dict:
    """Loader-only, model-only and end-to-end figures of one configuration, in one process (the caller has
    initialised distribution, `info`): every phase of `profile_phases`, merged."""
    out: dict = {}
    for _, figures in profile_phases(cfg, info, steps, warmup, stage_reps):
        out.update(figures)
    return out


# The other benchmarks of BENCHMARKS.md, as subcommands of this one tool: `python tools/profiler.py NAME ...`.
SUBCOMMANDS = {
    "loaders": "tools.profile_loaders",   # conversion + loader-only throughput of every backend on the same images
    "memory": "tools.profile_memory",     # loader throughput and host/GPU memory over several epochs
    "ops": "tools.profile_ops",           # the augmentation engine's launches, bytes written, host copies/syncs
    "files": "tools.profile_files",       # start-up: listing a raw folder and the dali backend's file check
    "flops": "tools.profile_flops",       # counted FLOPs and aten calls of a recipe's step, its total, a GPU estimate
}


@entry_point("profiler.py")
def main(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        import importlib
        rc = importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        return rc if isinstance(rc, int) else 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog=f"subcommands: {', '.join(SUBCOMMANDS)} (python tools/profiler.py NAME -h)")
    p.add_argument("--config", default=None, help="recipe to profile (required unless only drawing saved "
                   "results: --plot P.png --compare A.json,B.json)")
    p.add_argument("--pipeline", default=None, help="torch | pil | dali | ffcv, or several comma-separated "
                   "(profiled one after the other, side by side in --plot; default: the config's)")
    p.add_argument("--data", default=None, help="dataset root (default: the config's data.path)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results as JSON here (a list when several backends)")
    p.add_argument("--plot", default=None, help="draw the per-stage times as bars in this PNG, one bar per "
                   "backend, the baseline (the pil loader) hatched (tools/plots.py)")
    p.add_argument("--compare", default=None, metavar="A.json,B.json", help="--plot: also draw these results "
                   "saved earlier with --json (e.g. the pil baseline on the same data)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    if args.config is None:             # draw saved results only
        if not (args.plot and args.compare):
            print("profiler.py: --config is required, unless drawing saved results: --plot P.png --compare "
                  "A.json,B.json", file=sys.stderr)
            return 2
        try:
            earlier = read_results(args.compare)
        except ValueError as exc:
            print(f"profiler.py: {exc}", file=sys.stderr)
            return 2
        from tools.plots import draw_profile
        draw_profile(earlier, args.plot)
        print(f"wrote {args.plot}: {', '.join(r['pipeline'] for r in earlier)}")
        return 0
    extra = [f"data.path={args.data}"] if args.data else []
    backends = [b.strip() for b in args.pipeline.split(",") if b.strip()] if args.pipeline else [None]
    try:
        cfgs = [load_config(args.config, [*args.overrides, *extra, *([f"data.backend={b}"] if b else [])])
                for b in backends]
        earlier = read_results(args.compare)
    except ValueError as exc:          # ConfigError is one
        print(f"profiler.py: {exc}", file=sys.stderr)
        return 2
    cfg = cfgs[0]
    info = init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_min, cfg.train.threads)
    try:
        results = [profile(c, info, args.steps, args.warmup) for c in cfgs]
    except ValueError as exc:
        print(f"profiler.py: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if info.is_main:
        for result in results:
            report(result)
        if args.json:
            Path(args.json).write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        if args.plot:
            from tools.plots import draw_profile
            draw_profile([*results, *earlier], args.plot)
            print(f"wrote {args.plot}: {', '.join(r['pipeline'] for r in [*results, *earlier])}")
    return 0


def read_results(paths: str | None) -> list[dict]:
    """The results saved with --json in the comma-separated `paths` (each a result or a list of them)."""
    out: list[dict] = []
    for path in (paths or "").split(","):
        if not path.strip():
            continue
        try:
            data = json.loads(Path(path.strip()).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--compare '{path.strip()}': not a profiler result (--json) file: {exc}") from None
        for r in data if isinstance(data, list) else [data]:
            if not isinstance(r, dict) or "loader_samples_per_s" not in r:
                raise ValueError(f"--compare '{path.strip()}': not a profiler result (written by --json)")
            out.append(r)
    return out


def report(r: dict) -> None:
    from rich.table import Table
    from engine.runlog import console
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
        dev_mem = r["pipeline_gpu_mem_device_gib"]
        rows.append(("pipeline GPU memory GiB: torch peak / device (NVML)",
                     f"{r['pipeline_gpu_mem_torch_gib']:.2f} / " + ("n/a" if dev_mem is None else f"{dev_mem:.2f}")))
        rows.append(("host syncs: per loader batch / model step / end-to-end step",
                     f"{r['loader_syncs_per_batch']:.1f} / {r['model_syncs_per_step']:.1f} / "
                     f"{r['end_to_end_syncs_per_step']:.1f}"))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    console.print(f"bottleneck: {r['bottleneck']} (end-to-end/model-only = {r['ratio']:.3f}) — {r['hint']}")


if __name__ == "__main__":
    sys.exit(main())
