"""The training step, shared by train.py and tools/profiler.py. Channels-last, SyncBN, compile and cuDNN's
autotuner are decided here, in one place (precision: engine/precision.py).

The step does no host synchronisation: losses come back as detached device tensors; callers call `.item()`
only at log steps.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable

import torch
import torch.nn as nn

from engine.optim import Schedule
from methods.registry import StepHooks
from engine.precision import Precision, autocast, scaled_backward, scaled_step
from models.dist import GroupBatchNorm1d, LocalBatchNorm1d, sync_bn_process_group


def convert_sync_bn(module: nn.Module, group=None) -> nn.Module:
    """SyncBatchNorm (over `group`, default all ranks) for every BatchNorm except those that already reduce over
    their own group of ranks and the head's last norm when it is per process by design (`model.head_bn=bn`; the
    official `--lbn_type bn` is `model.head_bn=bunch`). torch's SyncBatchNorm costs a host sync per layer and
    breaks compiled graphs: `model.sync_bn=false` is the fast option (per-GPU BN statistics in the backbone, 128
    samples each at the official batch)."""
    if isinstance(module, (GroupBatchNorm1d, LocalBatchNorm1d)):
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, group)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_bn(child, group))
    return module


def prepare_model(model: nn.Module, tcfg, mcfg, device: torch.device, distributed: bool) -> nn.Module:
    """Device, memory format, SyncBN, compile, then DDP — in that order (compile before DDP). Returns the
    module to call; `engine.checkpoint.unwrap` gives back the plain one for saving."""
    if tcfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS's condition for repeatable GEMMs
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    if device.type == "cuda":
        # fixed shapes per view group: autotuned convolutions (timing-dependent choices: off when deterministic)
        torch.backends.cudnn.benchmark = not tcfg.deterministic
    if distributed and device.type == "cuda" and mcfg.sync_bn:
        model = convert_sync_bn(model, sync_bn_process_group(mcfg.sync_bn_group))
    model = model.to(device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tcfg.compile:
        model = torch.compile(model, backend=tcfg.compile_backend)
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    return model


class Sections:
    """Named parts of the step (forward, backward, optimizer): `torch.profiler.record_function` ranges that any
    torch profiler trace shows, and, while `ms` is a dict (tools/profiler.py), each part's wall-clock time in ms,
    synchronised with the device so that the time is the part's own."""

    def __init__(self, device: torch.device):
        self.device, self.ms = device, None

    @contextlib.contextmanager
    def __call__(self, name: str):
        with torch.profiler.record_function(f"step.{name}"):
            if self.ms is None:
                yield
                return
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.ms[name] = self.ms.get(name, 0.0) + 1e3 * (time.perf_counter() - t0)


class TrainStep:
    """One optimisation step: lr and weight decay, forward of all views, the method's loss, backward, clip,
    optimizer step, the method's work after it. `loss_fn(outputs, inputs)` is the method's objective (a dict with
    key 'total', `methods.registry.loss_fn(cfg)`); `hooks` are the method's per-step state
    (`methods.registry.StepHooks`: the loss inputs it adds, work after the optimizer step, checkpointed state), so
    the step itself knows no method."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
                 loss_fn: Callable[..., dict], ocfg, precision: Precision, device: torch.device,
                 skip_nonfinite: bool = False, hooks: StepHooks | None = None):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.loss_fn, self.clip = loss_fn, ocfg.clip_grad
        self.skip_nonfinite, self.skipped = skip_nonfinite, 0
        self.hooks = hooks or StepHooks()
        self.precision, self.device = precision, device
        self.scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
        self.section = Sections(device)

    def __call__(self, views: list[torch.Tensor], step: int,
                 indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`indices`: the batch's dataset indices (Self-Classifier's nearest-neighbour queue uses them)."""
        lr = self.schedule.apply(self.optimizer, step)
        self.optimizer.zero_grad(set_to_none=True)
        saved = self._buffers_snapshot() if self.skip_nonfinite else None
        with self.section("forward"):
            with autocast(self.precision, self.device):
                outputs = self.model(views, indices=indices)
                inputs = self.hooks.loss_inputs(views, step)       # e.g. the momentum teacher's targets
            losses = self.loss_fn(outputs, inputs)                 # outside autocast: the losses upcast to fp32
        out = {**{k: v.detach() for k, v in losses.items()}, "lr": torch.tensor(lr)}
        if saved is not None and not torch.isfinite(out["total"]):  # opt-in: one host sync per step
            return self._skip(saved, out)
        with self.section("backward"):
            scaled_backward(losses["total"], self.scaler)
        with self.section("optimizer"):
            scaled_step(self.optimizer, self.scaler, before_step=self._clip)
            self.hooks.after_step(step)
        return out

    def _skip(self, saved: list[torch.Tensor], out: dict) -> dict:
        """No update at all for a non-finite loss (like GradScaler's skipped steps); BN running statistics that
        saw the bad batch are put back."""
        for b, old in zip(self.model.buffers(), saved):
            b.copy_(old)
        self.skipped += 1
        out["skipped"] = torch.tensor(float(self.skipped))
        return out

    def _buffers_snapshot(self) -> list[torch.Tensor]:
        return [b.detach().clone() for b in self.model.buffers()]

    def _clip(self) -> None:
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)

    def state_dict(self) -> dict:
        state = {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}
        return {**state, **self.hooks.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.hooks.load_state_dict(state)
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
