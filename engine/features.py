"""Loading trained networks for evaluation and extracting features/predictions over a pipeline."""
from __future__ import annotations

from pathlib import Path

import torch

from engine import checkpoint as ckpt
from engine.config import Config, config_from_dict
from engine.distributed import all_gather_cat
from engine.logging import progress
from models.methods import build_model
from models.multicrop import MultiCropModel


def load_for_eval(path: str | Path, cfg: Config | None = None) -> tuple[MultiCropModel, Config, bool]:
    """(model, config, has_head). Accepts fasttwist checkpoints (config taken from the checkpoint unless one
    is given) and plain torchvision-format backbone state_dicts (then `cfg` names the arch; no head)."""
    state = ckpt.load(path)
    if "model" in state and "config" in state:
        cfg = cfg or config_from_dict(state["config"])
        model = build_model(cfg)
        model.load_state_dict(state["model"])
        return model, cfg, True
    cfg = cfg or Config()
    sd = state.get("state_dict", state)
    sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    model = build_model(cfg)
    missing, unexpected = model.backbone.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint '{path}' does not match model.arch={cfg.model.arch}: "
                         f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]}); set model.arch to the backbone it holds")
    return model, cfg, False


@torch.no_grad()
def extract(model: MultiCropModel, pipeline, device: torch.device, with_head: bool = True,
            desc: str = "features", show: bool = True, classifier: int = 0) -> dict[str, torch.Tensor]:
    """Backbone features (and the logits of head classifier `classifier`) for every sample of an evaluation
    pipeline, in dataset order, gathered from all ranks and de-duplicated by index."""
    if with_head:
        model.check_classifier(classifier)
    model.eval().to(device)
    feats, logits, labels, idx = [], [], [], []
    with progress(show) as bar:
        task = bar.add_task(desc, total=len(pipeline), info="")
        for batch in pipeline:
            f = model.backbone(batch.views[0])
            feats.append(f.float())
            if with_head:
                logits.append(model.classifier_logits(f, classifier).float())
            labels.append(batch.labels)
            idx.append(batch.indices)
            bar.advance(task)
    out = {"features": torch.cat(feats), "labels": torch.cat(labels), "indices": torch.cat(idx)}
    if with_head:
        out["logits"] = torch.cat(logits)
    out = {k: all_gather_cat(v) for k, v in out.items()}
    order = torch.argsort(out["indices"])
    keep = torch.ones_like(order, dtype=torch.bool)
    sorted_idx = out["indices"][order]
    keep[1:] = sorted_idx[1:] != sorted_idx[:-1]
    return {k: v[order][keep] for k, v in out.items()}
