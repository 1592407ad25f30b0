"""Loading trained networks for evaluation and extracting features/predictions over a pipeline."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from engine import checkpoint as ckpt
from engine.config import Config, apply_overrides, config_from_dict
from engine.distributed import all_gather_cat
from engine.logging import progress
from engine.step import Precision, autocast
from models.methods import build_model
from models.multicrop import MultiCropModel


def load_for_eval(path: str | Path, cfg: Config | None = None,
                  overrides: list[str] | None = None) -> tuple[MultiCropModel, Config, bool]:
    """(model, config, has_head). Accepts fasttwist checkpoints (config taken from the checkpoint unless one
    is given) and plain torchvision-format backbone state_dicts (then `cfg` names the arch; no head).
    `overrides` (dotted keys) apply before the model is built, so `model.arch=resnet18` picks the backbone of
    a plain state_dict. Nothing but tensors and plain containers is unpickled (weights_only)."""
    state = ckpt.load(path)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint '{path}' holds a {type(state).__name__}, not a state_dict or a fasttwist "
                         f"checkpoint")
    fasttwist = "model" in state and "config" in state
    if fasttwist:
        cfg = cfg or config_from_dict(state["config"])
    cfg = apply_overrides(cfg or Config(), overrides)
    model = build_model(replace(cfg, self_classifier=replace(cfg.self_classifier, queue_len=0)))  # eval: no queue
    if fasttwist:
        try:
            model.load_state_dict({k: v for k, v in state["model"].items() if not k.startswith("nn_queue.")})
        except RuntimeError as exc:
            raise ValueError(f"checkpoint '{path}' does not match the model config ({' '.join(str(exc).split())[:160]}); "
                             f"drop model.* overrides or the --config that changes the architecture") from None
        return model, cfg, True
    sd = state.get("state_dict", state)
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    hint = f"checkpoint '{path}' does not match model.arch={cfg.model.arch}"
    try:
        missing, unexpected = model.backbone.load_state_dict(sd, strict=False)
    except RuntimeError:  # same names, other shapes
        raise ValueError(f"{hint}: tensor shapes differ; set model.arch to the backbone it holds") from None
    if missing or unexpected:
        raise ValueError(f"{hint}: {len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]}); set model.arch to the backbone it holds")
    return model, cfg, False


@torch.no_grad()
def gather_outputs(pipeline, fn: Callable[[torch.Tensor], dict[str, torch.Tensor]], desc: str = "features",
                   show: bool = True) -> dict[str, torch.Tensor]:
    """`fn(images)` -> {name: (N, ...) tensor} over every batch of an evaluation pipeline, plus `labels` and
    `indices`; gathered from all ranks, de-duplicated by index (the sampler pads ranks to equal length) and
    returned in dataset order."""
    parts: dict[str, list[torch.Tensor]] = {}
    with progress(show) as bar:
        task = bar.add_task(desc, total=len(pipeline), info="")
        for batch in pipeline:
            out = {k: v.float() for k, v in fn(batch.views[0]).items()}
            out.update(labels=batch.labels, indices=batch.indices)
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
            bar.advance(task)
    if not parts:
        raise ValueError(f"{desc}: the pipeline yielded no batches; check data.path and the split")
    out = {k: all_gather_cat(torch.cat(v)) for k, v in parts.items()}
    order = torch.argsort(out["indices"])
    keep = torch.ones_like(order, dtype=torch.bool)
    sorted_idx = out["indices"][order]
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]
    return {k: v[order][keep] for k, v in out.items()}


def extract(model: MultiCropModel, pipeline, device: torch.device, with_head: bool = True,
            desc: str = "features", show: bool = True, precision: Precision | None = None,
            classifier: int = 0) -> dict[str, torch.Tensor]:
    """Backbone features (and the logits of head classifier `classifier`) for every sample of an evaluation
    pipeline, in dataset order, gathered from all ranks and de-duplicated by index. `precision` (default fp32)
    sets autocast."""
    if with_head:
        model.check_classifier(classifier)
    model.eval().to(device)
    precision = precision or Precision("fp32", None)

    def fn(images: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(precision, device):
            f = model.backbone(images)
            return {"features": f, "logits": model.classifier_logits(f, classifier)} if with_head else {"features": f}

    return gather_outputs(pipeline, fn, desc, show)
