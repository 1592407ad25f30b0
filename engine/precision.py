"""Numeric precision, decided in one place for training, evaluation and profiling: the autocast dtype, the
dtype pipelines deliver views in, and the fp16 gradient scaler's backward/step."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch


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


def scaled_backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """`loss.backward()`, through the fp16 GradScaler when there is one."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def scaled_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                before_step: Callable[[], None] | None = None) -> None:
    """`optimizer.step()`; with a GradScaler the gradients are unscaled first (so `before_step`, e.g. gradient
    clipping, sees true gradients) and the step is skipped on inf/nan, as GradScaler does."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if before_step is not None:
        before_step()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
