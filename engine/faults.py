"""Fault handling for long runs: preemption signals and non-finite losses.

- SIGTERM / SIGUSR1 (preemption, SLURM's warning signal) set a flag; the loop finishes the current step, writes a
  checkpoint and exits cleanly. Under DDP the ranks agree on the flag (all-reduce MAX) at log steps.
- Non-finite losses are tracked on the device without a host sync; `check()` (at log steps and before every
  checkpoint) raises `NonFiniteLoss`, so a poisoned model is never saved over the last good checkpoint.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteLoss(RuntimeError):
    pass


class FaultGuard:
    def __init__(self, device: torch.device, distributed: bool = False):
        self.device, self.distributed = device, distributed
        self.signal_name: str | None = None
        self._bad = torch.zeros((), dtype=torch.bool, device=device)
        self._previous = {}

    def install(self) -> None:
        """Catch the stop signals (until `restore()`)."""
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    # -- non-finite losses --------------------------------------------------------------------------
    def track(self, loss: torch.Tensor) -> None:
        self._bad |= ~torch.isfinite(loss.detach())

    def check(self, step: int, last_good: str | None) -> None:
        if bool(self._bad):  # host sync: only at log steps and before checkpoints
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
            raise NonFiniteLoss(f"loss became NaN/inf at or before step {step}; stopped without saving ({where}). "
                                f"Lower optim.lr, raise optim.warmup_epochs, use train.precision=bf16/fp32, "
                                f"or set train.skip_nonfinite=true to skip such steps")

    # -- preemption ---------------------------------------------------------------------------------
    def should_stop(self, sync_ranks: bool) -> bool:
        """True once any rank got a stop signal. Single process: every call. DDP: ranks agree only when
        `sync_ranks` (the caller passes True at log steps), to keep the hot loop free of collectives."""
        if not self.distributed:
            return self.signal_name is not None
        if not sync_ranks:
            return False
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.signal_name is None:
            self.signal_name = "peer"
        return flag.item() > 0
