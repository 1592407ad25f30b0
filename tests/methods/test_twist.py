import torch
import torchvision

from models.backbones import backbone_state_dict, build_backbone
from methods.twist.model import TwistModel, resolution_groups


def test_backbone_loads_strict_into_torchvision():
    for arch, ctor, dim in (("resnet18", torchvision.models.resnet18, 512),
                            ("resnet50", torchvision.models.resnet50, 2048)):
        net, feat_dim = build_backbone(arch)
        assert feat_dim == dim
        ref = ctor(weights=None)
        sd = backbone_state_dict(net)
        assert not any(k.startswith("fc.") for k in sd)
        missing, unexpected = ref.load_state_dict(sd, strict=False)
        assert missing == ["fc.weight", "fc.bias"] and unexpected == []
        del ref.fc
        ref.fc = torch.nn.Identity()
        ref.load_state_dict(sd, strict=True)


def test_head_structure_ends_in_bn_without_affine():
    m = TwistModel("resnet18", head_hidden=64, head_dim=16)
    layers = list(m.head.mlp) + [m.head.last_linear, m.head.norm]
    kinds = [type(x).__name__ for x in layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "LocalBatchNorm1d"]
    assert isinstance(m.head.norm, torch.nn.BatchNorm1d)      # per process: kept out of the SyncBN conversion
    assert m.head.norm.affine is False and m.head.norm.weight is None


def test_multicrop_forward_runs_backbone_once_per_resolution():
    m = TwistModel("resnet18", head_hidden=32, head_dim=8)
    calls = []
    m.backbone.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16) for _ in range(3)]
    out = m(views)
    assert [tuple(c) for c in calls] == [(8, 3, 32, 32), (12, 3, 16, 16)]
    assert len(out) == 5 and all(o.shape == (4, 8) for o in out)
    # per-view outputs follow view order: changing only view 3 changes only output 3 (head BN is in eval mode)
    m.eval()
    a = m(views)
    views[3] = torch.randn(4, 3, 16, 16)
    b = m(views)
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[4], b[4]) and not torch.allclose(a[3], b[3])


def test_resolution_groups():
    v = [torch.zeros(1, 3, s, s) for s in (8, 8, 4, 4, 4, 8)]
    assert resolution_groups(v) == [(0, 2), (2, 5), (5, 6)]


def test_wide_resnet_and_vits():
    net, dim = build_backbone("resnet50w2")
    assert dim == 4096 and net.conv1.out_channels == 128 and net.layer4[-1].conv3.out_channels == 4096
    assert 93e6 < sum(p.numel() for p in net.parameters()) < 95e6      # the official 94M
    vit, vdim = build_backbone("vit_small", drop_path=0.1)
    assert vdim == 384
    m = TwistModel("vit_small", head_hidden=32, head_dim=8, head_act="gelu")
    out = m([torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 2)  # dynamic image size
    assert [tuple(o.shape) for o in out] == [(2, 8)] * 4
    assert any(isinstance(x, torch.nn.GELU) for x in m.head.modules())
