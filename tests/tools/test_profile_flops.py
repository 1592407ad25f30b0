import re

import pytest

from engine.config import load_config
from tools.profile_flops import main, step_work

SMALL_HEAD = ["model.head_hidden=16", "model.head_dim=8", "model.head_bn=bn"]


def test_resnet50_counts_what_torchvision_publishes_per_view():
    """torchvision's ResNet-50 card: 4.09 G multiply-adds at 224 px, i.e. ~8.2 GFLOPs; two global views per sample
    (a head of a few thousand FLOPs beside them) count twice that, and a training step ~3x the forward."""
    cfg = load_config("configs/demo.yaml", ["model.arch=resnet50", "augment.num_local=0", "augment.global_size=224",
                                            *SMALL_HEAD])
    work = step_work(cfg, batch=2)
    assert work["views"] == [224, 224]
    assert work["forward_gflops_per_sample"] == pytest.approx(2 * 8.18, rel=0.01)
    assert 2.8 < work["step_gflops_per_sample"] / work["forward_gflops_per_sample"] < 3.1
    assert work["aten_calls_per_step"] > 100


def test_views_add_their_pixels():
    base = ["model.arch=resnet18", "augment.global_size=32", *SMALL_HEAD]
    two = step_work(load_config("configs/demo.yaml", [*base, "augment.num_local=0"]), batch=2)
    four = step_work(load_config("configs/demo.yaml", [*base, "augment.num_local=2", "augment.local_size=32"]),
                     batch=2)
    assert four["views"] == [32, 32, 32, 32]
    assert four["forward_gflops_per_sample"] == pytest.approx(2 * two["forward_gflops_per_sample"], rel=0.01)


def test_total_and_estimate_follow_from_the_counts(capsys):
    """With the recipe as its own anchor, the estimate is the samples trained over the anchor's rate, exactly."""
    args = ["--config", "configs/demo.yaml", "--samples", "1000", "--batch", "2", "model.arch=resnet18",
            "augment.global_size=32", "augment.num_local=0", "train.epochs=3", "data.batch_size=100", *SMALL_HEAD]
    anchor = ",".join(["model.arch=resnet18", "augment.global_size=32", "augment.num_local=0", *SMALL_HEAD])
    assert main([*args, "--anchor-config", "configs/demo.yaml", "--anchor-overrides", anchor,
                 "--anchor-rate", "500"]) == 0
    out = capsys.readouterr().out
    per_sample = float(re.search(r"backward ([\d.e+-]+) GFLOPs/sample", out).group(1))
    total = float(re.search(r"= ([\d.e+-]+) PFLOP in 30 steps", out).group(1))
    assert total == pytest.approx(per_sample * 1e9 * 3000 / 1e15, rel=6e-3)  # printed to 3 significant figures
    seconds = float(re.search(r"efficiency: ([\d.e+-]+) s", out).group(1))
    assert seconds == pytest.approx(3000 / 500, rel=6e-3)  # printed to 3 significant figures


def test_anchor_needs_its_rate():
    with pytest.raises(SystemExit) as e:
        main(["--config", "configs/demo.yaml", "--samples", "10", "--anchor-config", "configs/demo.yaml"])
    assert e.value.code == 2
