import math

import pytest
import torch
import torch.nn as nn

from engine.config import Config
from engine.distributed import DistInfo
from evaluation.official import linear_hparams, semi_hparams
from evaluation.protocols import supervised_spec
from evaluation.finetune import Classifier, ClassifierHParams, EpochCosine, FeatureBatches, History, fit_classifier


def test_official_defaults_and_overrides():
    lin = linear_hparams()
    assert (lin.epochs, lin.lr_classifier, lin.lr_backbone, lin.weight_decay, lin.momentum) == (100, 0.05, 0.0, 0.0,
                                                                                               0.9)
    assert lin.frozen and (lin.global_batch, lin.optimizer, lin.n_last_blocks) == (1024, "sgd", 1)
    assert linear_hparams("twist_vit_small", batch_size=64).global_batch == 64
    s1, s10 = semi_hparams(1), semi_hparams(10)
    assert (s1.epochs, s1.lr_classifier, s1.lr_backbone, s1.weight_decay, s1.bn, s1.global_batch) == (
        20, 0.2, 0.04, 0.0, "train", 256)
    assert s10.lr_backbone == 0.02 and not s10.frozen
    assert semi_hparams(10, epochs=3, lr_backbone=0.5).epochs == 3 and linear_hparams(lr_classifier=1.0).lr_classifier == 1.0
    with pytest.raises(ValueError, match="train-percent"):
        semi_hparams(5)
    with pytest.raises(ValueError, match="lr-backbone must be > 0"):
        semi_hparams(1, lr_backbone=0.0)
    with pytest.raises(ValueError, match="epochs"):
        linear_hparams(epochs=0)


def test_epoch_cosine_scales_with_global_batch_and_anneals_per_epoch():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = EpochCosine([(a.parameters(), 0.2), (b.parameters(), 0.04)], linear_hparams(epochs=10), global_batch=512)
    assert opt.lrs(0) == pytest.approx([0.4, 0.08])
    assert opt.lrs(5) == pytest.approx([0.2, 0.04])
    assert opt.lrs(9) == pytest.approx([0.4 * 0.5 * (1 + math.cos(math.pi * 0.9)), 0.08 * 0.5 * (1 + math.cos(
        math.pi * 0.9))])                                    # the last epoch is not 0: CosineAnnealingLR's T_max
    assert isinstance(opt.opt, torch.optim.SGD)
    assert opt.opt.param_groups[0]["momentum"] == 0.9 and opt.opt.param_groups[0]["weight_decay"] == 0.0


def test_history_reports_final_and_best():
    h = History()
    for e, (t1, t5) in enumerate([(10.0, 50.0), (40.0, 70.0), (30.0, 80.0)], 1):
        h.add(e, 1.0 / e, {"top1": t1, "top5": t5})
    s = h.summary()
    assert (s["top1"], s["top5"], s["best_top1"], s["best_top5"], s["best_epoch"]) == (30.0, 80.0, 40.0, 80.0, 2)


def test_feature_batches_shard_and_reshuffle():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    shards = [FeatureBatches(x, y, 2, rank=r, world=3) for r in range(3)]
    seen = torch.cat([b.indices for s in shards for b in s])
    assert sorted(set(seen.tolist())) == list(range(10)) and len(seen) == 12   # padded to 4 per rank
    fb = FeatureBatches(x, y, 4, shuffle=True, seed=1)
    e0 = torch.cat([b.indices for b in fb])
    fb.set_epoch(1)
    assert not torch.equal(e0, torch.cat([b.indices for b in fb]))
    fb.set_epoch(0)
    assert torch.equal(e0, torch.cat([b.indices for b in fb]))
    assert all(torch.equal(b.views[0][:, 0], b.indices.float()) for b in fb)


def _blobs(n_per, classes=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per)
    return centres[y] + 0.3 * torch.randn(len(y), dim, generator=g), y


def test_fit_on_features_learns_separable_classes():
    cfg = Config()
    cfg.data.batch_size = 16
    (xt, yt), (xv, yv) = _blobs(20), _blobs(5, seed=0)
    torch.manual_seed(0)
    model = Classifier(nn.Identity(), 8, 4, frozen=True)
    hp = ClassifierHParams(epochs=5, lr_classifier=2.0, eval_every=2)
    summary, rows = fit_classifier(model, FeatureBatches(xt, yt, 16, shuffle=True), FeatureBatches(xv, yv, 16), hp,
                                   cfg, DistInfo(), show=False)
    assert [r["epoch"] for r in rows] == [2, 4, 5]
    assert summary["top1"] == 100.0 and summary["best_top1"] == 100.0 and summary["top5"] == 100.0
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_frozen_backbone_is_untouched_and_stays_in_eval_mode():
    backbone = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model = Classifier(backbone, 8, 4, frozen=True)
    model.train()
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    cfg = Config()
    cfg.data.batch_size = 8
    (xt, yt), (xv, yv) = _blobs(8), _blobs(2)
    fit_classifier(model, FeatureBatches(xt, yt, 8, shuffle=True), FeatureBatches(xv, yv, 8),
                   ClassifierHParams(epochs=2, lr_classifier=1.0), cfg, DistInfo(), show=False)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)          # weights and BN statistics
    tuned = Classifier(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), 8, 4, frozen=False)
    w0 = tuned.backbone[0].weight.clone()
    fit_classifier(tuned, FeatureBatches(xt, yt, 8, shuffle=True), FeatureBatches(xv, yv, 8),
                   ClassifierHParams(epochs=2, lr_classifier=1.0, lr_backbone=1.0), cfg, DistInfo(), show=False)
    assert not torch.equal(w0, tuned.backbone[0].weight)


def test_supervised_view_is_crop_and_flip_only():
    spec = supervised_spec(Config())
    (g,) = spec.groups
    assert (g.count, g.size, g.scale, g.flip_p) == (1, 224, (0.08, 1.0), 0.5)
    assert g.jitter_p == g.gray_p == g.blur_p == g.solarize_p == 0.0
