"""Run output: JSONL metrics (rank 0 only), the console, and progress: a rich bar on a terminal, plain lines
in a log."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

LOG_WIDTH = 200   # tables in a log get room instead of rich's 80 columns


def make_console() -> Console:
    """The console every entry point prints through (stdout: whatever sys.stdout is when printing). Text is never
    hard-wrapped (`soft_wrap`): off a terminal (SLURM, nohup, `| tee`) each message stays one greppable line
    whatever COLUMNS and TERM say, and tables get LOG_WIDTH columns."""
    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else LOG_WIDTH)


console = make_console()


class JsonlLogger:
    """Appends one JSON line per record (None: logs nothing, as on ranks > 0). `tensorboard`: a folder where the
    same numeric scalars also go as TensorBoard events, against `step` (files only, no server, no network)."""

    def __init__(self, path: str | Path | None, tensorboard: str | Path | None = None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("train.tensorboard=true needs the tensorboard package: "
                                  "pip install -e '.[tensorboard]'") from None
            self.tb = SummaryWriter(log_dir=str(tensorboard))

    def log(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, global_step=record["step"], walltime=record.get("time"))
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def write_env(path: str | Path, world_size: int, device) -> dict:
    """What a run's numbers depend on besides its config and data: library versions, the CPU thread count and
    the device (`runs/NAME/env.json`, rank 0). Two runs that disagree are compared here first."""
    import platform
    from importlib import metadata

    import torch
    versions = {}
    for name in ("torch", "torchvision", "numpy", "pillow", "timm", "nvidia-dali-cuda130", "ffcv"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    env = {"python": platform.python_version(), "packages": versions, "torch_threads": torch.get_num_threads(),
           "world_size": world_size, "device": str(device), "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(device) if getattr(device, "type", "") == "cuda" else None}
    Path(path).write_text(json.dumps(env, indent=1) + "\n")
    return env


class LineProgress:
    """The progress bar's stand-in off a terminal: no carriage-return animation, one plain line whenever the
    caller reports (`update(..., info=...)`, at log steps), e.g. `train 25/345 epoch 1 loss -0.1935 240
    samples/s`."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.tasks = enabled, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: int, completed: int = 0, info: str = "") -> int:
        self.tasks[len(self.tasks)] = [description, total, completed]
        return len(self.tasks) - 1

    def advance(self, task: int, n: int = 1) -> None:
        self.tasks[task][2] += n

    def update(self, task: int, info: str = "") -> None:
        if self.enabled:
            name, total, done = self.tasks[task]
            console.print(f"{name} {done}/{total} {info}".rstrip(), markup=False, highlight=False)


def progress(enabled: bool = True) -> Progress | LineProgress:
    """A rich progress bar on a terminal; plain progress lines at each `update` otherwise."""
    if not console.is_terminal:
        return LineProgress(enabled)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                    disable=not enabled, transient=False)


class Throughput:
    """Samples/s between calls of `rate()`."""

    def __init__(self):
        self.t0, self.n = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.n += n

    def rate(self) -> float:
        t = time.perf_counter()
        r = self.n / max(t - self.t0, 1e-9)
        self.t0, self.n = t, 0
        return r
