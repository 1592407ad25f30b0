"""Data pipelines. Every backend yields `Batch(views=[g1, g2, l1..lN], labels, indices)`.

    pipe = build_pipeline(cfg, "train", rank, world_size)   # multi-crop training views
    pipe = build_pipeline(cfg, "val", rank, world_size, train=False)   # one centre-crop view
    for epoch in ...: pipe.set_epoch(epoch); for batch in pipe: ...
"""
from __future__ import annotations

import torch

from pipelines.batch import Batch
from pipelines.spec import MultiCropSpec, ViewGroup

BACKENDS = ("torch", "pil", "dali", "ffcv")   # data.backend

__all__ = ["BACKENDS", "Batch", "MultiCropSpec", "ViewGroup", "augment_on_device", "build_pipeline"]


def augment_on_device(cfg, device: torch.device) -> bool:
    """Where the multi-crop engine runs (`data.augment_device`): on the GPU when training on one (auto), else
    on the CPU, inside the loader's workers."""
    return device.type == "cuda" and cfg.data.augment_device in ("auto", "cuda")


def build_pipeline(cfg, split: str, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                   train: bool = True, spec: MultiCropSpec | None = None, dtype: torch.dtype = torch.float32,
                   subset: list[int] | None = None):
    """The pipeline for `cfg.data.backend`. `len()` is steps per epoch for this rank; `set_epoch(e)` reshuffles
    with `cfg.train.seed`. Training views come in `dtype` (the training step's input dtype). `subset`: only
    these sample positions of the split (e.g. a semi-supervised label subset; torch backend); `Batch.indices`
    then count within the subset."""
    device = device or torch.device("cpu")
    backend = cfg.data.backend
    if backend == "torch":
        from pipelines.torch_backend import build_torch_pipeline
        return build_torch_pipeline(cfg, split, rank, world_size, device, train, spec, dtype, subset)
    if subset is not None:
        raise ValueError(f"label subsets are read through data.backend=torch; got data.backend={backend}")
    if backend == "pil":
        if not train:
            raise ValueError("data.backend=pil is a training-time baseline; evaluate with data.backend=torch")
        from pipelines.pil_backend import build_pil_pipeline
        return build_pil_pipeline(cfg, split, rank, world_size, device, spec, dtype)
    if backend == "dali":
        from pipelines.dali_backend import build_dali_pipeline
        return build_dali_pipeline(cfg, split, rank, world_size, device, train, spec, dtype)
    if backend == "ffcv":
        from pipelines.ffcv_backend import build_ffcv_pipeline
        return build_ffcv_pipeline(cfg, split, rank, world_size, device, train, spec, dtype)
    raise ValueError(f"data.backend '{backend}' is not one of {', '.join(BACKENDS)}")
