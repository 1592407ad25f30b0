"""The officially released TWIST and Self-Classifier checkpoints, read into fasttwist models.

TWIST (github.com/bytedance/TWIST, train.py) saves {'model', 'backbone', 'optimizer', 'epoch', 'args', ...}:
`model` holds `backbone.*` (a torchvision ResNet, SwAV's resnet50w2 or a DINO-style ViT whose names are timm's)
and `projection_heads.projection_head.{0,1,4,5}.*` (Linear, BN, ReLU, Dropout, Linear, BN, ReLU),
`projection_heads.last_linear.*`, `projection_heads.norm.*` (the last BN, affine=False); `args` is the
argparse.Namespace of the run (backbone, dim, hid_dim, act). Its "backbone only" download is a plain backbone
state_dict, which `evaluation.features.load_for_eval` reads as any torchvision-format backbone.

Self-Classifier (github.com/elad-amrani/self-classifier, src/train.py) saves {'epoch', 'arch', 'state_dict',
'best_loss', 'nn_queue', 'optimizer'}: `state_dict` comes from the DDP module, `module.backbone.*`,
`module.mlp_head.mlp.{0,1,3}.*` (Linear, BN, LeakyReLU, Linear with --use-bn), `module.cls_<i>.weight_{g,v}`
(weight-normalised classifiers); `nn_queue` is a `utils.NNQueue` object (tensors), read as an inert record.

Loading stays `weights_only`: only argparse.Namespace and that queue record are admitted besides tensors.
"""
from __future__ import annotations

import argparse
import contextlib
import re

import torch

_TWIST_MLP = {"0": "0", "1": "1", "4": "3", "5": "4"}   # official Sequential index -> ours (no Dropout)
_TWIST_ARCHS = ("resnet18", "resnet50", "resnet50w2", "vit_small", "vit_base")   # same names as ours


class QueueRecord:
    """Stand-in for Self-Classifier's `utils.NNQueue` when unpickling: keeps its attributes, runs no code."""


@contextlib.contextmanager
def official_globals():
    """Admit the two non-tensor objects the official checkpoints pickle to a weights_only load."""
    with torch.serialization.safe_globals([argparse.Namespace, (QueueRecord, "utils.NNQueue")]):
        yield


def detect(state: dict) -> str | None:
    """'twist' | 'self_classifier' for an official full checkpoint, None otherwise."""
    model = state.get("model")
    if isinstance(model, dict) and any(k.startswith("projection_heads.") for k in model):
        return "twist"
    sd = state.get("state_dict")
    if isinstance(sd, dict) and any(re.match(r"(module\.)?cls_\d+\.weight_v$", k) for k in sd):
        return "self_classifier"
    return None


def convert(state: dict, path) -> tuple[dict, list[str]]:
    """(fasttwist model state_dict, config overrides that rebuild the matching model) of an official
    checkpoint. The overrides come before the user's, so `model.arch=...` etc. can still correct them."""
    kind = detect(state)
    if kind == "twist":
        return _twist(state, path)
    if kind == "self_classifier":
        return _self_classifier(state, path)
    raise ValueError(f"checkpoint '{path}' is neither an official TWIST nor Self-Classifier checkpoint")


def _twist(state: dict, path) -> tuple[dict, list[str]]:
    out = {}
    for k, v in state["model"].items():
        if k.startswith("backbone."):
            if not k.startswith("backbone.fc."):
                out[k] = v
            continue
        k = k.removeprefix("projection_heads.")
        m = re.match(r"projection_head\.(\d+)\.(.+)$", k)
        if m:
            if m.group(1) not in _TWIST_MLP:
                raise ValueError(f"checkpoint '{path}': unexpected TWIST head layer {k}; only the default "
                                 f"projection head (Linear-BN-ReLU-Dropout x2, proj_norm=bn) is supported")
            out[f"head.mlp.{_TWIST_MLP[m.group(1)]}.{m.group(2)}"] = v
        else:
            out[f"head.{k}"] = v
    args = state.get("args")
    # the last BN (lbn_type bn/syncbn) evaluates from its running statistics; lbn_type=identity saved none
    overrides = ["method=twist", f"model.head_bn={'bn' if 'head.norm.running_mean' in out else 'identity'}"]
    hid, dim = out["head.mlp.0.weight"].shape[0], out["head.last_linear.weight"].shape[0]
    overrides += [f"model.head_hidden={hid}", f"model.head_dim={dim}"]
    if args is not None:
        arch = getattr(args, "backbone", None)
        if arch not in _TWIST_ARCHS:
            raise ValueError(f"checkpoint '{path}': TWIST backbone '{arch}' has no fasttwist counterparts; "
                             f"supported: {', '.join(_TWIST_ARCHS)}")
        overrides += [f"model.arch={arch}", f"model.head_act={getattr(args, 'act', 'relu')}"]
    return out, overrides


def _self_classifier(state: dict, path) -> tuple[dict, list[str]]:
    out, classes = {}, {}
    for k, v in state["state_dict"].items():
        k = k.removeprefix("module.")
        if k.startswith("backbone."):
            if not k.startswith("backbone.fc."):
                out[k] = v
        elif k.startswith("mlp_head.mlp."):
            out["head.mlp." + k.removeprefix("mlp_head.mlp.")] = v
        elif m := re.match(r"cls_(\d+)\.(weight_[gv])$", k):
            out[f"head.classifiers.{m.group(1)}.{m.group(2)}"] = v
            if m.group(2) == "weight_v":
                classes[int(m.group(1))] = v.shape
        else:
            raise ValueError(f"checkpoint '{path}': unexpected Self-Classifier key '{k}'")
    for p in ("weight", "bias"):  # one Linear (--num-hidden 1) is stored as `mlp.weight`; ours is `mlp.0.weight`
        if f"head.mlp.{p}" in out:
            out[f"head.mlp.0.{p}"] = out.pop(f"head.mlp.{p}")
    linears = sorted(int(k.split(".")[2]) for k, v in out.items()
                     if k.startswith("head.mlp.") and k.endswith(".weight") and v.dim() == 2)
    if linears and linears != [3 * i for i in range(len(linears))]:
        raise ValueError(f"checkpoint '{path}': the MLP head was trained without --use-bn; fasttwist's "
                         f"Self-Classifier head has a BatchNorm after each hidden Linear")
    shapes = [classes[i] for i in sorted(classes)]
    overrides = ["method=self_classifier", f"self_classifier.classes=[{','.join(str(s[0]) for s in shapes)}]",
                 f"self_classifier.dim={shapes[0][1]}", f"self_classifier.mlp_layers={len(linears)}"]
    if len(linears) > 1:
        overrides.append(f"self_classifier.hidden_dim={out['head.mlp.0.weight'].shape[0]}")
    arch = state.get("arch")
    if arch:
        overrides.append(f"model.arch={arch}")
    return out, overrides
