"""Loading trained networks for evaluation and extracting features/predictions over a pipeline."""
from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from engine import checkpoint as ckpt
from evaluation import foreign
from engine.config import Config, apply_overrides, config_from_dict
from engine.distributed import all_gather_cat, get_rank
from engine.runlog import progress
from engine.precision import Precision, autocast
from methods.registry import build_model
from models.multicrop import MultiCropModel
from pipelines.filecheck import BadFileLog


# The keys that decide which tensors a network has and their shapes (the rest, e.g. model.drop_path, load anyway).
SHAPING_KEYS = ("method", "model.arch", "model.stem", "model.head_hidden", "model.head_dim", "model.momentum_encoder",
                "self_classifier.classes", "self_classifier.hidden_dim", "self_classifier.dim",
                "self_classifier.mlp_layers")


def mismatch(path, stored: Config, asked: Config, exc: Exception) -> str:
    """One line for a checkpoint whose network the config does not build: which keys differ, as the checkpoint
    holds them, and the overrides that fix it (torch's own message lists hundreds of tensor names)."""
    from engine.config import to_dict

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    held, want = flat(to_dict(stored)), flat(to_dict(asked))
    keys = [k for k in SHAPING_KEYS if held[k] != want[k]]
    if stored.method != "self_classifier":
        keys = [k for k in keys if not k.startswith("self_classifier.")]
    fix = " ".join(f"{k}={_shown(held[k])}" for k in keys)
    if not keys:
        why = textwrap.shorten(str(exc), 200, placeholder=" ...")   # torch lists every tensor: cut at a word
        return (f"checkpoint '{path}' does not match the network its own config builds ({why}); "
                f"re-export it or report the bug")
    return (f"checkpoint '{path}' holds {fix} but the config asks for "
            f"{' '.join(f'{k}={_shown(want.get(k))}' for k in keys)}; pass {fix} or the matching --config "
            f"(or neither: the checkpoint's own config is used)")


def _shown(v) -> str:
    return ",".join(map(str, v)).join("[]") if isinstance(v, list) else str(v)


def load_for_eval(path: str | Path, cfg: Config | None = None,
                  overrides: list[str] | None = None) -> tuple[MultiCropModel, Config, bool]:
    """(model, config, has_head). Accepts fasttwist checkpoints (config taken from the checkpoint unless one
    is given), the officially released TWIST and Self-Classifier checkpoints (`evaluation.foreign`: their model
    config is read from their layout) and plain torchvision-format backbone state_dicts (then `cfg` names the
    arch; no head).
    `overrides` (dotted keys) apply before the model is built, so `model.arch=resnet18` picks the backbone of
    a plain state_dict. Nothing but tensors and plain containers is unpickled (weights_only)."""
    with foreign.official_globals():
        state = ckpt.load(path)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint '{path}' holds a {type(state).__name__}, not a state_dict or a fasttwist "
                         f"checkpoint")
    fasttwist = "model" in state and "config" in state
    official = not fasttwist and foreign.detect(state) is not None
    if fasttwist:
        cfg = cfg or config_from_dict(state["config"])
    elif official:  # the released TWIST / Self-Classifier checkpoints: their layout mapped onto ours
        state_dict, implied = foreign.convert(state, path)
        overrides = [*implied, *(overrides or [])]
    cfg = apply_overrides(cfg or Config(), overrides)
    model = build_model(replace(cfg, self_classifier=replace(cfg.self_classifier, queue_len=0)))  # eval: no queue
    if fasttwist or official:
        try:
            model.load_state_dict({k: v for k, v in (state["model"] if fasttwist else state_dict).items()
                                   if not k.startswith("nn_queue.")})
        except RuntimeError as exc:
            stored = config_from_dict(state["config"]) if fasttwist else apply_overrides(Config(), implied)
            raise ValueError(mismatch(path, stored, cfg, exc)) from None
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


class LastBlocksCls(nn.Module):
    """A timm ViT's CLS tokens after each of its last `n` blocks, each through the final norm, concatenated:
    (N, n * embed_dim) — the official ViT linear features (TWIST evaluate_vitlinear.py: get_intermediate_layers(x,
    n), `[:, 0]` of each, torch.cat; --avgpool_patchtokens false)."""

    def __init__(self, vit: nn.Module, n: int):
        super().__init__()
        self.vit, self.n = vit, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vit.forward_intermediates(x, indices=self.n, norm=True, return_prefix_tokens=True,
                                             intermediates_only=True, output_fmt="NLC")
        return torch.cat([prefix[:, 0] for _, prefix in out], dim=-1)


