"""The semi-supervised protocol on a pretrained checkpoint with a tiny label set: stable with `--bn frozen`
(evaluation/official.py semi_hparams explains why the official train-mode BN is not on such a set), and at least
as good as a linear probe on the same labels."""
import json

import evaluate

def _run(argv, out):
    assert evaluate.main([*argv, "--out", str(out)]) == 0
    return json.loads(out.read_text())

def test_semi_fine_tuning_is_stable_and_no_worse_than_a_linear_probe(trained_ckpt, photo_data, tmp_path):
    common = ["--checkpoint", str(trained_ckpt), f"data.path={photo_data}", "data.workers=0", "data.batch_size=40"]
    semi = _run(["semi", "--train-percent", "100", "--epochs", "15", "--bn", "frozen", "--batch-size", "40",
                 *common], tmp_path / "semi.json")
    probe = _run(["linear", "--cached-features", *common], tmp_path / "linear.json")   # same 120 labels, frozen
    rows = semi["details"]["semi"]["history"]

    assert semi["details"]["semi"]["hparams"]["bn"] == "frozen"
    chance = 100.0 / 10
    assert all(r["top1"] > 2 * chance for r in rows[1:]), [r["top1"] for r in rows]   # never back to chance
    assert semi["metrics"]["semi100_top1"] >= probe["metrics"]["linear_cached_top1"] - 1.0

def test_frozen_bn_keeps_running_statistics_while_weights_fine_tune():
    import torch
    import torch.nn as nn

    from engine.config import Config
    from engine.distributed import DistInfo
    from evaluation.finetune import Classifier, ClassifierHParams, FeatureBatches, fit_classifier
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 8, generator=g) * 3 + 1, torch.arange(4).repeat(8)
    cfg = Config()
    cfg.data.batch_size = 8
    for bn, stats_move in (("frozen", False), ("train", True)):
        torch.manual_seed(0)
        net = Classifier(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), 8, 4, frozen=False,
                         frozen_bn=bn == "frozen")
        before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
        hp = ClassifierHParams(epochs=1, lr_classifier=0.5, lr_backbone=0.5, bn=bn)
        fit_classifier(net, FeatureBatches(x, y, 8, shuffle=True), FeatureBatches(x, y, 8), hp, cfg, DistInfo(),
                       show=False)
        after = net.backbone.state_dict()
        assert not torch.equal(before["0.weight"], after["0.weight"]) and not torch.equal(before["1.weight"],
                                                                                           after["1.weight"])
        assert (not torch.equal(before["1.running_mean"], after["1.running_mean"])) == stats_move, bn
