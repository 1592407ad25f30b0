"""The released TWIST and Self-Classifier checkpoints (evaluation/foreign.py): tiny fakes with their key layouts
(transcribed from bytedance/TWIST train.py and elad-amrani/self-classifier src/model.py, src/train.py) load into
the right tensors, and the loaded heads compute what the official modules compute."""
import argparse
import sys
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from evaluation.features import load_for_eval


def _randomise(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.1)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return module.eval()


class OfficialTwistHead(nn.Module):
    """TWIST's ProjectionHead (lbn_type=bn on one process, proj_norm=bn, act=relu): module names as saved."""

    def __init__(self, feature_dim, hid, dim):
        super().__init__()
        self.projection_head = nn.Sequential(nn.Linear(feature_dim, hid), nn.BatchNorm1d(hid), nn.ReLU(),
                                             nn.Dropout(0.0), nn.Linear(hid, hid), nn.BatchNorm1d(hid), nn.ReLU())
        self.last_linear = nn.Linear(hid, dim)
        self.norm = nn.BatchNorm1d(dim, affine=False)

    def forward(self, x):
        return self.norm(self.last_linear(self.projection_head(x)))


class OfficialTwist(nn.Module):
    def __init__(self, hid=32, dim=8):
        super().__init__()
        self.backbone = torchvision.models.resnet18()
        self.backbone.fc = nn.Identity()
        self.projection_heads = OfficialTwistHead(512, hid, dim)


def test_official_twist_checkpoint(tmp_path):
    official = _randomise(OfficialTwist())
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(backbone="resnet18", dim=8, hid_dim=32, act="relu", lbn_type="bn")
    torch.save({"model": official.state_dict(), "backbone": official.backbone.state_dict(), "optimizer": {},
                "epoch": 3, "args": args}, path)
    model, cfg, has_head = load_for_eval(path)
    assert has_head and cfg.method == "twist" and cfg.model.arch == "resnet18"
    assert (cfg.model.head_hidden, cfg.model.head_dim) == (32, 8)
    assert torch.equal(model.head.mlp[3].weight, official.projection_heads.projection_head[4].weight)
    assert torch.equal(model.head.norm.running_var, official.projection_heads.norm.running_var)
    assert torch.equal(model.backbone.layer4[1].bn2.running_mean, official.backbone.layer4[1].bn2.running_mean)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = official.projection_heads(official.backbone(x))
        got = model.eval().classifier_logits(model.backbone(x))
    torch.testing.assert_close(got, want)


class NNQueue:
    """What Self-Classifier pickles into its checkpoints (utils.NNQueue): tensors and counters."""

    def __init__(self, n=16, dim=8):
        self.queue, self.queue_targets = torch.randn(n, dim), torch.zeros(n)
        self.queue_indices, self.ptr, self.full = torch.zeros(n, dtype=torch.long), 3, False


class OfficialSelfClassifier(nn.Module):
    """Self-Classifier's Model with --use-bn --num-hidden 2 (names as saved; DDP adds `module.`)."""

    def __init__(self, hidden=32, dim=8, classes=(5, 7)):
        super().__init__()
        self.backbone = torchvision.models.resnet18()
        self.backbone.fc = nn.Identity()
        self.mlp_head = nn.Module()
        self.mlp_head.mlp = nn.Sequential(nn.Linear(512, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(),
                                          nn.Linear(hidden, dim))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i, c in enumerate(classes):
                setattr(self, f"cls_{i}", nn.utils.weight_norm(nn.Linear(dim, c, bias=False)))

    def logits(self, x, i):
        z = F.normalize(self.mlp_head.mlp(self.backbone(x)), dim=1, eps=1e-7)
        return getattr(self, f"cls_{i}")(z)


def test_official_self_classifier_checkpoint(tmp_path, monkeypatch):
    official = _randomise(OfficialSelfClassifier())
    utils = types.ModuleType("utils")
    utils.NNQueue = NNQueue
    NNQueue.__module__ = "utils"
    monkeypatch.setitem(sys.modules, "utils", utils)
    path = tmp_path / "model_800ep.pth.tar"
    state = {f"module.{k}": v for k, v in official.state_dict().items()}
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": state, "best_loss": 1.0, "nn_queue": NNQueue(),
                "optimizer": {}}, path)
    monkeypatch.delitem(sys.modules, "utils")     # loading needs none of the official code
    model, cfg, has_head = load_for_eval(path)
    assert has_head and cfg.method == "self_classifier" and cfg.model.arch == "resnet18"
    sc = cfg.self_classifier
    assert (sc.classes, sc.dim, sc.hidden_dim, sc.mlp_layers) == ((5, 7), 8, 32, 2)
    assert torch.equal(model.head.classifiers[1].weight_v, official.cls_1.weight_v)
    assert torch.equal(model.head.mlp[1].running_var, official.mlp_head.mlp[1].running_var)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        for i in range(2):
            torch.testing.assert_close(model.classifier_logits(model.backbone(x), i), official.logits(x, i))


def test_self_classifier_without_bn_is_refused(tmp_path):
    state = {"module.mlp_head.mlp.0.weight": torch.zeros(4, 512), "module.mlp_head.mlp.2.weight": torch.zeros(8, 4),
             "module.cls_0.weight_v": torch.zeros(5, 8), "module.cls_0.weight_g": torch.ones(5, 1)}
    path = tmp_path / "nobn.pth.tar"
    torch.save({"arch": "resnet18", "state_dict": state}, path)
    with pytest.raises(ValueError, match="without --use-bn"):
        load_for_eval(path)