def linear_features(backbone: nn.Module, feature_dim: int, n_last_blocks: int = 1) -> tuple[nn.Module, int]:
    """(network, feature dim) the linear protocol trains on: the backbone itself, or for n_last_blocks > 1 a ViT's
    last blocks' CLS tokens (`LastBlocksCls`)."""
    if n_last_blocks == 1:
        return backbone, feature_dim
    if not hasattr(backbone, "forward_intermediates"):
        raise ValueError(f"n_last_blocks={n_last_blocks} reads a ViT's blocks; this backbone is "
                         f"{type(backbone).__name__}")
    depth = len(backbone.blocks)
    if n_last_blocks > depth:
        raise ValueError(f"the official ViT linear protocol concatenates the last {n_last_blocks} blocks' CLS tokens "
                         f"but this ViT has {depth} (model.depth)")
    return LastBlocksCls(backbone, n_last_blocks), feature_dim * n_last_blocks


SCOPES = ("all", "shard", "local")


def _first_occurrences(indices: torch.Tensor) -> torch.Tensor:
    """Mask of the entries whose index appears for the first time (in the given order)."""
    order = torch.argsort(indices, stable=True)
    s = indices[order]
    first_sorted = torch.ones_like(s, dtype=torch.bool)
    first_sorted[1:] = s[1:] != s[:-1]
    first = torch.empty_like(first_sorted)
    first[order] = first_sorted
    return first


@torch.no_grad()
def gather_outputs(pipeline, fn: Callable[[torch.Tensor], dict[str, torch.Tensor]], desc: str = "features",
                   show: bool = True, scope: str = "all") -> dict[str, torch.Tensor]:
    """`fn(images)` -> {name: (N, ...) tensor} over every batch of an evaluation pipeline, plus `labels` and
    `indices`, de-duplicated by index (the sampler pads ranks to equal length), in dataset order. `scope`:
    all — every rank gets every sample (gathered); shard — each rank keeps only its own samples, each sample on
    exactly one rank (a padded duplicate stays with its first rank); local — this process's pipeline alone, no
    collectives (e.g. rank 0 on a subset while the other ranks train)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    parts: dict[str, list[torch.Tensor]] = {}
    bad = BadFileLog()    # unreadable images (each replaced by a readable one): named once
    with progress(show) as bar:
        task = bar.add_task(desc, total=len(pipeline), info="")
        for batch in pipeline:
            bad.add(batch.skipped)
            out = {k: v.float() for k, v in fn(batch.views[0]).items()}
            out.update(labels=batch.labels, indices=batch.indices)
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
            bar.advance(task)
    if not parts:
        raise ValueError(f"{desc}: the pipeline yielded no batches; check data.path and the split")
    out = {k: torch.cat(v) for k, v in parts.items()}
    if scope == "all":
        out = {k: all_gather_cat(v) for k, v in out.items()}
        keep = _first_occurrences(out["indices"])
    elif scope == "shard":
        n = out["indices"].numel()
        everyone = all_gather_cat(out["indices"])        # indices only: a few bytes a sample
        keep = _first_occurrences(everyone)[get_rank() * n:(get_rank() + 1) * n]
    else:
        keep = _first_occurrences(out["indices"])
    out = {k: v[keep] for k, v in out.items()}
    order = torch.argsort(out["indices"])
    return {k: v[order] for k, v in out.items()}


def extract(model: MultiCropModel, pipeline, device: torch.device, with_head: bool = True,
            desc: str = "features", show: bool = True, precision: Precision | None = None,
            classifier: int = 0, scope: str = "all", n_last_blocks: int = 1) -> dict[str, torch.Tensor]:
    """Backbone features (and the logits of head classifier `classifier`) for every sample of an evaluation
    pipeline, in dataset order, de-duplicated by index; `scope` (see `gather_outputs`): gathered from all
    ranks, this rank's shard, or this process alone. `precision` (default fp32) sets autocast.
    `n_last_blocks` > 1: a ViT's last blocks' CLS tokens (`linear_features`; no head)."""
    if with_head:
        model.check_classifier(classifier)
    model.eval().to(device)
    precision = precision or Precision("fp32", None)
    net, _ = linear_features(model.backbone, model.feature_dim, n_last_blocks)
    if with_head and n_last_blocks > 1:
        raise ValueError("head logits come from the backbone's output, not from n_last_blocks > 1 features")

    def fn(images: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(precision, device):
            f = net(images)
            return {"features": f, "logits": model.classifier_logits(f, classifier)} if with_head else {"features": f}

    return gather_outputs(pipeline, fn, desc, show, scope)
