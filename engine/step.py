"""The training step, shared by train.py and tools/profile.py. Precision, channels-last and compile are
decided here, in one place.

The step does no host synchronisation: losses come back as detached device tensors; callers call `.item()`
only at log steps.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from engine.optim import Schedule


@dataclass
class Precision:
    name: str                 # bf16 | fp16 | fp32
    dtype: torch.dtype | None  # autocast dtype, None for fp32

    @property
    def needs_scaler(self) -> bool:
        return self.name == "fp16"

    @property
    def input_dtype(self) -> torch.dtype:
        """dtype the pipeline should deliver views in: autocast would cast them to this anyway."""
        return self.dtype or torch.float32


def resolve_precision(name: str, device: torch.device) -> Precision:
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
    return Precision(name, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name])


def autocast(precision: Precision, device: torch.device):
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def prepare_model(model: nn.Module, tcfg, mcfg, device: torch.device, distributed: bool) -> nn.Module:
    """Device, memory format, SyncBN, compile, then DDP — in that order (compile before DDP). Returns the
    module to call; `engine.checkpoint.unwrap` gives back the plain one for saving."""
    if distributed and device.type == "cuda" and mcfg.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if tcfg.compile:
        model = torch.compile(model)
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    return model


class TrainStep:
    """One optimisation step: forward all views, loss, backward, clip, optimizer step. `loss_fn` maps the model's
    outputs to a dict with key 'total' (the method's objective, `models.methods.loss_fn(cfg)`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule,
                 loss_fn: Callable[..., dict], ocfg, precision: Precision, device: torch.device,
                 skip_nonfinite: bool = False):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.loss_fn, self.clip = loss_fn, ocfg.clip_grad
        self.skip_nonfinite, self.skipped = skip_nonfinite, 0
        self.precision, self.device = precision, device
        self.scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None

    def __call__(self, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        lr = self.begin(step)
        saved = self._buffers_snapshot() if self.skip_nonfinite else None
        losses = self.forward(views)
        out = {k: v.detach() for k, v in losses.items()}
        out["lr"] = torch.tensor(lr)
        if saved is not None and not torch.isfinite(out["total"]):  # opt-in: one host sync per step
            for b, old in zip(self.model.buffers(), saved):  # BN running stats saw the bad batch
                b.copy_(old)
            self.skipped += 1                      # like GradScaler's skipped steps: no update at all
            out["skipped"] = torch.tensor(float(self.skipped))
            return out
        self.backward(losses["total"])
        self.update()
        return out

    # The pieces of a step, in order; tools/profile.py times them one by one.
    def begin(self, step: int) -> float:
        lr = self.schedule.apply(self.optimizer, step)
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        with autocast(self.precision, self.device):
            outputs = self.model(views)
        return self.loss_fn(outputs)  # outside autocast: the losses upcast to fp32 themselves

    def backward(self, total: torch.Tensor) -> None:
        (self.scaler.scale(total) if self.scaler is not None else total).backward()

    def update(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self._clip()
            self.optimizer.step()

    def _buffers_snapshot(self) -> list[torch.Tensor]:
        return [b.detach().clone() for b in self.model.buffers()]

    def _clip(self) -> None:
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
