"""model.depth: a shallower backbone of the same family (the recipes' rehearsal, tests/engine/test_recipes_rehearsed.py,
runs the ResNet-50 w2 and ViT-B recipes with it); 0 keeps the architecture's own network, weights included."""
import pytest
import torch
import torchvision

from engine.config import load_config
from methods.registry import build_model
from models.backbones import build_backbone


def stages(net) -> list[int]:
    return [len(getattr(net, f"layer{i}")) for i in range(1, 5)]


def test_depth_zero_is_the_stock_network():
    torch.manual_seed(0)
    net, _ = build_backbone("resnet50")
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None)
    assert stages(net) == [3, 4, 6, 3]
    ref_state = ref.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in net.state_dict().items())   # same draws, same weights


@pytest.mark.parametrize("arch, depth, blocks, dim", [("resnet18", 1, [1, 1, 1, 1], 512),
                                                      ("resnet50", 3, [3, 3, 3, 3], 2048),
                                                      ("resnet50w2", 1, [1, 1, 1, 1], 4096)])
def test_resnet_depth_caps_blocks_per_stage(arch, depth, blocks, dim):
    net, feature_dim = build_backbone(arch, depth=depth)
    full, _ = build_backbone(arch)
    assert stages(net) == blocks and feature_dim == dim
    assert net.conv1.out_channels == full.conv1.out_channels          # widths stay (w2 keeps its 128-wide stem)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_vit_depth_keeps_width_and_stochastic_depth():
    net, dim = build_backbone("vit_small", drop_path=0.1, depth=2)
    assert dim == 384 and len(net.blocks) == 2
    assert net.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # timm spreads 0 .. drop_path over the blocks
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 384)            # one 16 px patch: dynamic image size


def test_depth_reaches_both_methods_from_the_config():
    for method in ("twist", "self_classifier"):
        cfg = load_config("configs/demo.yaml", [f"method={method}", "model.depth=1"])
        assert stages(build_model(cfg).backbone) == [1, 1, 1, 1]
