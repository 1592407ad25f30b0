"""evaluate.py's linear and semi protocols against transcriptions of the official files: bytedance/TWIST 796d36e
(README.md, evaluate.py, evaluate_vitlinear.py, vision_transformer.py) and elad-amrani/self-classifier 3935138
(scripts/lincls_eval.sh, src/lincls_eval.py). Values, the lr of every step, the ViT features, the LARC step."""
import math
import warnings

import pytest
import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from engine.config import Config
from engine.distributed import DistInfo
from evaluation.features import linear_features
from evaluation.finetune import Classifier, EpochCosine, FeatureBatches, fit_classifier
from evaluation.official import PROTOCOLS, fit_batch, linear_hparams, select, semi_hparams
from models.backbones import build_backbone
from tests.engine.test_lars_official import apex_larc_sgd_step

# ---- the official values, transcribed ----
# TWIST README.md 286-293: evaluate.py --weight-decay 0 --batch-size 1024 --lr-classifier 0.2; evaluate.py 64 (epochs
# 100), 148 (param group lr = args.lr_classifier: not scaled with the batch), 151 (SGD momentum 0.9).
TWIST_LINEAR = dict(epochs=100, batch=1024, lr=0.2, wd=0.0)
# TWIST evaluate_vitlinear.py 241-255 (n_last_blocks 4, avgpool_patchtokens False, epochs 100, batch_size_per_gpu
# 128), 96 (lr * batch_size_per_gpu * world_size / 256.), 98 (wd 0); README.md 298-314: --nproc_per_node=8,
# --lr 0.02 (vit_s) / 0.0015 (vit_b), no other flag.
VITLINEAR = dict(n_last_blocks=4, avgpool=False, epochs=100, per_gpu=128, gpus=8)
VIT_LR = {"vit_small": 0.02, "vit_base": 0.0015}
# self-classifier scripts/lincls_eval.sh 2-4 (--nodes=4, --gres=gpu:4, --ntasks-per-node=4), 23-30 (-b 1024
# --epochs 100 --wd 0.0 --lr 0.8 --lars --sgd --cos); src/lincls_eval.py 129-131 (world = nodes x tasks per
# node), 226 (batch_size = int(batch_size / ngpus_per_node)), 253-261 (SGD momentum 0.9, LARC trust 0.001 clip
# False), 64 (momentum default 0.9).
SC_LINCLS = dict(nodes=4, gpus_per_node=4, tasks_per_node=4, b=1024, epochs=100, wd=0.0, lr=0.8, trust=0.001)
# TWIST README.md 320-352 (--lr-backbone, --lr-classifier 0.2, --weight-decay 0, --epochs) and evaluate.py 66
# (--batch-size default 256), 202 (batch_size // world_size per process), 213 (model.train() when fine-tuning).
TWIST_SEMI = {1: dict(lr_backbone=0.04, epochs=20), 10: dict(lr_backbone=0.02, epochs=20),
              100: dict(lr_backbone=0.01, epochs=30)}


def test_selection_follows_the_official_scripts():
    assert select("twist", "resnet50") == select("twist", "resnet18") == select("twist", "resnet50w2") == "twist_resnet"
    assert select("twist", "vit_small") == "twist_vit_small" and select("twist", "vit_base") == "twist_vit_base"
    assert select("self_classifier", "resnet50") == "self_classifier"
    assert set(PROTOCOLS) == {"twist_resnet", "twist_vit_small", "twist_vit_base", "self_classifier"}


def test_linear_values_are_the_official_ones():
    hp = linear_hparams("twist_resnet")
    assert (hp.epochs, hp.global_batch, hp.weight_decay, hp.momentum, hp.optimizer, hp.n_last_blocks) == (
        TWIST_LINEAR["epochs"], TWIST_LINEAR["batch"], TWIST_LINEAR["wd"], 0.9, "sgd", 1)
    assert hp.lr_classifier * hp.global_batch / 256 == pytest.approx(TWIST_LINEAR["lr"])
    for arch, lr in VIT_LR.items():
        hp = linear_hparams(select("twist", arch))
        world_batch = VITLINEAR["per_gpu"] * VITLINEAR["gpus"]
        assert (hp.epochs, hp.global_batch, hp.n_last_blocks, hp.optimizer, hp.weight_decay) == (
            VITLINEAR["epochs"], world_batch, VITLINEAR["n_last_blocks"], "sgd", 0.0)
        assert hp.lr_classifier * hp.global_batch / 256 == pytest.approx(lr * world_batch / 256.)
    hp = linear_hparams("self_classifier")
    world = SC_LINCLS["nodes"] * SC_LINCLS["tasks_per_node"]
    global_batch = int(SC_LINCLS["b"] / SC_LINCLS["gpus_per_node"]) * world
    assert (hp.epochs, hp.global_batch, hp.weight_decay, hp.optimizer, hp.momentum) == (
        SC_LINCLS["epochs"], global_batch, SC_LINCLS["wd"], "larc", 0.9)
    assert hp.lr_classifier * hp.global_batch / 256 == pytest.approx(SC_LINCLS["lr"])        # 0.8, unscaled


