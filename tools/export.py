"""Export a trained backbone as a plain state_dict for torchvision or timm, with its sha256 beside it.

    python tools/export.py runs/NAME/checkpoint.pt --to torchvision|timm --out backbone.pth

The file holds the backbone's tensors only (no classifier: `fc.*` / `head.*` are absent), in the library's own
names, so it loads with strict=True once the classifier is removed:

    torchvision: model = torchvision.models.resnet50(); model.fc = torch.nn.Identity()
    timm:        model = timm.create_model('resnet50', num_classes=0)   # or vit_small_patch16_224, ...
    then:        model.load_state_dict(torch.load('backbone.pth'), strict=True)

ResNet-50w2 (SwAV's / TWIST's widened ResNet-50) has no constructor in either library: it exports to torchvision
names, and README shows the `torchvision.models.resnet.ResNet(...)` call that rebuilds it. `backbone.pth.sha256`
is in `sha256sum -c` format. Accepts whatever evaluate.py reads (fasttwist checkpoints, the released TWIST and
Self-Classifier checkpoints).
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

from engine.cli import entry_point

TIMM_NAMES = {"resnet18": "resnet18", "resnet50": "resnet50", "vit_small": "vit_small_patch16_224",
              "vit_base": "vit_base_patch16_224"}
TORCHVISION_NAMES = {"resnet18": "resnet18", "resnet50": "resnet50", "resnet50w2": "ResNet(...) (see README)"}


def library_model(arch: str, to: str) -> str:
    """The torchvision/timm model an export of `arch` loads into; ValueError when there is none."""
    names = TORCHVISION_NAMES if to == "torchvision" else TIMM_NAMES
    if arch not in names:
        other = "timm" if to == "torchvision" else "torchvision"
        raise ValueError(f"model.arch={arch} has no {to} model; export it with --to {other}")
    return names[arch]


def export(checkpoint: str | Path, to: str, out: str | Path, overrides: list[str] | None = None) -> dict:
    """Write the backbone state_dict to `out` and `out`.sha256; return a summary."""
    from evaluation.features import load_for_eval
    from models.backbones import backbone_state_dict
    model, cfg, _ = load_for_eval(checkpoint, overrides=overrides)
    target = library_model(cfg.model.arch, to)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
             for k, v in backbone_state_dict(model.backbone).items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    Path(f"{out}.sha256").write_text(f"{digest}  {out.name}\n")
    return {"arch": cfg.model.arch, "to": to, "model": target, "tensors": len(state), "out": str(out),
            "sha256": digest, "params": sum(v.numel() for k, v in state.items() if "running" not in k)}


@entry_point("export.py")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="fasttwist checkpoint (or a released TWIST / Self-Classifier one)")
    p.add_argument("--to", required=True, choices=("torchvision", "timm"), help="naming of the target library")
    p.add_argument("--out", required=True, help="state_dict file to write (a .sha256 file goes beside it)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.arch=resnet50 for a plain "
                   "backbone state_dict")
    args = p.parse_intermixed_args(argv)
    r = export(args.checkpoint, args.to, args.out, args.overrides)
    print(f"wrote {r['out']}: {r['arch']} backbone, {r['tensors']} tensors, {r['params'] / 1e6:.1f} M parameters, "
          f"for {r['to']} {r['model']} without its classifier; sha256 {r['sha256'][:16]}... in {r['out']}.sha256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
