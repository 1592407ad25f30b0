import pytest
import torch

from methods.self_classifier.model import SelfClassifierHead, SelfClassifierModel, WeightNormLinear, build_mlp


def test_official_head_structure():
    head = SelfClassifierHead(in_dim=2048, hidden=4096, dim=128, mlp_layers=2, classes=(1000, 2000, 4000, 8000))
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "LeakyReLU", "Linear"]  # --num-hidden 2 --use-bn
    assert (head.mlp[0].in_features, head.mlp[0].out_features, head.mlp[3].out_features) == (2048, 4096, 128)
    assert [c.weight_v.shape for c in head.classifiers] == [(c, 128) for c in (1000, 2000, 4000, 8000)]
    names = {n for n, _ in head.classifiers.named_parameters()}
    assert not any("bias" in n for n in names)
    assert all(torch.equal(c.weight_g, torch.ones(c.weight_g.shape)) and c.weight_g.requires_grad
               for c in head.classifiers)


@pytest.mark.parametrize("layers,kinds", [(0, ["Identity"]), (1, ["Linear"]),
                                          (3, ["Linear", "BatchNorm1d", "LeakyReLU"] * 2 + ["Linear"])])
def test_mlp_depths(layers, kinds):
    mlp, out = build_mlp(16, 32, 8, layers)
    assert [type(m).__name__ for m in (mlp if layers else [mlp])] == kinds
    assert out == (16 if layers == 0 else 8)


def test_classifier_is_cosine_times_g_and_can_be_fixed():
    torch.manual_seed(0)
    layer = WeightNormLinear(8, 5)
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(5))
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    assert layer(x).abs().max() <= 1.0 + 1e-6
    with torch.no_grad():
        layer.weight_g.mul_(3.0)
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.full((5,), 3.0))
    fixed = WeightNormLinear(8, 5, fixed_norm=True)
    assert not fixed.weight_g.requires_grad and fixed.weight_v.requires_grad


def test_multicrop_forward_nests_classifiers_then_views():
    m = SelfClassifierModel("resnet18", hidden=32, dim=8, mlp_layers=2, classes=(3, 5))
    calls = []
    m.backbone.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(3)]
    out = m(views)
    assert calls == [(8, 3, 32, 32), (12, 3, 16, 16)]  # the shared multi-crop forward
    assert len(out) == 2 and all(len(o) == 5 for o in out)
    assert out[0][4].shape == (4, 3) and out[1][0].shape == (4, 5)
    out[0][0].sum().backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if n.startswith("backbone.conv1"))


def test_classifier_logits_pick_one_classifier():
    m = SelfClassifierModel("resnet18", hidden=32, dim=8, mlp_layers=2, classes=(3, 5)).eval()
    feats = torch.randn(6, m.feature_dim)
    assert m.num_classifiers == 2
    full = m.head(feats)
    torch.testing.assert_close(m.classifier_logits(feats, 1), full[1])
    with pytest.raises(ValueError, match="classifier 2 is out of range; this model has 2"):
        m.classifier_logits(feats, 2)