@pytest.mark.parametrize("pct", sorted(TWIST_SEMI))
def test_semi_values_are_the_official_ones(pct):
    hp = semi_hparams(pct)
    assert (hp.epochs, hp.lr_backbone, hp.lr_classifier, hp.weight_decay, hp.global_batch, hp.bn, hp.sync_bn) == (
        TWIST_SEMI[pct]["epochs"], TWIST_SEMI[pct]["lr_backbone"], 0.2, 0.0, 256, "train", False)


# ---- the lr of every step ----
def twist_official_lrs(lrs, epochs, steps):
    """TWIST evaluate.py 151-152 (SGD(param_groups, 0, ...), CosineAnnealingLR(optimizer, args.epochs)), 210-224
    (the steps of an epoch), 266 (scheduler.step() once an epoch); evaluate_vitlinear.py 100, 114-118 the same
    with eta_min=0. torch's own scheduler, run in float64 python as the official loop runs it."""
    opt = torch.optim.SGD([dict(params=[nn.Parameter(torch.zeros(1))], lr=lr) for lr in lrs], 0, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    out = []
    for _ in range(epochs):
        out += [[g["lr"] for g in opt.param_groups] for _ in range(steps)]
        with warnings.catch_warnings():          # no optimizer.step() here: only the lr is read
            warnings.simplefilter("ignore")
            scheduler.step()
    return out


def sc_official_lrs(lr, epochs, steps):
    """self-classifier src/lincls_eval.py 519-524 adjust_learning_rate, called at the start of each epoch (331-332)."""
    out = []
    for epoch in range(epochs):
        cur = lr * 0.5 * (1. + math.cos(math.pi * epoch / epochs))
        out += [[cur] for _ in range(steps)]
    return out


def project_lrs(hp, samples, batch, epochs):
    """The lr of each param group at every optimizer step of the project's fit_classifier (global step hook)."""
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups]))
    try:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(samples, 4, generator=g), torch.arange(samples) % 3
        cfg = Config()
        cfg.data.batch_size = batch
        model = Classifier(nn.Linear(4, 4), 4, 3, frozen=hp.frozen)
        fit_classifier(model, FeatureBatches(x, y, batch, shuffle=True), FeatureBatches(x[:8], y[:8], 8), hp, cfg,
                       DistInfo(), show=False, global_batch=batch)
    finally:
        handle.remove()
    return seen


def same_lrs(got, want) -> bool:
    got, want = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_linear_lr_per_step_matches_the_official_schedule(protocol):
    epochs, steps = 7, 3
    hp = linear_hparams(protocol, epochs=epochs)
    b = hp.global_batch
    got = project_lrs(hp, b * steps, b, epochs)
    absolute = hp.lr_classifier * b / 256
    want = sc_official_lrs(absolute, epochs, steps) if protocol == "self_classifier" else \
        twist_official_lrs([absolute], epochs, steps)
    assert len(got) == epochs * steps
    assert same_lrs(got, want)


def test_semi_lr_per_step_matches_the_official_schedule():
    epochs, steps = 5, 4
    hp = semi_hparams(1, epochs=epochs)
    got = project_lrs(hp, 256 * steps - 100, 256, epochs)        # the last batch of each epoch is partial
    assert same_lrs(got, twist_official_lrs([0.2, 0.04], epochs, steps))


