"""tools/export.py: each export loads with strict=True into the library's own model (classifier removed as the
README shows) and gives the fasttwist backbone's features on the same input."""
import hashlib
import re
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from engine.config import load_config, to_dict
from evaluation.features import load_for_eval
from methods.registry import build_model
from tools.export import main

README = Path(__file__).resolve().parents[2] / "README.md"


def fasttwist_checkpoint(path: Path, arch: str) -> Path:
    """A fasttwist checkpoint of `arch` with a small head; BN statistics moved off their initial values so the
    eval-mode comparison exercises them."""
    cfg = load_config("configs/demo.yaml", [f"model.arch={arch}", "model.head_hidden=32", "model.head_dim=8"])
    torch.manual_seed(0)
    model = build_model(cfg)
    for name, buf in model.backbone.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_(0, 0.1)
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)
    torch.save({"model": model.state_dict(), "config": to_dict(cfg)}, path)
    return path


def check_export(ckpt: Path, out: Path, to: str, library_model: torch.nn.Module, size: int) -> None:
    assert main([str(ckpt), "--to", to, "--out", str(out)]) == 0
    digest, name = Path(f"{out}.sha256").read_text().split()
    assert name == out.name and digest == hashlib.sha256(out.read_bytes()).hexdigest()
    state = torch.load(out, weights_only=True)
    assert not any(k.startswith(("fc.", "head.")) for k in state)
    library_model.load_state_dict(state, strict=True)
    ours, _, _ = load_for_eval(ckpt)
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = ours.backbone.eval()(x)
        got = library_model.eval()(x)
    assert got.shape == want.shape and want.abs().mean() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_torchvision_resnet18_from_trained_run(trained_ckpt, tmp_path):
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()          # the README's two lines
    check_export(trained_ckpt, tmp_path / "backbone.pth", "torchvision", model, 32)


def test_torchvision_and_timm_resnet50(tmp_path):
    ckpt = fasttwist_checkpoint(tmp_path / "rn50.pt", "resnet50")
    model = torchvision.models.resnet50()
    model.fc = torch.nn.Identity()
    check_export(ckpt, tmp_path / "tv.pth", "torchvision", model, 32)
    check_export(ckpt, tmp_path / "timm.pth", "timm", timm.create_model("resnet50", num_classes=0), 32)


def test_timm_vit_small(tmp_path):
    ckpt = fasttwist_checkpoint(tmp_path / "vits.pt", "vit_small")
    check_export(ckpt, tmp_path / "vits.pth", "timm", timm.create_model("vit_small_patch16_224", num_classes=0),
                 224)


def test_resnet50w2_rebuilt_with_the_readme_call(tmp_path):
    """README's ResNet(...) snippet, executed as written, rebuilds the widened ResNet-50 the export loads into."""
    block = re.search(r"```python\n(# ResNet-50w2.*?)```", README.read_text(), re.S)
    assert block, "README lacks the ResNet-50w2 python block"
    code = block.group(1).split("model.load_state_dict")[0]   # the constructor, without the file load
    scope: dict = {}
    exec(code, scope)
    ckpt = fasttwist_checkpoint(tmp_path / "w2.pt", "resnet50w2")
    check_export(ckpt, tmp_path / "w2.pth", "torchvision", scope["model"], 32)


def test_arch_without_a_library_model(tmp_path, capsys):
    ckpt = fasttwist_checkpoint(tmp_path / "vits.pt", "vit_small")
    assert main([str(ckpt), "--to", "torchvision", "--out", str(tmp_path / "x.pth")]) == 2
    assert "has no torchvision model; export it with --to timm" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()
