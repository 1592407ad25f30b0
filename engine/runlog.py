"""Run output: JSONL metrics (rank 0 only) and a rich progress bar."""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console()


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


def progress(enabled: bool = True) -> Progress:
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