def test_self_classifier_linear_steps_as_apex_larc_around_sgd():
    torch.manual_seed(0)
    fc = nn.Linear(6, 3).double()
    ref = [p.detach().clone() for p in fc.parameters()]
    hp = linear_hparams("self_classifier", epochs=4)
    opt = EpochCosine([(fc.parameters(), hp.lr_classifier)], hp, global_batch=4096)
    bufs = [None, None]
    for epoch in range(4):
        opt.set_epoch(epoch)
        x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
        ref_fc = nn.Linear(6, 3).double()
        with torch.no_grad():
            ref_fc.weight.copy_(ref[0]), ref_fc.bias.copy_(ref[1])
        grads = torch.autograd.grad(nn.functional.cross_entropy(ref_fc(x), y), list(ref_fc.parameters()))
        opt.step(nn.functional.cross_entropy(fc(x), y))
        lr = sc_official_lrs(SC_LINCLS["lr"], 4, 1)[epoch][0]
        apex_larc_sgd_step(ref, list(grads), bufs, lr, SC_LINCLS["wd"], SC_LINCLS["trust"], 0.9)
        for p, r in zip(fc.parameters(), ref):
            assert torch.allclose(p.detach(), r, rtol=1e-5, atol=1e-9), epoch   # apex's eps 1e-8 in the trust ratio


# ---- the ViT features ----
def official_vit_features(vit, x, n):
    """TWIST vision_transformer.py 198-209 prepare_tokens (at 224 px interpolate_pos_encoding returns pos_embed,
    176-180), 230-238 get_intermediate_layers; evaluate_vitlinear.py 156-160 (avgpool False): on timm's modules."""
    B, nc, w, h = x.shape
    t = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat((vit.cls_token.expand(B, -1, -1), t), dim=1)
    t = t + vit.pos_embed
    output = []
    for i, blk in enumerate(vit.blocks):
        t = blk(t)
        if len(vit.blocks) - i <= n:
            output.append(vit.norm(t))
    return torch.cat([o[:, 0] for o in output], dim=-1)


def test_vit_linear_features_are_the_official_last_blocks_cls_tokens():
    torch.manual_seed(0)
    vit, dim = build_backbone("vit_small", depth=6)
    with torch.no_grad():
        for p in vit.parameters():                          # away from timm's init (zero biases, unit norms)
            p.add_(0.02 * torch.randn_like(p))
    vit.eval()
    net, feat_dim = linear_features(vit, dim, VITLINEAR["n_last_blocks"])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        got, want = net(x), official_vit_features(vit, x, VITLINEAR["n_last_blocks"])
    assert feat_dim == 4 * 384 and got.shape == want.shape == (2, 4 * 384)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got[:, -dim:], vit(x), atol=1e-5)        # the last block's CLS is the backbone output
    assert linear_features(vit, dim, 1) == (vit, dim)
    with pytest.raises(ValueError, match="reads a ViT's blocks"):
        linear_features(nn.Linear(2, 2), 2, 4)
    with pytest.raises(ValueError, match="has 2"):
        linear_features(build_backbone("vit_small", depth=2)[0], dim, 4)


# ---- the global batch ----
def test_global_batch_divides_over_processes_and_shrinks_to_a_small_set():
    assert fit_batch(1024, 1_281_167, 8) == (128, None)               # 1024 // 8, as `batch_size // world_size`
    assert fit_batch(256, 12_811, 8) == (32, None)
    per, note = fit_batch(256, 30, 1)                                # the demo set's 1%
    assert per == 30 and "30 training samples are fewer than the global batch 256: training with batch 30" in note
    assert fit_batch(256, 31, 2)[0] == 15
    with pytest.raises(ValueError, match="smaller than the 4 processes"):
        fit_batch(2, 100, 4)
    with pytest.raises(ValueError, match="3 training samples cannot give each of 4 processes one"):
        fit_batch(256, 3, 4)


def test_evaluate_picks_the_vit_protocol_for_a_vit_checkpoint(photo_data, tmp_path):
    """A ViT-S backbone (4 blocks, 32 px): evaluate.py trains the linear classifier on the last 4 blocks' CLS
    tokens at lr 0.02 per 256, with the 120 images as one batch (fewer than the official 1024)."""
    import json

    import evaluate
    from models.backbones import backbone_state_dict
    torch.manual_seed(0)
    torch.save(backbone_state_dict(build_backbone("vit_small", depth=4)[0]), tmp_path / "vit.pth")
    out = tmp_path / "eval.json"
    assert evaluate.main(["linear", "--checkpoint", str(tmp_path / "vit.pth"), "--config", "configs/demo.yaml",
                          "model.arch=vit_small", "model.depth=4", f"data.path={photo_data}", "data.workers=0",
                          "eval.resize=32", "eval.crop=32", "--epochs", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    d = res["details"]["linear"]
    assert res["official_protocol"] == "twist_vit_small" and d["feature_dim"] == 4 * 384
    assert d["global_batch"] == 120 and d["hparams"]["n_last_blocks"] == 4
    assert [r["lr"] for r in d["history"]] == pytest.approx([0.02 * 120 / 256, 0.02 * 120 / 256 / 2])
